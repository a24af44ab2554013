"""The DeRTa objective: MLE on responses plus Reinforced Transition Optimization (RTO).

Batch contract (the [B, T] arrays of `derta_jax.data.packing.ARRAYS`; others are ignored):
  targets   int   the logits at position t predict targets[:, t]
  mle_mask  0/1   position t is an MLE target (helpful, safe or prefix-MLE response)
  rto_mask  0/1   position t is an RTO position: the target is the refusal token(s),
                  whatever targets holds there
The masks never overlap; a position where both are 0 contributes nothing.

In the authors' code an RTO row is a harmful response whose every label (EOS included) is
replaced by the refusal id (LLaMA-3 19701 = "Sorry"), the labels are shifted by one, and one
`CrossEntropyLoss()` mean is taken over every supervised token of the batch. Here that is
`derta_loss(..., normalize="tokens", rto_weight=1.0)`, with rto_mask marking the
positions whose shifted label is a response token of an RTO row.

`derta_loss_from_hidden` computes the same loss in sequence chunks from the final hidden
states and the unembedding, so the [B, T, V] logits never exist.

Legend: B batch, T tokens, C chunk, D model width, V vocabulary, R refusal ids.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from derta_jax.losses import chunked, rivals

BATCH_KEYS = ("targets", "mle_mask", "rto_mask")
NORMALIZE = ("tokens", "terms")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What the train step's objective needs besides arrays: DeRTa's `derta_loss_from_hidden`
  and RTO keep mask, or a rival's settings (`objectives.rival_loss`; configs/base.py's
  loss section describes each)."""

  refusal_ids: tuple[int, ...]
  rto_weight: float = 1.0
  normalize: str = "tokens"
  z_loss: float = 0.0
  chunk_size: int = 512
  rto_keep_rate: float = 1.0
  seed: int = 0
  objective: str = "derta"
  dpo_beta: float = 0.1
  dpo_sft_weight: float = 0.0
  qi_betas: tuple[float, ...] = rivals.QI_FIRST_BETAS
  qi_beta_rest: float = rivals.QI_REST_BETA
  npo_beta: float = 0.5
  door_alpha: float = 0.2
  wdoor_tau: float = 0.0  # > 0: W-DOOR's token weights from a weighting model
  cb_alpha: float = 10.0
  cb_reroute_layers: tuple[int, ...] = ()
  cb_retain_layers: tuple[int, ...] = ()
  total_steps: int = 1  # of the run: circuit breakers' coefficient schedule


def refusal_tuple(refusal_ids: int | Iterable[int], vocab_size: int | None = None):
  """One id or a set of ids -> a sorted tuple of distinct Python ints."""
  ids = (refusal_ids,) if isinstance(refusal_ids, (int, np.integer)) else tuple(refusal_ids)
  ids = tuple(int(i) for i in ids)
  if not ids:
    raise ValueError("refusal_ids is empty: give one token id or a set of ids")
  if len(set(ids)) != len(ids):
    raise ValueError(f"refusal_ids {ids} has repeated ids; each counts once in the set")
  bad = [i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
  if bad:
    raise ValueError(f"refusal_ids {bad} are outside the vocabulary [0, {vocab_size})")
  return tuple(sorted(ids))


def token_logprobs(*, logits_BxTxV, targets_BxT):
  """log P(target | context) per position, in fp32 (a stable log-softmax and a gather)."""

  def row(logits_TxV, targets_T):
    logits_TxV = logits_TxV.astype(jnp.float32)
    lse_T = jax.nn.logsumexp(logits_TxV, axis=-1)
    picked_T = jnp.take_along_axis(logits_TxV, targets_T[:, None], axis=-1)[:, 0]
    return picked_T - lse_T

  return jax.vmap(row)(logits_BxTxV, targets_BxT)


def refusal_logprobs(*, logits_BxTxV, refusal_ids):
  """log P(refusal set | context) per position: logsumexp of the refusal columns' log-probs."""
  ids = refusal_tuple(refusal_ids, logits_BxTxV.shape[-1])

  def row(logits_TxV):
    logits_TxV = logits_TxV.astype(jnp.float32)
    lse_T = jax.nn.logsumexp(logits_TxV, axis=-1)
    return jax.nn.logsumexp(logits_TxV[:, jnp.asarray(ids)], axis=-1) - lse_T

  return jax.vmap(row)(logits_BxTxV)


def _masked_mean(values_BxT, mask_BxT):
  mask_BxT = mask_BxT.astype(jnp.float32)
  return jnp.sum(values_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def mle_loss(*, logits_BxTxV, targets_BxT, mle_mask_BxT):
  """Mean negative log-likelihood of the targets over the MLE positions."""
  logp_BxT = token_logprobs(logits_BxTxV=logits_BxTxV, targets_BxT=targets_BxT)
  return _masked_mean(-logp_BxT, mle_mask_BxT)


def rto_loss(*, logits_BxTxV, rto_mask_BxT, refusal_ids):
  """Mean -log P(refusal) over the RTO positions."""
  logp_BxT = refusal_logprobs(logits_BxTxV=logits_BxTxV, refusal_ids=refusal_ids)
  return _masked_mean(-logp_BxT, rto_mask_BxT)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The batch's three loss arrays (BATCH_KEYS), checked; the overlap check runs when the
  masks are concrete values."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing}; it needs {list(BATCH_KEYS)}; it has "
                     f"{sorted(batch)}")
  out = {k: batch[k] for k in BATCH_KEYS}
  shapes = {k: tuple(jnp.shape(v)) for k, v in out.items()}
  if len(set(shapes.values())) != 1 or len(shapes["targets"]) != 2:
    raise ValueError(f"batch arrays must share one [B, T] shape, got {shapes}")
  mle, rto = out["mle_mask"], out["rto_mask"]
  if _is_concrete(mle) and _is_concrete(rto):
    both = np.logical_and(np.asarray(mle) != 0, np.asarray(rto) != 0)
    if both.any():
      rows, cols = np.nonzero(both)
      raise ValueError(
          f"mle_mask and rto_mask overlap at {both.sum()} positions, first at "
          f"row {rows[0]}, position {cols[0]}: a position is an MLE or an RTO target, not both")
  return {k: jnp.asarray(v) for k, v in out.items()}


def loss_weights(*, batch, rto_weight=1.0, normalize="tokens", z_loss=0.0, counts=None):
  """Per-position weights (w_mle, w_rto, w_z) such that the loss is their weighted sum.

  counts: optional (mle_tokens, rto_tokens) of the whole global batch, for a loss computed
  over one micro-batch of it (gradient accumulation); default: this batch's counts.
  """
  if normalize not in NORMALIZE:
    raise ValueError(f"normalize={normalize!r}; choose one of {NORMALIZE}")
  batch = check_batch(batch)
  mle_BxT = batch["mle_mask"].astype(jnp.float32)
  rto_BxT = batch["rto_mask"].astype(jnp.float32)
  n_mle, n_rto = (jnp.sum(mle_BxT), jnp.sum(rto_BxT)) if counts is None else counts
  n_mle, n_rto = jnp.asarray(n_mle, jnp.float32), jnp.asarray(n_rto, jnp.float32)
  n_all = jnp.maximum(n_mle + n_rto, 1.0)
  if normalize == "tokens":
    w_mle_BxT = mle_BxT / n_all
    w_rto_BxT = rto_weight * rto_BxT / n_all
  else:
    w_mle_BxT = mle_BxT / jnp.maximum(n_mle, 1.0)
    w_rto_BxT = rto_weight * rto_BxT / jnp.maximum(n_rto, 1.0)
  w_z_BxT = z_loss * (mle_BxT + rto_BxT) / n_all
  # Overlapping masks under jit (where check_batch cannot see values) poison the loss with
  # NaN, which the training loop stops on, instead of training on a silently wrong target.
  overlap = jnp.any((mle_BxT != 0) & (rto_BxT != 0))
  w_mle_BxT = jnp.where(overlap, jnp.nan, w_mle_BxT)
  return w_mle_BxT, w_rto_BxT, w_z_BxT


def _position_stats(logits_BxCxV, targets_BxC, ids):
  """Per-position quantities of one block of fp32 logits."""
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  picked_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
  lse_ref_BxC = jax.nn.logsumexp(logits_BxCxV[..., jnp.asarray(ids)], axis=-1)
  return dict(
      lse=lse_BxC,
      mle_nll=lse_BxC - picked_BxC,
      rto_nll=lse_BxC - lse_ref_BxC,
      correct=(jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC).astype(jnp.float32),
      p_refusal=jnp.exp(lse_ref_BxC - lse_BxC),
  )


def _weighted_sums(stats, weights, mle_BxC, rto_BxC):
  """Scalar sums of one block: the loss terms and the metric numerators."""
  w_mle, w_rto, w_z = weights
  loss = jnp.sum(w_mle * stats["mle_nll"]) + jnp.sum(w_rto * stats["rto_nll"])
  loss = loss + jnp.sum(w_z * jnp.square(stats["lse"]))
  return loss, dict(
      mle_nll=jnp.sum(mle_BxC * stats["mle_nll"]),
      rto_nll=jnp.sum(rto_BxC * stats["rto_nll"]),
      z=jnp.sum((mle_BxC + rto_BxC) * jnp.square(stats["lse"])),
      mle_correct=jnp.sum(mle_BxC * stats["correct"]),
      p_refusal=jnp.sum(rto_BxC * stats["p_refusal"]),
  )


def _metrics(loss, sums, batch):
  n_mle = jnp.sum(batch["mle_mask"].astype(jnp.float32))
  n_rto = jnp.sum(batch["rto_mask"].astype(jnp.float32))
  sums = jax.lax.stop_gradient(sums)
  return dict(
      loss=loss,
      mle_loss=sums["mle_nll"] / jnp.maximum(n_mle, 1.0),
      rto_loss=sums["rto_nll"] / jnp.maximum(n_rto, 1.0),
      z_term=sums["z"] / jnp.maximum(n_mle + n_rto, 1.0),
      mle_tokens=n_mle,
      rto_tokens=n_rto,
      mle_accuracy=sums["mle_correct"] / jnp.maximum(n_mle, 1.0),
      p_refusal=sums["p_refusal"] / jnp.maximum(n_rto, 1.0),
  )


def derta_loss(*, logits_BxTxV, batch, refusal_ids, rto_weight=1.0, normalize="tokens",
               z_loss=0.0, counts=None):
  """MLE + RTO on full logits -> (loss, metrics).

  normalize="tokens": one mean over every supervised token, MLE and RTO pooled (the authors'
  objective when rto_weight = 1). normalize="terms": mle_mean + rto_weight * rto_mean.
  z_loss adds z_loss * mean(logsumexp^2) over supervised positions.
  Metrics: loss, mle_loss, rto_loss (means over their own tokens), z_term, mle_tokens,
  rto_tokens, mle_accuracy (argmax == target on MLE positions), p_refusal (mean
  P(refusal set) on RTO positions).
  """
  batch = check_batch(batch)
  ids = refusal_tuple(refusal_ids, logits_BxTxV.shape[-1])
  weights = loss_weights(batch=batch, rto_weight=rto_weight, normalize=normalize,
                         z_loss=z_loss, counts=counts)
  stats = _position_stats(logits_BxTxV.astype(jnp.float32), batch["targets"], ids)
  loss, sums = _weighted_sums(stats, weights, batch["mle_mask"].astype(jnp.float32),
                              batch["rto_mask"].astype(jnp.float32))
  return loss, _metrics(loss, sums, batch)


# ----------------------------------------------------------------------------------------
# Chunked loss (see derta_jax/losses/chunked.py). The forward pass keeps two numbers per
# position: logsumexp over the vocabulary and over the refusal set.


def _chunked_forward(ids, chunk, hidden_BxTxD, unembed_DxV, targets_BxT, weights, masks):
  b, t, _ = hidden_BxTxD.shape
  positions_C = jnp.arange(chunk)

  def body(carry, starts):
    start, nominal = starts
    totals, lse_BxT, lse_ref_BxT = carry
    h_BxCxD = jax.lax.dynamic_slice_in_dim(hidden_BxTxD, start, chunk, axis=1)
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, unembed_DxV,
                              preferred_element_type=jnp.float32)
    cut = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start,
                            slice_size=chunk, axis=1)
    fresh_C = (start + positions_C >= nominal).astype(jnp.float32)
    fresh = lambda x: cut(x) * fresh_C  # noqa: E731
    stats = _position_stats(logits_BxCxV, cut(targets_BxT), ids)
    sums = _weighted_sums(stats, tuple(map(fresh, weights)), *map(fresh, masks))
    lse_BxT = jax.lax.dynamic_update_slice_in_dim(lse_BxT, stats["lse"], start, axis=1)
    lse_ref_BxT = jax.lax.dynamic_update_slice_in_dim(
        lse_ref_BxT, stats["lse"] - stats["rto_nll"], start, axis=1)
    return (jax.tree.map(jnp.add, totals, sums), lse_BxT, lse_ref_BxT), None

  zero = jnp.zeros((), jnp.float32)
  totals = (zero, dict(mle_nll=zero, rto_nll=zero, z=zero, mle_correct=zero, p_refusal=zero))
  empty_BxT = jnp.zeros((b, t), jnp.float32)
  return jax.lax.scan(body, (totals, empty_BxT, empty_BxT), chunked.chunk_starts(t, chunk))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked(ids, chunk, vocab_chunk, hidden_BxTxD, unembed_DxV, targets_BxT, weights, masks):
  del vocab_chunk
  return _chunked_forward(ids, chunk, hidden_BxTxD, unembed_DxV, targets_BxT, weights,
                          masks)[0]


def _chunked_fwd(ids, chunk, vocab_chunk, hidden_BxTxD, unembed_DxV, targets_BxT, weights,
                 masks):
  del vocab_chunk
  totals, lse_BxT, lse_ref_BxT = _chunked_forward(
      ids, chunk, hidden_BxTxD, unembed_DxV, targets_BxT, weights, masks)
  return totals, (hidden_BxTxD, unembed_DxV, targets_BxT, weights, lse_BxT, lse_ref_BxT)


def _chunked_bwd(ids, chunk, vocab_chunk, residuals, cotangents):
  """d loss / d logits = softmax * (w_mle + w_rto + 2 w_z lse) - w_mle onehot(target)
  - w_rto softmax_within_refusal_set."""
  del chunk
  hidden_BxTxD, unembed_DxV, targets_BxT, weights, lse_BxT, lse_ref_BxT = residuals
  g = cotangents[0]
  w_mle, w_rto, w_z = (g * w for w in weights)
  scale_BxT = w_mle + w_rto + 2.0 * w_z * lse_BxT
  d_hidden_BxTxD, d_unembed_DxV = chunked.vocab_backward(
      ids, vocab_chunk, hidden_BxTxD, unembed_DxV, targets_BxT, w_mle, w_rto, scale_BxT,
      lse_BxT, lse_ref_BxT)
  return (d_hidden_BxTxD, d_unembed_DxV, None, None, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def derta_loss_from_hidden(*, hidden_BxTxD, unembed_DxV, batch, refusal_ids, rto_weight=1.0,
                           normalize="tokens", z_loss=0.0, counts=None, chunk_size=512):
  """`derta_loss(logits_BxTxV=hidden_BxTxD @ unembed_DxV, ...)` without the [B, T, V] logits.

  chunk_size positions of logits exist at a time in the forward pass; the backward pass
  works on blocks of the same size, chunk_size * V / T vocabulary columns for all T
  positions. Any T works (the last chunk overlaps the one before it).
  """
  batch = check_batch(batch)
  _, t, _ = hidden_BxTxD.shape
  v = unembed_DxV.shape[-1]
  chunk, vocab_chunk = chunked.chunk_sizes(t, v, chunk_size)
  ids = refusal_tuple(refusal_ids, v)
  weights = loss_weights(batch=batch, rto_weight=rto_weight, normalize=normalize,
                         z_loss=z_loss, counts=counts)
  masks = tuple(batch[k].astype(jnp.float32) for k in ("mle_mask", "rto_mask"))
  loss, sums = _chunked(ids, chunk, vocab_chunk, hidden_BxTxD, unembed_DxV,
                        batch["targets"].astype(jnp.int32), weights, masks)
  return loss, _metrics(loss, sums, batch)


# ----------------------------------------------------------------------------------------
# RTO keep-rate.


def _rate_fraction(keep_rate: float) -> fractions.Fraction:
  if not 0.0 < keep_rate <= 1.0:
    raise ValueError(f"keep_rate={keep_rate} must be in (0, 1]")
  return fractions.Fraction(keep_rate).limit_denominator(1_000_000)


def rto_keep_mask(*, rto_mask_BxT, keep_rate, seed, step, row_ids_B=None,
                  segment_ids_BxT=None):
  """Keep a random max(1, ceil(keep_rate * n)) of the n RTO positions of every example.

  The draw is a pure function of (seed, step, global row id, position), so every host and
  every resumed run gets the same mask. An example is a row, or one segment of a packed row
  when segment_ids_BxT is given. The authors' 8B run instead keeps ceil(T / 20) random
  positions of the *padded* row (prompt and padding included), so the number of RTO targets
  it keeps varies and can be zero; here exactly ceil(n / 20) of the response positions are
  kept, never fewer than one.
  """
  frac = _rate_fraction(keep_rate)
  if frac == 1:
    return rto_mask_BxT
  b, t = rto_mask_BxT.shape
  row_ids_B = jnp.arange(b) if row_ids_B is None else row_ids_B
  seg_BxT = (jnp.zeros((b, t), jnp.int32) if segment_ids_BxT is None
             else segment_ids_BxT.astype(jnp.int32))
  on_BxT = rto_mask_BxT != 0
  key = jax.random.fold_in(jax.random.key(seed), step)

  def row(row_id, on_T, seg_T):
    row_key = jax.random.fold_in(key, row_id)
    u_T = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(row_key, i)))(jnp.arange(t))
    # Sort RTO positions by (segment, u); the rank inside a segment decides what is kept.
    seg_rank_T = jnp.where(on_T, seg_T.astype(jnp.float32) * 2.0 + u_T, jnp.inf)
    order_T = jnp.argsort(seg_rank_T)
    rank_T = jnp.zeros(t, jnp.int32).at[order_T].set(jnp.arange(t, dtype=jnp.int32))
    n_S = jax.ops.segment_sum(on_T.astype(jnp.int32), seg_T, num_segments=t + 1)
    before_S = jnp.cumsum(n_S) - n_S
    n_T, before_T = n_S[seg_T], before_S[seg_T]
    keep_T = jnp.maximum(1, (n_T * frac.numerator + frac.denominator - 1) // frac.denominator)
    return on_T & (rank_T - before_T < keep_T)

  kept = jax.vmap(row)(row_ids_B, on_BxT, seg_BxT)
  return kept.astype(rto_mask_BxT.dtype)
