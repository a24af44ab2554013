"""Rival objectives (DPO, Qi et al., NPO / DOOR / W-DOOR, circuit breakers) against references
written separately in torch: Python loops over each sequence's list of positions, float64,
autograd for the gradients. JAX runs in fp32, hence the 1e-5 tolerances."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from derta_jax.losses import rivals

B, T, V = 3, 40, 11
TOL = dict(rtol=1e-5, atol=1e-5)
QI_SCHEDULE = (0.5, 2.0, 2.0, 2.0, 2.0)  # 1-based β_1..β_5 of Qi et al.; 0.1 after
DPO_BETA, NPO_BETA, DOOR_ALPHA, TAU = 0.1, 0.5, 0.2, 5.0


# ------------------------------------------------------------------------------------ inputs


def _layout(rng, segments_per_row):
  """Packed rows: row r holds segments_per_row[r] sequences, each 1-3 prompt tokens then 1-7
  response tokens, then at least one padding position. -> (segment ids, response mask,
  index of each response position within its response)."""
  seg = np.zeros((B, T), np.int32)
  resp = np.zeros((B, T), np.int32)
  index = np.zeros((B, T), np.int32)
  for row, k in enumerate(segments_per_row):
    prompts, responses = rng.integers(1, 4, k), rng.integers(1, 8, k)
    while (prompts + responses).sum() >= T:
      prompts, responses = rng.integers(1, 4, k), rng.integers(1, 8, k)
    start = 0
    for s in range(k):
      p, r = prompts[s], responses[s]
      seg[row, start:start + p + r] = s + 1
      resp[row, start + p:start + p + r] = 1
      index[row, start + p:start + p + r] = np.arange(r)
      start += p + r
  return seg, resp, index


def _logps(rng):
  logp = -rng.exponential(1.5, (B, T))
  return logp, logp + rng.normal(0.0, 0.7, (B, T))


def _dpo_inputs(rng):
  """Row 0 one pair, row 1 two, row 2 a sequence in no pair; which segment of a pair is the
  chosen one is drawn per pair."""
  seg, resp, _ = _layout(rng, (2, 4, 1))
  pairs = (seg + 1) // 2
  pairs[2] = 0
  odd_first = rng.integers(0, 2, (B, T + 1)).astype(bool)
  chosen_seg = np.where(odd_first[np.arange(B)[:, None], pairs], seg % 2 == 1, seg % 2 == 0)
  on = (resp == 1) & (pairs > 0)
  logp, ref = _logps(rng)
  return dict(logp=logp, ref=ref, pairs=pairs, chosen=(on & chosen_seg).astype(np.int32),
              rejected=(on & ~chosen_seg).astype(np.int32))


def _sequence_inputs(rng):
  seg, resp, index = _layout(rng, (3, 2, 3))
  logp, ref = _logps(rng)
  # DOOR's roles: each row's segments cycle through utility, safety, harm from a random start.
  role = np.where(seg > 0, (seg + rng.integers(0, 3, (B, 1))) % 3, -1)
  return dict(logp=logp, ref=ref, seg=seg, mask=resp, index=index,
              utility=resp * (role == 0), safety=resp * (role == 1), harm=resp * (role == 2),
              weighting=logp + rng.normal(0.0, 2.0, (B, T)))


# ----------------------------------------------------------------------- torch references


def _spans(mask, ids):
  """{(row, id): [positions]} of the masked positions whose id is not 0, in order."""
  spans = {}
  for row in range(mask.shape[0]):
    for t in range(mask.shape[1]):
      if mask[row, t] and ids[row, t]:
        spans.setdefault((row, int(ids[row, t])), []).append(t)
  return spans


def _zero():
  return torch.zeros((), dtype=torch.float64)


def _tensor(x):
  return torch.tensor(np.asarray(x), dtype=torch.float64)


def _total(x, row, positions):
  return sum((x[row, t] for t in positions), _zero())


def torch_dpo(logp, x):
  ratio = logp - _tensor(x["ref"])
  chosen, rejected = _spans(x["chosen"], x["pairs"]), _spans(x["rejected"], x["pairs"])
  pairs = sorted(set(chosen) | set(rejected))
  terms = [-F.logsigmoid(DPO_BETA * (_total(ratio, p[0], chosen.get(p, []))
                                     - _total(ratio, p[0], rejected.get(p, []))))
           for p in pairs]
  return sum(terms, _zero()) / max(len(pairs), 1)


def torch_qi(logp, x):
  ratio = logp - _tensor(x["ref"])
  terms = []
  for (row, _), positions in _spans(x["mask"], x["seg"]).items():
    for k, t in enumerate(positions):
      beta = QI_SCHEDULE[k] if k < len(QI_SCHEDULE) else 0.1
      terms.append(-(2.0 / beta) * F.logsigmoid(beta * ratio[row, t]))
  return sum(terms, _zero()) / max(len(terms), 1)


def torch_npo(logp, x, mask_key="mask"):
  ratio = logp - _tensor(x["ref"])
  spans = _spans(x[mask_key], x["seg"])
  terms = [(2.0 / NPO_BETA) * F.softplus(NPO_BETA * _total(ratio, row, positions))
           for (row, _), positions in spans.items()]
  return sum(terms, _zero()) / max(len(spans), 1)


def torch_nll(logp, x, mask_key="mask", weights=None):
  weights = torch.ones_like(logp) if weights is None else weights
  spans = _spans(x[mask_key], x["seg"])
  terms = [-_total(weights * logp, row, positions) for (row, _), positions in spans.items()]
  return sum(terms, _zero()) / max(len(spans), 1)


def torch_door(logp, x, weighted=False):
  weights = (torch.exp((_tensor(x["ref"]) - _tensor(x["weighting"])) / TAU) if weighted
             else None)
  safety = torch_nll(logp, x, "safety", weights)
  utility = torch_nll(logp, x, "utility")
  return DOOR_ALPHA * (safety + torch_npo(logp, x, "harm")) + (1 - DOOR_ALPHA) * utility


def torch_value_and_grad(loss_fn, x):
  x = torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
  loss = loss_fn(x) + 0.0 * x.sum()  # so backward runs when nothing is masked
  loss.backward()
  return loss.item(), x.grad.numpy()


# ------------------------------------------------------------------------- ours, per case


def jax_dpo(logp, x, **counts):
  return rivals.dpo_loss(logp_BxT=logp, ref_logp_BxT=x["ref"], chosen_mask_BxT=x["chosen"],
                         rejected_mask_BxT=x["rejected"], pair_ids_BxT=x["pairs"],
                         beta=DPO_BETA, **counts)


def jax_qi(logp, x, **counts):
  beta_BxT = rivals.qi_betas(response_index_BxT=x["index"])
  return rivals.qi_loss(logp_BxT=logp, ref_logp_BxT=x["ref"], mask_BxT=x["mask"],
                        beta_BxT=beta_BxT, **counts)


def jax_npo(logp, x, **counts):
  return rivals.npo_loss(logp_BxT=logp, ref_logp_BxT=x["ref"], mask_BxT=x["mask"],
                         segment_ids_BxT=x["seg"], beta=NPO_BETA, **counts)


def jax_nll(logp, x, **counts):
  return rivals.sequence_nll(logp_BxT=logp, mask_BxT=x["mask"], segment_ids_BxT=x["seg"],
                             **counts)


def jax_door(logp, x, weighted=False, **counts):
  weights = (rivals.wdoor_weights(weighting_logp_BxT=x["weighting"], ref_logp_BxT=x["ref"],
                                  tau=TAU) if weighted else None)
  return rivals.door_loss(logp_BxT=logp, ref_logp_BxT=x["ref"], utility_mask_BxT=x["utility"],
                          safety_mask_BxT=x["safety"], harm_mask_BxT=x["harm"],
                          segment_ids_BxT=x["seg"], beta=NPO_BETA, alpha=DOOR_ALPHA,
                          token_weights_BxT=weights, **counts)


def _door_counts(metrics):
  return dict(counts={k: metrics[k] for k in rivals.DOOR_COUNT_KEYS})


# name: (inputs, ours, reference, full-batch counts from our metrics, mask keys)
CASES = {
    "dpo": (_dpo_inputs, jax_dpo, torch_dpo, lambda m: dict(n_pairs=m["pairs"]),
            ("chosen", "rejected")),
    "qi": (_sequence_inputs, jax_qi, torch_qi, lambda m: dict(n_tokens=m["tokens"]),
           ("mask",)),
    "npo": (_sequence_inputs, jax_npo, torch_npo, lambda m: dict(n_sequences=m["sequences"]),
            ("mask",)),
    "nll": (_sequence_inputs, jax_nll, torch_nll, lambda m: dict(n_sequences=m["sequences"]),
            ("mask",)),
    "door": (_sequence_inputs, jax_door, torch_door, _door_counts,
             ("utility", "safety", "harm")),
    "wdoor": (_sequence_inputs, lambda logp, x, **c: jax_door(logp, x, weighted=True, **c),
              lambda logp, x: torch_door(logp, x, weighted=True), _door_counts,
              ("utility", "safety", "harm")),
}


def jax_value_and_grad(ours, x, logp=None, **counts):
  logp = x["logp"] if logp is None else logp
  value, grad = jax.value_and_grad(lambda v: ours(v, x, **counts)[0])(
      jnp.asarray(logp, jnp.float32))
  return float(value), np.asarray(grad)


# ---------------------------------------------------------------------- parity with torch


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_value_and_gradient_match_torch(name, seed):
  make, ours, reference, _, _ = CASES[name]
  x = make(np.random.default_rng(seed))
  value, grad = jax_value_and_grad(ours, x)
  expected, expected_grad = torch_value_and_grad(lambda logp: reference(logp, x), x["logp"])
  assert abs(expected) > 1e-2, "a degenerate case would test nothing"
  np.testing.assert_allclose(value, expected, **TOL)
  np.testing.assert_allclose(grad, expected_grad, **TOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_reference_is_a_constant(name):
  make, ours, _, _, _ = CASES[name]
  x = make(np.random.default_rng(0))
  grad = jax.grad(lambda ref: ours(x["logp"], {**x, "ref": ref})[0])(
      jnp.asarray(x["ref"], jnp.float32))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_through_log_softmax_matches_torch(name):
  make, ours, reference, _, _ = CASES[name]
  rng = np.random.default_rng(2)
  x = make(rng)
  logits = rng.normal(0.0, 2.0, (B, T, V))
  targets = rng.integers(0, V, (B, T))

  def jax_loss(logits_BxTxV):
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    logp_BxT = jnp.take_along_axis(logp_BxTxV, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    return ours(logp_BxT, x)[0]

  value, grad = jax.value_and_grad(jax_loss)(jnp.asarray(logits, jnp.float32))
  index = torch.tensor(targets)[..., None]
  expected, expected_grad = torch_value_and_grad(
      lambda z: reference(torch.log_softmax(z, -1).gather(-1, index)[..., 0], x), logits)
  np.testing.assert_allclose(float(value), expected, **TOL)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, **TOL)


def test_qi_layout_reaches_the_rest_beta():
  x = _sequence_inputs(np.random.default_rng(0))
  assert (x["index"][x["mask"] == 1] >= len(QI_SCHEDULE)).any()


# ------------------------------------------------------------------------------- counts


def _rows(x, rows):
  return {k: v[rows] for k, v in x.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_halves_with_full_batch_counts_add_up_to_the_full_loss(name):
  make, ours, _, counts_of, _ = CASES[name]
  x = make(np.random.default_rng(3))
  def loss(logp, arrays, counts):
    return ours(logp, arrays, **counts)

  full, metrics = loss(x["logp"], x, {})
  counts = counts_of(metrics)
  first, _ = loss(x["logp"][:1], _rows(x, slice(0, 1)), counts)
  second, _ = loss(x["logp"][1:], _rows(x, slice(1, 3)), counts)
  # Without the counts each part is a mean of its own, so the parts would not add up.
  alone, _ = loss(x["logp"][:1], _rows(x, slice(0, 1)), {})
  assert abs(float(alone) - float(first)) > 1e-3
  np.testing.assert_allclose(float(first) + float(second), float(full), **TOL)


def test_door_counts_reject_unknown_keys():
  x = _sequence_inputs(np.random.default_rng(0))
  with pytest.raises(ValueError, match="harm_sequence"):
    jax_door(x["logp"], x, counts=dict(harm_sequence=3))


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", sorted(CASES))
def test_empty_masks_give_zero_and_finite_gradients(name):
  make, ours, _, _, mask_keys = CASES[name]
  x = make(np.random.default_rng(4))
  x.update({k: np.zeros_like(x[k]) for k in mask_keys})
  value, grad = jax_value_and_grad(ours, x)
  assert value == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_no_pairs_give_zero():
  x = _dpo_inputs(np.random.default_rng(4))
  x["pairs"] = np.zeros_like(x["pairs"])
  value, grad = jax_value_and_grad(jax_dpo, x)
  assert value == 0.0
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_off_the_masks_are_never_read(name):
  make, ours, _, _, mask_keys = CASES[name]
  x = make(np.random.default_rng(5))
  clean = jax_value_and_grad(ours, x)
  off = sum(x[k] for k in mask_keys) == 0
  x["ref"] = np.where(off, np.nan, x["ref"])
  if "weighting" in x:
    x["weighting"] = np.where(off, -np.inf, x["weighting"])
  value, grad = jax_value_and_grad(ours, x, logp=np.where(off, -np.inf, x["logp"]))
  np.testing.assert_allclose(value, clean[0], **TOL)
  np.testing.assert_allclose(grad, clean[1], **TOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_agrees_with_eager(name):
  make, ours, _, _, _ = CASES[name]
  x = make(np.random.default_rng(6))
  eager = ours(x["logp"], x)
  jitted = jax.jit(lambda logp, arrays: ours(logp, arrays))(x["logp"], x)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_sequence_sums_and_count_match_a_loop():
  rng = np.random.default_rng(7)
  seg, resp, _ = _layout(rng, (3, 1, 2))
  values = rng.normal(size=(B, T))
  sums_N, present_N = rivals.sequence_sums(values_BxT=values, mask_BxT=resp, ids_BxT=seg)
  spans = _spans(resp, seg)
  expected_sums, expected_present = np.zeros(B * (T + 1)), np.zeros(B * (T + 1), bool)
  for (row, sid), positions in spans.items():
    expected_sums[row * (T + 1) + sid] = values[row, positions].sum()
    expected_present[row * (T + 1) + sid] = True
  np.testing.assert_allclose(np.asarray(sums_N), expected_sums, **TOL)
  np.testing.assert_array_equal(np.asarray(present_N), expected_present)
  count = rivals.sequence_count(mask_BxT=resp, ids_BxT=seg)
  assert float(count) == len(spans) == 6


def test_ids_outside_the_row_are_named():
  seg = np.zeros((B, T), np.int32)
  seg[1, 3] = T + 1
  with pytest.raises(ValueError, match=f"with T = {T}"):
    rivals.sequence_count(mask_BxT=np.ones((B, T)), ids_BxT=seg)


def test_dpo_metrics_on_one_pair_by_hand():
  # One row: chosen positions 1-2 sum to +2 over the reference, rejected position 4 to -1.
  logp = np.array([[0.0, -1.0, -2.0, 0.0, -3.0, 0.0]])
  ref = np.array([[9.0, -2.0, -3.0, 9.0, -2.0, 9.0]])
  chosen = np.array([[0, 1, 1, 0, 0, 0]])
  rejected = np.array([[0, 0, 0, 0, 1, 0]])
  pairs = np.array([[1, 1, 1, 1, 1, 0]])
  loss, metrics = rivals.dpo_loss(logp_BxT=logp, ref_logp_BxT=ref, chosen_mask_BxT=chosen,
                                  rejected_mask_BxT=rejected, pair_ids_BxT=pairs, beta=0.5)
  np.testing.assert_allclose(float(loss), math.log1p(math.exp(-1.5)), rtol=1e-6)
  assert float(metrics["dpo_margin"]) == 3.0
  assert float(metrics["dpo_accuracy"]) == 1.0
  assert float(metrics["pairs"]) == 1.0
  assert float(metrics["dpo_loss"]) == float(loss)


def test_qi_betas_schedule():
  index = np.arange(8)[None]
  np.testing.assert_allclose(np.asarray(rivals.qi_betas(response_index_BxT=index)),
                             [[0.5, 2, 2, 2, 2, 0.1, 0.1, 0.1]], rtol=1e-7)
  custom = rivals.qi_betas(response_index_BxT=index, first=(1.0, 3.0), rest=0.2)
  np.testing.assert_allclose(np.asarray(custom), [[1, 3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]],
                             rtol=1e-7)
  flat = rivals.qi_betas(response_index_BxT=index, first=(), rest=0.3)
  np.testing.assert_allclose(np.asarray(flat), 0.3, rtol=1e-7)


def test_qi_small_beta_gradient_is_the_mean_cross_entropy_gradient():
  x = _sequence_inputs(np.random.default_rng(8))
  beta_BxT = np.full((B, T), 1e-4)
  n = x["mask"].sum()
  grad = jax.grad(lambda logp: rivals.qi_loss(logp_BxT=logp, ref_logp_BxT=x["ref"],
                                              mask_BxT=x["mask"], beta_BxT=beta_BxT)[0])(
      jnp.asarray(x["logp"], jnp.float32))
  np.testing.assert_allclose(np.asarray(grad), -x["mask"] / n, atol=1e-3)


def test_qi_betas_off_the_mask_are_never_read():
  x = _sequence_inputs(np.random.default_rng(8))
  beta_BxT = np.asarray(rivals.qi_betas(response_index_BxT=x["index"]))

  def qi(beta):
    return jax.value_and_grad(lambda logp: rivals.qi_loss(
        logp_BxT=logp, ref_logp_BxT=x["ref"], mask_BxT=x["mask"], beta_BxT=beta)[0])(
            jnp.asarray(x["logp"], jnp.float32))

  value, grad = qi(np.where(x["mask"] == 1, beta_BxT, 0.0))
  expected, expected_grad = qi(beta_BxT)
  assert float(value) == float(expected)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(expected_grad))


def test_npo_at_the_reference_is_two_over_beta_log_two():
  x = _sequence_inputs(np.random.default_rng(9))
  for beta in (0.1, 0.5, 2.0):
    loss, metrics = rivals.npo_loss(logp_BxT=x["logp"], ref_logp_BxT=x["logp"],
                                    mask_BxT=x["mask"], segment_ids_BxT=x["seg"], beta=beta)
    np.testing.assert_allclose(float(loss), 2.0 / beta * math.log(2.0), rtol=1e-6)
    assert float(metrics["sequences"]) == 8.0


def test_wdoor_weights_follow_the_authors_sign_and_carry_no_gradient():
  weighting = np.array([[-1.0, -3.0, -2.0]])
  ref = np.array([[-2.0, -2.0, -2.0]])
  weights = rivals.wdoor_weights(weighting_logp_BxT=weighting, ref_logp_BxT=ref, tau=2.0)
  np.testing.assert_allclose(np.asarray(weights), np.exp([[-0.5, 0.5, 0.0]]), rtol=1e-6)
  grad = jax.grad(lambda w: jnp.sum(rivals.wdoor_weights(
      weighting_logp_BxT=w, ref_logp_BxT=ref)))(jnp.asarray(weighting, jnp.float32))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


@pytest.mark.parametrize("call, match", [
    (lambda: rivals.wdoor_weights(weighting_logp_BxT=np.zeros((1, 2)),
                                  ref_logp_BxT=np.zeros((1, 2)), tau=0.0), "tau=0.0"),
    (lambda: rivals.qi_betas(response_index_BxT=np.zeros((1, 2)), rest=0.0), "rest=0.0"),
    (lambda: rivals.npo_loss(logp_BxT=np.zeros((1, 2)), ref_logp_BxT=np.zeros((1, 3)),
                             mask_BxT=np.zeros((1, 2)), segment_ids_BxT=np.zeros((1, 2))),
     "ref_logp_BxT"),
    (lambda: rivals.circuit_breaker_coefficients(step=0, total_steps=0, alpha=1.0),
     "total_steps=0"),
])
def test_bad_arguments_are_named(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# --------------------------------------------------------------------- circuit breakers

L, D = 4, 8
REROUTE_LAYERS, RETAIN_LAYERS = (1, 3), (0, 2, 3)
C_REROUTE, C_RETAIN = 0.7, 0.3


def _cb_inputs(rng):
  seg, resp, _ = _layout(rng, (2, 3, 2))
  return dict(hidden=rng.normal(size=(L, B, T, D)), ref=rng.normal(size=(L, B, T, D)),
              reroute=resp * (seg == 1), retain=resp * (seg > 1))


def jax_cb(hidden, x, **counts):
  return rivals.circuit_breaker_loss(
      hidden_LxBxTxD=hidden, ref_hidden_LxBxTxD=jnp.asarray(x["ref"], jnp.float32),
      reroute_mask_BxT=x["reroute"], retain_mask_BxT=x["retain"],
      reroute_layers=REROUTE_LAYERS, retain_layers=RETAIN_LAYERS, c_reroute=C_REROUTE,
      c_retain=C_RETAIN, **counts)


def torch_cb(hidden, x, eps=1e-8):
  ref = _tensor(x["ref"])
  reroute = [(r, t) for r, t in zip(*np.nonzero(x["reroute"]), strict=True)]
  retain = [(r, t) for r, t in zip(*np.nonzero(x["retain"]), strict=True)]
  cosines = []
  for layer in REROUTE_LAYERS:
    for r, t in reroute:
      a, b = hidden[layer, r, t], ref[layer, r, t]
      norms = torch.clamp(torch.sqrt((a * a).sum()), min=eps) * torch.clamp(
          torch.sqrt((b * b).sum()), min=eps)
      cosines.append(torch.relu((a * b).sum() / norms))
  distances = [torch.linalg.vector_norm(hidden[layer, r, t] - ref[layer, r, t])
               for layer in RETAIN_LAYERS for r, t in retain]
  l_rr = sum(cosines, _zero()) / (max(len(reroute), 1) * len(REROUTE_LAYERS))
  l_ret = sum(distances, _zero()) / (max(len(retain), 1) * len(RETAIN_LAYERS))
  return C_REROUTE * l_rr + C_RETAIN * l_ret


def _cb_value_and_grad(x, hidden=None, **counts):
  hidden = x["hidden"] if hidden is None else hidden
  value_and_grad = jax.value_and_grad(lambda h: jax_cb(h, x, **counts), has_aux=True)
  (value, metrics), grad = value_and_grad(jnp.asarray(hidden, jnp.float32))
  return float(value), metrics, np.asarray(grad)


def test_circuit_breaker_value_and_gradient_match_torch():
  x = _cb_inputs(np.random.default_rng(10))
  value, metrics, grad = _cb_value_and_grad(x)
  expected, expected_grad = torch_value_and_grad(lambda h: torch_cb(h, x), x["hidden"])
  np.testing.assert_allclose(value, expected, **TOL)
  np.testing.assert_allclose(grad, expected_grad, **TOL)
  np.testing.assert_allclose(
      C_REROUTE * float(metrics["cb_cosine"]) + C_RETAIN * float(metrics["cb_retain"]), value,
      **TOL)
  assert float(metrics["c_reroute"]) == np.float32(C_REROUTE)
  # Positions off both masks and layers in neither tuple get no gradient.
  np.testing.assert_array_equal(grad[:, (x["reroute"] + x["retain"]) == 0], 0.0)
  assert np.abs(grad[1]).sum() > 0 and np.all(grad[0][x["reroute"] == 1] == 0)


def test_circuit_breaker_reference_is_a_constant():
  x = _cb_inputs(np.random.default_rng(10))
  grad = jax.grad(lambda ref: jax_cb(jnp.asarray(x["hidden"], jnp.float32), {**x, "ref": ref})[0])(
      jnp.asarray(x["ref"], jnp.float32))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_circuit_breaker_at_the_reference_has_zero_retain_and_finite_gradient():
  # The first step: the policy's hidden states are the reference's, and a zero hidden state
  # meets the cosine's eps.
  x = _cb_inputs(np.random.default_rng(11))
  x["ref"] = x["hidden"].copy()
  row, t = np.argwhere(x["reroute"])[0]
  x["hidden"][:, row, t] = 0.0
  x["ref"][:, row, t] = 0.0
  value, metrics, grad = _cb_value_and_grad(x)
  assert np.isfinite(grad).all() and np.isfinite(value)
  assert float(metrics["cb_retain"]) == 0.0
  np.testing.assert_array_equal(grad[:, x["retain"] == 1], 0.0)
  # Equal non-zero hidden states have cosine 1; the zero one has cosine 0.
  n = x["reroute"].sum()
  np.testing.assert_allclose(float(metrics["cb_cosine"]), (n - 1) / n, **TOL)


def test_circuit_breaker_bf16_hidden_states_are_computed_in_fp32():
  x = _cb_inputs(np.random.default_rng(10))
  expected = float(jax_cb(jnp.asarray(x["hidden"], jnp.bfloat16).astype(jnp.float32), x)[0])
  loss, metrics = jax_cb(jnp.asarray(x["hidden"], jnp.bfloat16), x)
  assert loss.dtype == jnp.float32 and metrics["cb_retain"].dtype == jnp.float32
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_circuit_breaker_empty_masks_give_zero():
  x = _cb_inputs(np.random.default_rng(12))
  x["reroute"], x["retain"] = np.zeros((B, T)), np.zeros((B, T))
  value, _, grad = _cb_value_and_grad(x)
  assert value == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_circuit_breaker_halves_with_full_batch_counts_add_up():
  x = _cb_inputs(np.random.default_rng(13))
  full, _, _ = _cb_value_and_grad(x)
  counts = dict(n_reroute=x["reroute"].sum(), n_retain=x["retain"].sum())

  def half(rows):
    part = dict(ref=x["ref"][:, rows], reroute=x["reroute"][rows], retain=x["retain"][rows])
    return float(jax_cb(jnp.asarray(x["hidden"][:, rows], jnp.float32), part, **counts)[0])

  np.testing.assert_allclose(half(slice(0, 2)) + half(slice(2, 3)), full, **TOL)


def test_circuit_breaker_layers_outside_the_stack_are_named():
  x = _cb_inputs(np.random.default_rng(14))
  with pytest.raises(ValueError, match=r"retain_layers \(0, 4\) has \[4\]"):
    rivals.circuit_breaker_loss(
        hidden_LxBxTxD=x["hidden"], ref_hidden_LxBxTxD=x["ref"], reroute_mask_BxT=x["reroute"],
        retain_mask_BxT=x["retain"], reroute_layers=(1,), retain_layers=(0, 4), c_reroute=1.0,
        c_retain=1.0)


def test_circuit_breaker_coefficients_follow_the_paper_and_trace():
  coefficients = jax.jit(lambda s: rivals.circuit_breaker_coefficients(
      step=s, total_steps=150, alpha=10.0))
  for step, expected in ((0, (10.0, 0.0)), (75, (7.5, 2.5)), (150, (5.0, 5.0))):
    np.testing.assert_allclose(np.asarray(coefficients(step)), expected, rtol=1e-6)
