"""DeRTa's rival safety-training objectives, as pure functions of per-position arrays.

  DPO             Rafailov et al., 2023, "Direct Preference Optimization"
  Qi et al.       Qi et al., ICLR 2025, "Safety Alignment Should Be Made More Than Just a Few
                  Tokens Deep": the token-wise constrained objective
  NPO, DOOR       Zhang et al., 2024, "Negative Preference Optimization"; Zhao et al., ICML
                  2025, "Improving LLM Safety Alignment with Dual-Objective Optimization"
                  (DOOR, and W-DOOR with token weights)
  circuit breaker Zou et al., 2024, "Improving Alignment and Robustness with Circuit
                  Breakers": representation rerouting

Array contract ([B, T] unless named otherwise):
  logp              log π_θ(target_t | context) of the policy; gradients flow through it
  ref_logp          the same under the frozen reference model; a constant here
  *_mask            0/1: the positions a term sums over
  segment_ids       packed rows hold several sequences numbered 1, 2, ... within the row;
                    0 is padding. A sequence is a (row, segment id)
  pair_ids          DPO: the chosen and the rejected response of one pair are two segments of
                    one row that share a pair id >= 1. A pair is a (row, pair id)
  response_index    0-based index of position t's target within its response
A position whose segment or pair id is 0 is padding and never counts, whatever the masks say.
Ids must lie in [0, T]; that is checked when the ids are concrete values.

Normalisers: every loss takes an optional count (n_pairs, n_tokens, ...). Given, the loss is
sum / count, so micro-batches of one global batch, each given the global count, have losses
that add up to the global loss (gradient accumulation). None: this batch's count. Either is
clamped to >= 1, so an empty batch gives 0, not NaN.

Every loss returns (loss, metrics): an fp32 scalar and a dict of fp32 scalars without
gradient, the loss among them.

Legend: B batch, T tokens, P = B * T positions, N = B * (T + 1) (row, id) slots, L layers,
D model width.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DOOR_COUNT_KEYS = ("utility_sequences", "safety_sequences", "harm_sequences")
QI_FIRST_BETAS = (0.5, 2.0, 2.0, 2.0, 2.0)
QI_REST_BETA = 0.1


def _check_shapes(**arrays_BxT):
  shapes = {k: tuple(jnp.shape(v)) for k, v in arrays_BxT.items() if v is not None}
  if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
    raise ValueError(f"these arrays must share one [B, T] shape, got {shapes}")


def _check_ids(ids_BxT):
  if isinstance(ids_BxT, jax.core.Tracer):
    return
  ids = np.asarray(ids_BxT)
  t = ids.shape[1]
  if ids.size and (ids.min() < 0 or ids.max() > t):
    raise ValueError(f"ids_BxT holds ids in [{ids.min()}, {ids.max()}]; with T = {t} they must "
                     f"lie in [0, {t}] so that every (row, id) gets its own slot")


def _count(given, present_N):
  """max(given count, or the number of present slots, 1) in fp32."""
  n = jnp.sum(present_N.astype(jnp.float32)) if given is None else given
  return jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)


def _mean(values_N, present_N):
  present_N = present_N.astype(jnp.float32)
  return jnp.sum(values_N * present_N) / jnp.maximum(jnp.sum(present_N), 1.0)


def _metrics(**values):
  return {k: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)) for k, v in values.items()}


def _log_ratio(logp_BxT, ref_logp_BxT):
  """log π_θ − log π_ref, the reference a constant."""
  return (jnp.asarray(logp_BxT, jnp.float32)
          - jax.lax.stop_gradient(jnp.asarray(ref_logp_BxT, jnp.float32)))


def sequence_sums(*, values_BxT, mask_BxT, ids_BxT):
  """Per (row, id): Σ values over its masked positions, and whether it has any -> (sums_N,
  present_N).

  Slot row * (T + 1) + id holds (row, id); slot row * (T + 1) is padding (id 0) and is
  never present. Unmasked values may be anything, inf or NaN included: they are not read,
  and their gradient is 0.
  """
  _check_shapes(values_BxT=values_BxT, mask_BxT=mask_BxT, ids_BxT=ids_BxT)
  _check_ids(ids_BxT)
  b, t = jnp.shape(ids_BxT)
  ids_BxT = jnp.asarray(ids_BxT, jnp.int32)
  on_BxT = (jnp.asarray(mask_BxT) != 0) & (ids_BxT > 0)
  slot_P = (jnp.arange(b, dtype=jnp.int32)[:, None] * (t + 1) + ids_BxT).reshape(-1)
  n = b * (t + 1)
  kept_BxT = jnp.where(on_BxT, jnp.asarray(values_BxT, jnp.float32), 0.0)
  sums_N = jax.ops.segment_sum(kept_BxT.reshape(-1), slot_P, num_segments=n)
  hits_N = jax.ops.segment_sum(on_BxT.reshape(-1).astype(jnp.int32), slot_P, num_segments=n)
  return sums_N, hits_N > 0


def sequence_count(*, mask_BxT, ids_BxT):
  """Number of (row, id) with id >= 1 and any masked position, in fp32."""
  _, present_N = sequence_sums(values_BxT=jnp.zeros(jnp.shape(mask_BxT), jnp.float32),
                               mask_BxT=mask_BxT, ids_BxT=ids_BxT)
  return jnp.sum(present_N.astype(jnp.float32))


# ---------------------------------------------------------------------------------------- DPO


def dpo_loss(*, logp_BxT, ref_logp_BxT, chosen_mask_BxT, rejected_mask_BxT, pair_ids_BxT,
             beta=0.1, n_pairs=None):
  """DPO (Rafailov et al., 2023) on sequence log-probs summed over response tokens.

  margin_p = Σ_{chosen t of p} (logp − ref) − Σ_{rejected t of p} (logp − ref), a pair p being
  a (row, pair id) with any chosen or rejected position;
  loss = Σ_p −log σ(β · margin_p) / n_pairs.
  Metrics: dpo_loss, dpo_margin (mean margin_p, without β), dpo_accuracy (share of pairs with
  margin_p > 0), pairs (pairs in this batch).
  """
  _check_shapes(logp_BxT=logp_BxT, ref_logp_BxT=ref_logp_BxT, chosen_mask_BxT=chosen_mask_BxT,
                rejected_mask_BxT=rejected_mask_BxT, pair_ids_BxT=pair_ids_BxT)
  ratio_BxT = _log_ratio(logp_BxT, ref_logp_BxT)
  chosen_N, has_chosen_N = sequence_sums(values_BxT=ratio_BxT, mask_BxT=chosen_mask_BxT,
                                         ids_BxT=pair_ids_BxT)
  rejected_N, has_rejected_N = sequence_sums(values_BxT=ratio_BxT, mask_BxT=rejected_mask_BxT,
                                             ids_BxT=pair_ids_BxT)
  pair_N = has_chosen_N | has_rejected_N
  margin_N = chosen_N - rejected_N
  total = jnp.sum(jnp.where(pair_N, -jax.nn.log_sigmoid(beta * margin_N), 0.0))
  loss = total / _count(n_pairs, pair_N)
  return loss, _metrics(dpo_loss=loss, dpo_margin=_mean(margin_N, pair_N),
                        dpo_accuracy=_mean((margin_N > 0).astype(jnp.float32), pair_N),
                        pairs=jnp.sum(pair_N.astype(jnp.float32)))


# ---------------------------------------------------------------------------------- Qi et al.


def qi_betas(*, response_index_BxT, first=QI_FIRST_BETAS, rest=QI_REST_BETA):
  """β per position: first[i] at response index i < len(first), else rest.

  The default is Qi et al.'s schedule: their 1-based β_1 = 0.5, β_2..β_5 = 2, β_t = 0.1
  after.
  """
  table = tuple(float(b) for b in (*first, rest))
  if min(table) <= 0:
    raise ValueError(f"qi betas must be > 0, got first={tuple(first)}, rest={rest}")
  index_BxT = jnp.clip(jnp.asarray(response_index_BxT, jnp.int32), 0, len(table) - 1)
  return jnp.asarray(table, jnp.float32)[index_BxT]


def qi_loss(*, logp_BxT, ref_logp_BxT, mask_BxT, beta_BxT, n_tokens=None):
  """Qi et al.'s token-wise constrained fine-tuning objective (ICLR 2025).

  Per masked token t: −(2 / β_t) · log σ(β_t · (logp_t − ref_t)); loss = Σ_t / n_tokens.
  Its gradient on logp_t is −2 σ(−β_t (logp_t − ref_t)) / n_tokens: cross-entropy's −1 /
  n_tokens as β_t → 0; a large β_t stops pushing once the token is above the reference.
  `objectives.rival_loss` applies it to every MLE token, helpful and safety alike.
  Metrics: qi_loss, qi_log_ratio (mean logp − ref over masked tokens), tokens.
  """
  _check_shapes(logp_BxT=logp_BxT, ref_logp_BxT=ref_logp_BxT, mask_BxT=mask_BxT,
                beta_BxT=beta_BxT)
  on_BxT = jnp.asarray(mask_BxT) != 0
  beta_BxT = jax.lax.stop_gradient(jnp.asarray(beta_BxT, jnp.float32))
  # Replaced, not only masked at the end: the NaN or inf cotangents that a garbage ratio or a
  # β of 0 off the mask produce stop here instead of reaching logp.
  ratio_BxT = jnp.where(on_BxT, _log_ratio(logp_BxT, ref_logp_BxT), 0.0)
  per_BxT = -(2.0 / beta_BxT) * jax.nn.log_sigmoid(beta_BxT * ratio_BxT)
  tokens = jnp.sum(on_BxT.astype(jnp.float32))
  loss = jnp.sum(jnp.where(on_BxT, per_BxT, 0.0)) / _count(n_tokens, on_BxT)
  return loss, _metrics(qi_loss=loss, qi_log_ratio=_mean(ratio_BxT, on_BxT), tokens=tokens)


# ---------------------------------------------------------------------------------- NPO, DOOR


def npo_loss(*, logp_BxT, ref_logp_BxT, mask_BxT, segment_ids_BxT, beta=0.5, n_sequences=None):
  """NPO (Zhang et al., 2024) as DOOR uses it, on sequence log-probs.

  Per sequence s: Δ_s = Σ_{masked t of s} (logp − ref);
  loss_s = (2 / β) · log(1 + exp(β Δ_s)) = −(2 / β) · log σ(−β Δ_s);
  loss = Σ_s loss_s / n_sequences. loss_s = (2 / β) log 2 at logp = ref.
  Metrics: npo_loss, npo_log_ratio (mean Δ_s), sequences.
  """
  _check_shapes(logp_BxT=logp_BxT, ref_logp_BxT=ref_logp_BxT, mask_BxT=mask_BxT,
                segment_ids_BxT=segment_ids_BxT)
  delta_N, seq_N = sequence_sums(values_BxT=_log_ratio(logp_BxT, ref_logp_BxT),
                                 mask_BxT=mask_BxT, ids_BxT=segment_ids_BxT)
  per_N = (2.0 / beta) * jax.nn.softplus(beta * delta_N)
  loss = jnp.sum(jnp.where(seq_N, per_N, 0.0)) / _count(n_sequences, seq_N)
  return loss, _metrics(npo_loss=loss, npo_log_ratio=_mean(delta_N, seq_N),
                        sequences=jnp.sum(seq_N.astype(jnp.float32)))


def sequence_nll(*, logp_BxT, mask_BxT, segment_ids_BxT, token_weights_BxT=None,
                 n_sequences=None):
  """Σ_s (−Σ_{masked t of s} w_t · logp_t) / n_sequences; w = 1 when no weights are given.

  The weights are constants. Metrics: nll, sequences.
  """
  _check_shapes(logp_BxT=logp_BxT, mask_BxT=mask_BxT, segment_ids_BxT=segment_ids_BxT,
                token_weights_BxT=token_weights_BxT)
  on_BxT = jnp.asarray(mask_BxT) != 0
  if token_weights_BxT is None:
    weights_BxT = jnp.ones(jnp.shape(logp_BxT), jnp.float32)
  else:
    weights_BxT = jax.lax.stop_gradient(jnp.asarray(token_weights_BxT, jnp.float32))
  # An inf weight off the mask would turn the zero cotangent there into NaN.
  weights_BxT = jnp.where(on_BxT, weights_BxT, 0.0)
  sums_N, seq_N = sequence_sums(values_BxT=-weights_BxT * jnp.asarray(logp_BxT, jnp.float32),
                                mask_BxT=mask_BxT, ids_BxT=segment_ids_BxT)
  loss = jnp.sum(sums_N) / _count(n_sequences, seq_N)
  return loss, _metrics(nll=loss, sequences=jnp.sum(seq_N.astype(jnp.float32)))


def wdoor_weights(*, weighting_logp_BxT, ref_logp_BxT, tau=5.0):
  """W-DOOR's token weights exp((ref − weighting) / τ), constants.

  The sign follows the DOOR authors' code ("exp" weights: reward = log π_ref − log
  π_weighting, weight = exp(reward / τ), the weighting model being a DPO-trained one): a
  token the weighting model made likelier than the reference weighs less than 1.
  """
  if tau <= 0:
    raise ValueError(f"tau={tau} must be > 0")
  _check_shapes(weighting_logp_BxT=weighting_logp_BxT, ref_logp_BxT=ref_logp_BxT)
  reward_BxT = (jnp.asarray(ref_logp_BxT, jnp.float32)
                - jnp.asarray(weighting_logp_BxT, jnp.float32))
  return jax.lax.stop_gradient(jnp.exp(reward_BxT / tau))


def door_loss(*, logp_BxT, ref_logp_BxT, utility_mask_BxT, safety_mask_BxT, harm_mask_BxT,
              segment_ids_BxT, beta=0.5, alpha=0.2, token_weights_BxT=None, counts=None):
  """DOOR (Zhao et al., ICML 2025) as in the authors' code; W-DOOR with token weights.

  loss = α · (safety_nll + npo(harm)) + (1 − α) · utility_nll, where safety_nll and
  utility_nll are `sequence_nll` (per-sequence sums of log-probs, as the authors' code sums
  them; the safety one weighted by token_weights_BxT when given) and npo is `npo_loss`.
  W-DOOR in the authors' code also swaps the NPO term for a reference-free, length-normalised
  −(2 / β) log σ(−β · logp_s / len_s − γ); here both variants keep the NPO term above.
  counts: optional dict with any of DOOR_COUNT_KEYS, the global batch's sequence counts.
  Metrics: door_loss, safety_nll, npo_loss, utility_nll, npo_log_ratio, and the three counts
  of this batch.
  """
  counts = dict(counts or {})
  unknown = sorted(set(counts) - set(DOOR_COUNT_KEYS))
  if unknown:
    raise ValueError(f"counts has keys {unknown}; the keys are {list(DOOR_COUNT_KEYS)}")
  safety, safety_m = sequence_nll(
      logp_BxT=logp_BxT, mask_BxT=safety_mask_BxT, segment_ids_BxT=segment_ids_BxT,
      token_weights_BxT=token_weights_BxT, n_sequences=counts.get("safety_sequences"))
  npo, npo_m = npo_loss(
      logp_BxT=logp_BxT, ref_logp_BxT=ref_logp_BxT, mask_BxT=harm_mask_BxT,
      segment_ids_BxT=segment_ids_BxT, beta=beta, n_sequences=counts.get("harm_sequences"))
  utility, utility_m = sequence_nll(
      logp_BxT=logp_BxT, mask_BxT=utility_mask_BxT, segment_ids_BxT=segment_ids_BxT,
      n_sequences=counts.get("utility_sequences"))
  loss = alpha * (safety + npo) + (1.0 - alpha) * utility
  return loss, _metrics(door_loss=loss, safety_nll=safety, npo_loss=npo, utility_nll=utility,
                        npo_log_ratio=npo_m["npo_log_ratio"],
                        safety_sequences=safety_m["sequences"],
                        harm_sequences=npo_m["sequences"],
                        utility_sequences=utility_m["sequences"])


# ---------------------------------------------------------------------------- circuit breakers


def _select_layers(hidden_LxBxTxD, layers: Sequence[int], name: str):
  n = hidden_LxBxTxD.shape[0]
  bad = [int(layer) for layer in layers if not 0 <= int(layer) < n]
  if bad:
    raise ValueError(f"{name} {tuple(layers)} has {bad} outside the {n} stacked layers [0, {n})")
  return hidden_LxBxTxD[np.asarray(layers, np.int32)].astype(jnp.float32)


def _norm_at_least(x_LxBxTxD, eps):
  """max(‖x‖, eps) along D, with a finite gradient at x = 0."""
  return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x_LxBxTxD), axis=-1), eps * eps))


def _norm(x_LxBxTxD):
  """‖x‖ along D, with gradient 0 (not NaN) at x = 0."""
  sq_LxBxT = jnp.sum(jnp.square(x_LxBxTxD), axis=-1)
  positive_LxBxT = sq_LxBxT > 0
  return jnp.where(positive_LxBxT, jnp.sqrt(jnp.where(positive_LxBxT, sq_LxBxT, 1.0)), 0.0)


def circuit_breaker_coefficients(*, step, total_steps, alpha):
  """(c_reroute, c_retain) = (α · (1 − s / 2S), α · s / 2S) at step s of S (Zou et al., 2024).

  step may be traced. The authors' code writes s / 2S as step / 300, this schedule for S = 150.
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps} must be > 0")
  progress = jnp.asarray(step, jnp.float32) / (2.0 * total_steps)
  return alpha * (1.0 - progress), alpha * progress


def circuit_breaker_loss(*, hidden_LxBxTxD, ref_hidden_LxBxTxD, reroute_mask_BxT,
                         retain_mask_BxT, reroute_layers, retain_layers, c_reroute, c_retain,
                         n_reroute=None, n_retain=None, eps=1e-8):
  """Representation rerouting (Zou et al., 2024), in fp32.

  hidden: per-layer hidden states on a leading layer axis, the policy's (with gradient) and
  the reference model's (a constant); reroute_layers / retain_layers index that axis.
  L_rr = Σ_{l ∈ reroute_layers} Σ_{t ∈ reroute mask} ReLU(cos(h_lt, h_ref_lt))
         / (n_reroute · |reroute_layers|),
  cos(a, b) = a·b / (max(‖a‖, eps) · max(‖b‖, eps));
  L_ret = Σ_{l ∈ retain_layers} Σ_{t ∈ retain mask} ‖h_lt − h_ref_lt‖₂
          / (n_retain · |retain_layers|);
  loss = c_reroute · L_rr + c_retain · L_ret; n_* default to this batch's masked tokens.
  Differences from the authors' code: it averages the retain norms over every layer its
  (truncated) model returns and every position of the padded batch (a padding position adds
  a 0 and still counts), ours over retain_layers and the retain mask's positions; its cosine
  divides by the plain norms, without eps.
  Metrics: cb_loss, cb_cosine (L_rr), cb_retain (L_ret), c_reroute, c_retain.
  """
  if hidden_LxBxTxD.shape != ref_hidden_LxBxTxD.shape or hidden_LxBxTxD.ndim != 4:
    raise ValueError(f"hidden_LxBxTxD {hidden_LxBxTxD.shape} and ref_hidden_LxBxTxD "
                     f"{ref_hidden_LxBxTxD.shape} must share one [L, B, T, D] shape")
  masks = {"reroute_mask_BxT": jnp.shape(reroute_mask_BxT),
           "retain_mask_BxT": jnp.shape(retain_mask_BxT)}
  if any(shape != hidden_LxBxTxD.shape[1:3] for shape in masks.values()):
    raise ValueError(f"masks {masks} must have the hidden states' [B, T] shape "
                     f"{hidden_LxBxTxD.shape[1:3]}")
  ref_hidden_LxBxTxD = jax.lax.stop_gradient(ref_hidden_LxBxTxD)
  reroute_BxT = jnp.asarray(reroute_mask_BxT) != 0
  retain_BxT = jnp.asarray(retain_mask_BxT) != 0
  zero = jnp.zeros((), jnp.float32)

  l_rr = zero
  if reroute_layers:
    h_LxBxTxD = _select_layers(hidden_LxBxTxD, reroute_layers, "reroute_layers")
    r_LxBxTxD = _select_layers(ref_hidden_LxBxTxD, reroute_layers, "reroute_layers")
    cos_LxBxT = (jnp.sum(h_LxBxTxD * r_LxBxTxD, axis=-1)
                 / (_norm_at_least(h_LxBxTxD, eps) * _norm_at_least(r_LxBxTxD, eps)))
    total = jnp.sum(jnp.where(reroute_BxT, jax.nn.relu(cos_LxBxT), 0.0))
    l_rr = total / (_count(n_reroute, reroute_BxT) * len(reroute_layers))

  l_ret = zero
  if retain_layers:
    h_LxBxTxD = _select_layers(hidden_LxBxTxD, retain_layers, "retain_layers")
    r_LxBxTxD = _select_layers(ref_hidden_LxBxTxD, retain_layers, "retain_layers")
    total = jnp.sum(jnp.where(retain_BxT, _norm(h_LxBxTxD - r_LxBxTxD), 0.0))
    l_ret = total / (_count(n_retain, retain_BxT) * len(retain_layers))

  c_reroute = jnp.asarray(c_reroute, jnp.float32)
  c_retain = jnp.asarray(c_retain, jnp.float32)
  loss = c_reroute * l_rr + c_retain * l_ret
  return loss, _metrics(cb_loss=loss, cb_cosine=l_rr, cb_retain=l_ret, c_reroute=c_reroute,
                        c_retain=c_retain)
