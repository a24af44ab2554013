"""DeRTa losses: analytic values, the authors' objective in torch, the chunked path, keep-rate."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from derta_jax import losses, sharding
from derta_jax.models import llama

V = 50
REFUSAL = 7


def _batch(targets_BxT, mle_BxT, rto_BxT):
  return dict(targets=jnp.asarray(targets_BxT, jnp.int32),
              mle_mask=jnp.asarray(mle_BxT, jnp.int32),
              rto_mask=jnp.asarray(rto_BxT, jnp.int32))


def _random_case(b=3, t=37, d=16, v=V, seed=0):
  rng = np.random.default_rng(seed)
  kind_BxT = rng.integers(0, 3, (b, t))  # 0 nothing, 1 MLE, 2 RTO
  batch = _batch(rng.integers(0, v, (b, t)), kind_BxT == 1, kind_BxT == 2)
  hidden_BxTxD = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  unembed_DxV = jnp.asarray(rng.normal(size=(d, v)) / math.sqrt(d) * 3, jnp.float32)
  return hidden_BxTxD, unembed_DxV, batch


# ---------------------------------------------------------------------------- analytic


def test_uniform_logits_give_log_vocab():
  _, _, batch = _random_case()
  logits_BxTxV = jnp.zeros((3, 37, V))
  loss, metrics = losses.derta_loss(logits_BxTxV=logits_BxTxV, batch=batch, refusal_ids=REFUSAL)
  np.testing.assert_allclose(float(loss), math.log(V), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["mle_loss"]), math.log(V), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["rto_loss"]), math.log(V), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["p_refusal"]), 1 / V, rtol=1e-5)
  # A refusal set of 5 ids holds 5/V of the probability.
  set_loss = losses.rto_loss(logits_BxTxV=logits_BxTxV, rto_mask_BxT=batch["rto_mask"],
                             refusal_ids=[3, 7, 11, 19, 40])
  np.testing.assert_allclose(float(set_loss), math.log(V / 5), rtol=1e-6)
  logp_BxT = losses.token_logprobs(logits_BxTxV=logits_BxTxV, targets_BxT=batch["targets"])
  np.testing.assert_allclose(np.asarray(logp_BxT), -math.log(V), rtol=1e-6)


def test_dominant_correct_column_gives_zero_mle_loss():
  _, _, batch = _random_case()
  logits_BxTxV = 40.0 * jax.nn.one_hot(batch["targets"], V)
  mle = losses.mle_loss(logits_BxTxV=logits_BxTxV, targets_BxT=batch["targets"],
                        mle_mask_BxT=batch["mle_mask"])
  assert 0 <= float(mle) < 1e-12
  _, metrics = losses.derta_loss(logits_BxTxV=logits_BxTxV, batch=batch, refusal_ids=REFUSAL)
  assert float(metrics["mle_accuracy"]) == 1.0
  assert float(metrics["mle_loss"]) < 1e-12


def test_dominant_refusal_column_gives_zero_rto_loss():
  _, _, batch = _random_case()
  logits_BxTxV = jnp.zeros((3, 37, V)).at[..., REFUSAL].set(40.0)
  rto = losses.rto_loss(logits_BxTxV=logits_BxTxV, rto_mask_BxT=batch["rto_mask"],
                        refusal_ids=REFUSAL)
  assert 0 <= float(rto) < 1e-12
  _, metrics = losses.derta_loss(logits_BxTxV=logits_BxTxV, batch=batch, refusal_ids=REFUSAL)
  np.testing.assert_allclose(float(metrics["p_refusal"]), 1.0, rtol=1e-6)
  # Mass split over a refusal set counts in full.
  split = jnp.zeros((3, 37, V)).at[..., 3].set(40.0).at[..., 9].set(40.0)
  assert float(losses.rto_loss(logits_BxTxV=split, rto_mask_BxT=batch["rto_mask"],
                               refusal_ids=(3, 9))) < 1e-12
  np.testing.assert_allclose(float(losses.rto_loss(
      logits_BxTxV=split, rto_mask_BxT=batch["rto_mask"], refusal_ids=3)), math.log(2),
      atol=1e-5)  # fp32 logsumexp near 40 has a resolution of 4e-6


def test_terms_normalisation_and_weights():
  hidden_BxTxD, unembed_DxV, batch = _random_case()
  logits_BxTxV = hidden_BxTxD @ unembed_DxV
  mle = losses.mle_loss(logits_BxTxV=logits_BxTxV, targets_BxT=batch["targets"],
                        mle_mask_BxT=batch["mle_mask"])
  rto = losses.rto_loss(logits_BxTxV=logits_BxTxV, rto_mask_BxT=batch["rto_mask"],
                        refusal_ids=REFUSAL)
  terms, _ = losses.derta_loss(logits_BxTxV=logits_BxTxV, batch=batch, refusal_ids=REFUSAL,
                               normalize="terms", rto_weight=0.3)
  np.testing.assert_allclose(float(terms), float(mle + 0.3 * rto), rtol=1e-6)
  n_mle, n_rto = (float(batch[k].sum()) for k in ("mle_mask", "rto_mask"))
  pooled, metrics = losses.derta_loss(logits_BxTxV=logits_BxTxV, batch=batch,
                                      refusal_ids=REFUSAL, rto_weight=2.0)
  expected = (n_mle * float(mle) + 2.0 * n_rto * float(rto)) / (n_mle + n_rto)
  np.testing.assert_allclose(float(pooled), expected, rtol=1e-6)
  assert (float(metrics["mle_tokens"]), float(metrics["rto_tokens"])) == (n_mle, n_rto)
  z, z_metrics = losses.derta_loss(logits_BxTxV=logits_BxTxV, batch=batch, refusal_ids=REFUSAL,
                                   z_loss=1e-3)
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  sup_BxT = batch["mle_mask"] + batch["rto_mask"]
  z_term = float(jnp.sum(sup_BxT * lse_BxT**2) / jnp.sum(sup_BxT))
  np.testing.assert_allclose(float(z_metrics["z_term"]), z_term, rtol=1e-6)
  base, _ = losses.derta_loss(logits_BxTxV=logits_BxTxV, batch=batch, refusal_ids=REFUSAL)
  np.testing.assert_allclose(float(z), float(base) + 1e-3 * z_term, rtol=1e-6)


def test_empty_masks_give_zero_not_nan():
  _, _, batch = _random_case()
  empty = dict(batch, mle_mask=jnp.zeros_like(batch["mle_mask"]),
               rto_mask=jnp.zeros_like(batch["rto_mask"]))
  loss, metrics = losses.derta_loss(logits_BxTxV=jnp.zeros((3, 37, V)), batch=empty,
                                    refusal_ids=REFUSAL, normalize="terms")
  assert float(loss) == 0.0
  assert all(np.isfinite(float(m)) for m in metrics.values())


def test_overlapping_masks_are_rejected():
  _, _, batch = _random_case()
  bad = dict(batch, mle_mask=batch["mle_mask"].at[1, 4].set(1),
             rto_mask=batch["rto_mask"].at[1, 4].set(1))
  logits_BxTxV = jnp.zeros((3, 37, V))
  with pytest.raises(ValueError, match="overlap at 1 positions, first at row 1, position 4"):
    losses.derta_loss(logits_BxTxV=logits_BxTxV, batch=bad, refusal_ids=REFUSAL)
  with pytest.raises(ValueError, match="overlap"):
    losses.derta_loss_from_hidden(hidden_BxTxD=jnp.zeros((3, 37, 4)),
                                  unembed_DxV=jnp.zeros((4, V)), batch=bad, refusal_ids=REFUSAL)
  # Under jit the values are not visible: the loss becomes NaN, which stops training.
  jitted = jax.jit(lambda lg, b: losses.derta_loss(logits_BxTxV=lg, batch=b,
                                                   refusal_ids=REFUSAL)[0])
  assert np.isnan(float(jitted(logits_BxTxV, bad)))
  assert np.isfinite(float(jitted(logits_BxTxV, batch)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(refusal_ids=[]), "empty"),
    (dict(refusal_ids=[3, 3]), "repeated"),
    (dict(refusal_ids=V), "outside the vocabulary"),
    (dict(refusal_ids=REFUSAL, normalize="mean"), "normalize='mean'"),
])
def test_bad_arguments_are_named(kwargs, match):
  _, _, batch = _random_case()
  with pytest.raises(ValueError, match=match):
    losses.derta_loss(logits_BxTxV=jnp.zeros((3, 37, V)), batch=batch, **kwargs)


def test_a_pipeline_batch_of_numpy_arrays_with_other_keys_is_accepted():
  hidden_BxTxD, unembed_DxV, batch = _random_case()
  logits_BxTxV = hidden_BxTxD @ unembed_DxV
  plain = {k: np.asarray(v) for k, v in batch.items()}
  plain["input_ids"] = np.zeros((3, 37), np.int32)
  a, _ = losses.derta_loss(logits_BxTxV=logits_BxTxV, batch=batch, refusal_ids=REFUSAL)
  b, _ = losses.derta_loss(logits_BxTxV=logits_BxTxV, batch=plain, refusal_ids=REFUSAL)
  assert float(a) == float(b)
  c, _ = losses.derta_loss_from_hidden(hidden_BxTxD=hidden_BxTxD, unembed_DxV=unembed_DxV,
                                       batch=plain, refusal_ids=REFUSAL)
  np.testing.assert_allclose(float(c), float(a), rtol=1e-6)


def test_batch_shape_errors_name_the_keys():
  _, _, batch = _random_case()
  with pytest.raises(ValueError, match="rto_mask"):
    losses.check_batch({k: v for k, v in batch.items() if k != "rto_mask"})
  with pytest.raises(ValueError, match="share one"):
    losses.check_batch(dict(batch, mle_mask=batch["mle_mask"][:, :5]))


# ------------------------------------------------------------------ authors' objective


def _upstream_rows(seed=0, b=6, t=24, v=V):
  """Rows as the authors build them: ids, labels (-100 on prompt and padding), safe flag."""
  rng = np.random.default_rng(seed)
  ids_BxT = rng.integers(3, v, (b, t))
  labels_BxT = np.full((b, t), -100)
  safe_B = np.array([0, 1, 0, 1, 1, 0][:b])  # 1: an RTO row ("safe": "true")
  for row in range(b):
    prompt = int(rng.integers(2, 8))
    length = int(rng.integers(prompt + 2, t + 1))
    ids_BxT[row, length:] = 0  # right padding
    labels_BxT[row, prompt:length] = ids_BxT[row, prompt:length]
  return ids_BxT, labels_BxT, safe_B


def _contract_batch(ids_BxT, labels_BxT, safe_B):
  """The same rows in our batch contract: position t predicts label t + 1."""
  supervised_BxT = np.zeros_like(labels_BxT, bool)
  supervised_BxT[:, :-1] = labels_BxT[:, 1:] != -100
  targets_BxT = np.zeros_like(ids_BxT)
  targets_BxT[:, :-1] = ids_BxT[:, 1:]
  rto_BxT = supervised_BxT & (safe_B[:, None] == 1)
  return _batch(targets_BxT, supervised_BxT & ~rto_BxT, rto_BxT)


def test_parity_with_the_authors_torch_objective():
  import torch

  ids_BxT, labels_BxT, safe_B = _upstream_rows()
  rng = np.random.default_rng(1)
  logits_BxTxV = rng.normal(size=(*ids_BxT.shape, V)).astype(np.float32) * 3

  # The authors' forward: every response label of an RTO row becomes the refusal id, shift
  # by one, one CrossEntropyLoss() mean over all labels that are not -100.
  labels = torch.tensor(labels_BxT)
  safe_labels = labels.clone()
  for row in range(len(safe_B)):
    if safe_B[row]:
      safe_labels[row][labels[row] != -100] = REFUSAL
  shift_logits = torch.tensor(logits_BxTxV)[..., :-1, :].reshape(-1, V)
  shift_labels = safe_labels[..., 1:].reshape(-1)
  expected = float(torch.nn.CrossEntropyLoss()(shift_logits, shift_labels))

  batch = _contract_batch(ids_BxT, labels_BxT, safe_B)
  assert float(batch["rto_mask"].sum()) > 0 and float(batch["mle_mask"].sum()) > 0
  loss, _ = losses.derta_loss(logits_BxTxV=jnp.asarray(logits_BxTxV), batch=batch,
                              refusal_ids=REFUSAL)
  assert abs(float(loss) - expected) / expected <= 1e-6

  # The chunked path from hidden states, on logits = hidden @ unembed.
  d = 12
  hidden_BxTxD = rng.normal(size=(*ids_BxT.shape, d)).astype(np.float32)
  unembed_DxV = (rng.normal(size=(d, V)) / math.sqrt(d) * 3).astype(np.float32)
  logits = torch.tensor(hidden_BxTxD) @ torch.tensor(unembed_DxV)
  expected = float(torch.nn.CrossEntropyLoss()(logits[..., :-1, :].reshape(-1, V), shift_labels))
  loss, _ = losses.derta_loss_from_hidden(
      hidden_BxTxD=jnp.asarray(hidden_BxTxD), unembed_DxV=jnp.asarray(unembed_DxV),
      batch=batch, refusal_ids=REFUSAL, chunk_size=5)
  assert abs(float(loss) - expected) / expected <= 1e-6


def test_micro_batches_with_global_counts_sum_to_the_full_batch_loss():
  hidden_BxTxD, unembed_DxV, batch = _random_case(b=4)
  full, _ = losses.derta_loss_from_hidden(hidden_BxTxD=hidden_BxTxD, unembed_DxV=unembed_DxV,
                                          batch=batch, refusal_ids=REFUSAL, chunk_size=8)
  counts = (jnp.sum(batch["mle_mask"]), jnp.sum(batch["rto_mask"]))
  parts = [losses.derta_loss_from_hidden(
      hidden_BxTxD=hidden_BxTxD[i:i + 2], unembed_DxV=unembed_DxV,
      batch={k: v[i:i + 2] for k, v in batch.items()}, refusal_ids=REFUSAL, chunk_size=8,
      counts=counts)[0] for i in (0, 2)]
  np.testing.assert_allclose(float(sum(parts)), float(full), rtol=1e-6)


# ------------------------------------------------------------------------ chunked path


def _naive(hidden_BxTxD, unembed_DxV, batch, **kwargs):
  return losses.derta_loss(logits_BxTxV=hidden_BxTxD @ unembed_DxV, batch=batch, **kwargs)


def test_jit_and_no_jit_agree():
  hidden_BxTxD, unembed_DxV, batch = _random_case()
  logits_BxTxV = hidden_BxTxD @ unembed_DxV
  f = lambda lg, b: losses.derta_loss(logits_BxTxV=lg, batch=b, refusal_ids=(3, REFUSAL),  # noqa: E731
                                      z_loss=1e-4)
  eager, eager_m = f(logits_BxTxV, batch)
  jitted, jitted_m = jax.jit(f)(logits_BxTxV, batch)
  np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
  for k in eager_m:
    np.testing.assert_allclose(float(jitted_m[k]), float(eager_m[k]), rtol=1e-6, err_msg=k)


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("normalize, refusal_ids, z_loss", [
    ("tokens", REFUSAL, 0.0), ("terms", (3, REFUSAL, 11), 1e-3)])
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 37, 64])
def test_chunked_equals_full_logits_in_value_and_gradients(normalize, refusal_ids, z_loss,
                                                           chunk_size):
  hidden_BxTxD, unembed_DxV, batch = _random_case()
  kwargs = dict(batch=batch, refusal_ids=refusal_ids, normalize=normalize, z_loss=z_loss,
                rto_weight=0.7)

  def chunked(h, u):
    return losses.derta_loss_from_hidden(hidden_BxTxD=h, unembed_DxV=u, chunk_size=chunk_size,
                                         **kwargs)

  (ref, ref_m), ref_g = jax.value_and_grad(
      lambda h, u: _naive(h, u, **kwargs), argnums=(0, 1), has_aux=True)(hidden_BxTxD, unembed_DxV)
  (out, out_m), out_g = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(
      hidden_BxTxD, unembed_DxV)
  assert abs(float(out) - float(ref)) / abs(float(ref)) <= 1e-5
  for name, a, b in zip(("hidden", "unembed"), out_g, ref_g, strict=True):
    assert _rel(a, b) <= 1e-5, name
  for k in ref_m:
    np.testing.assert_allclose(float(out_m[k]), float(ref_m[k]), rtol=1e-5, err_msg=k)


def test_chunked_bf16_inputs_follow_fp32():
  hidden_BxTxD, unembed_DxV, batch = _random_case()
  h16, u16 = hidden_BxTxD.astype(jnp.bfloat16), unembed_DxV.astype(jnp.bfloat16)
  (loss, _), (dh, du) = jax.value_and_grad(
      lambda h, u: losses.derta_loss_from_hidden(hidden_BxTxD=h, unembed_DxV=u, batch=batch,
                                                 refusal_ids=REFUSAL, chunk_size=8),
      argnums=(0, 1), has_aux=True)(h16, u16)
  assert (dh.dtype, du.dtype) == (jnp.bfloat16, jnp.bfloat16)
  ref, _ = _naive(h16.astype(jnp.float32), u16.astype(jnp.float32), batch, refusal_ids=REFUSAL)
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)


def test_chunked_on_a_mesh_equals_one_device():
  hidden_BxTxD, unembed_DxV, batch = _random_case(b=8, t=40)
  f = jax.jit(jax.value_and_grad(
      lambda h, u, b: losses.derta_loss_from_hidden(hidden_BxTxD=h, unembed_DxV=u, batch=b,
                                                    refusal_ids=REFUSAL, chunk_size=16)[0],
      argnums=(0, 1)))
  single_loss, single_g = f(hidden_BxTxD, unembed_DxV, batch)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
  sharded_loss, sharded_g = f(put(hidden_BxTxD, ("data", "fsdp")),
                              put(unembed_DxV, None, "tensor"),
                              {k: jax.device_put(v, rows) for k, v in batch.items()})
  np.testing.assert_allclose(float(sharded_loss), float(single_loss), rtol=1e-6)
  for a, b in zip(sharded_g, single_g, strict=True):
    assert _rel(a, b) <= 1e-6


def test_model_hidden_states_path_equals_model_logits():
  config = llama.preset("tiny")
  model = llama.init_model(config, seed=3)
  rng = np.random.default_rng(0)
  ids_BxT = jnp.asarray(rng.integers(3, config.vocab_size, (2, 19)), jnp.int32)
  kind_BxT = rng.integers(0, 3, (2, 19))
  batch = _batch(jnp.roll(ids_BxT, -1, axis=1), kind_BxT == 1, kind_BxT == 2)
  full, _ = losses.derta_loss(logits_BxTxV=model(ids_BxT), batch=batch, refusal_ids=REFUSAL)
  chunked, _ = losses.derta_loss_from_hidden(
      hidden_BxTxD=model.hidden_states(ids_BxT), unembed_DxV=model.unembed_DxV(), batch=batch,
      refusal_ids=REFUSAL, chunk_size=8)
  np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)


# ----------------------------------------------------------------------- RTO keep-rate


def _rto_rows(t=120, starts=(30, 0, 90, 119), ends=(100, 120, 95, 120)):
  mask = np.zeros((len(starts), t), np.int32)
  for row, (s, e) in enumerate(zip(starts, ends, strict=True)):
    mask[row, s:e] = 1
  return jnp.asarray(mask)


def test_keep_mask_keeps_ceil_rate_of_response_positions_at_least_one():
  rto_BxT = _rto_rows()
  kept = losses.rto_keep_mask(rto_mask_BxT=rto_BxT, keep_rate=0.05, seed=1, step=7)
  n_B = np.asarray(rto_BxT.sum(1))
  np.testing.assert_array_equal(np.asarray(kept.sum(1)), np.maximum(1, -(-n_B // 20)))
  assert not np.any(np.asarray(kept) & ~np.asarray(rto_BxT))  # only response positions
  assert kept.dtype == rto_BxT.dtype
  assert losses.rto_keep_mask(rto_mask_BxT=rto_BxT, keep_rate=1.0, seed=1, step=7) is rto_BxT


def test_keep_mask_is_a_function_of_seed_step_and_row():
  rto_BxT = _rto_rows()
  draw = lambda **kw: np.asarray(losses.rto_keep_mask(  # noqa: E731
      rto_mask_BxT=kw.pop("mask", rto_BxT), keep_rate=0.25, **kw))
  base = draw(seed=0, step=3)
  np.testing.assert_array_equal(draw(seed=0, step=3), base)
  assert not np.array_equal(draw(seed=0, step=4), base)
  assert not np.array_equal(draw(seed=1, step=3), base)
  # Row 2 drawn alone, as global row 2, equals row 2 of the whole batch.
  np.testing.assert_array_equal(draw(seed=0, step=3, mask=rto_BxT[2:3],
                                     row_ids_B=jnp.array([2]))[0], base[2])
  # Extra padding does not move what is kept.
  padded = jnp.pad(rto_BxT, ((0, 0), (0, 40)))
  np.testing.assert_array_equal(draw(seed=0, step=3, mask=padded)[:, :120], base)
  jitted = jax.jit(lambda m, s: losses.rto_keep_mask(rto_mask_BxT=m, keep_rate=0.25, seed=0,
                                                     step=s))
  np.testing.assert_array_equal(np.asarray(jitted(rto_BxT, 3)), base)


def test_keep_mask_counts_per_packed_segment():
  segments_T = np.repeat(np.arange(1, 5), 30)
  rto_T = np.ones(120, np.int32)
  rto_T[:10] = 0  # segment 1 has 20 RTO positions, the rest 30 each
  kept = losses.rto_keep_mask(rto_mask_BxT=jnp.asarray(rto_T)[None], keep_rate=0.1, seed=0,
                              step=0, segment_ids_BxT=jnp.asarray(segments_T)[None])
  per_segment = np.asarray(kept[0]).reshape(4, 30).sum(1)
  np.testing.assert_array_equal(per_segment, [2, 3, 3, 3])


@pytest.mark.parametrize("rate", [0.0, 1.5, -0.1])
def test_keep_rate_out_of_range_is_an_error(rate):
  with pytest.raises(ValueError, match="keep_rate"):
    losses.rto_keep_mask(rto_mask_BxT=_rto_rows(), keep_rate=rate, seed=0, step=0)
