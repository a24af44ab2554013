"""The chunked output layer: logits of a block of positions (forward) or of vocabulary
columns (backward) at a time, so the [B, T, V] logits never exist.

The forward pass scans over sequence chunks and keeps a few numbers per position. The
backward pass scans over vocabulary chunks: each recomputes its columns of the logits for
every position, applies the closed-form gradient, writes its own columns of d_unembed once
(no [D, V] accumulator) and adds into d_hidden. A chunk count that does not divide the axis
is handled by clamping the last chunk's start, so nothing is padded or copied; the overlap
is masked where it would count twice.

Legend: B batch, T tokens, C chunk, D model width, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def chunk_starts(n: int, chunk: int):
  """(clamped start, nominal start) of every chunk of `chunk` along an axis of size n."""
  nominal = np.arange(-(-n // chunk)) * chunk
  return jnp.asarray(np.minimum(nominal, n - chunk)), jnp.asarray(nominal)


def chunk_sizes(t: int, v: int, chunk_size: int) -> tuple[int, int]:
  """(positions per forward chunk, vocabulary columns per backward chunk)."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1")
  chunk = min(chunk_size, t)
  return chunk, min(v, max(1, -(-chunk * v // t)))


def vocab_backward(ids, vocab_chunk, hidden_BxTxD, unembed_DxV, targets_BxT, w_mle, w_rto,
                    scale_BxT, lse_BxT, lse_ref_BxT):
  """(d hidden, d unembed) of d loss / d logits = softmax * scale - w_mle onehot(target)
  - w_rto softmax_within_refusal_set, scanned over vocabulary chunks."""
  columns_C = jnp.arange(vocab_chunk)

  def body(carry, starts):
    d_hidden_BxTxD, d_unembed_DxV = carry
    start, nominal = starts
    u_DxC = jax.lax.dynamic_slice_in_dim(unembed_DxV, start, vocab_chunk, axis=1)
    logits_BxTxC = jnp.einsum("btd,dc->btc", hidden_BxTxD, u_DxC,
                              preferred_element_type=jnp.float32)
    vocab_C = start + columns_C
    d_BxTxC = jnp.exp(logits_BxTxC - lse_BxT[..., None]) * scale_BxT[..., None]
    d_BxTxC -= jnp.where(vocab_C == targets_BxT[..., None], w_mle[..., None], 0.0)
    if ids:
      refusal_C = functools.reduce(jnp.logical_or, [vocab_C == r for r in ids])
      d_BxTxC -= jnp.where(refusal_C, w_rto[..., None]
                           * jnp.exp(logits_BxTxC - lse_ref_BxT[..., None]), 0.0)
    d_BxTxC = d_BxTxC.astype(unembed_DxV.dtype)
    # Every column's gradient is complete within its chunk, so the overlap of a clamped
    # last chunk rewrites equal values; d_hidden must count each column once.
    d_unembed_DxC = jnp.einsum("btd,btc->dc", hidden_BxTxD, d_BxTxC,
                               preferred_element_type=jnp.float32)
    d_unembed_DxV = jax.lax.dynamic_update_slice_in_dim(
        d_unembed_DxV, d_unembed_DxC.astype(unembed_DxV.dtype), start, axis=1)
    fresh_DxC = jnp.where(vocab_C >= nominal, u_DxC, 0)
    d_hidden_BxTxD += jnp.einsum("btc,dc->btd", d_BxTxC, fresh_DxC,
                                 preferred_element_type=jnp.float32)
    return (d_hidden_BxTxD, d_unembed_DxV), None

  init = (jnp.zeros(hidden_BxTxD.shape, jnp.float32), jnp.zeros_like(unembed_DxV))
  d_hidden_BxTxD, d_unembed_DxV = jax.lax.scan(
      body, init, chunk_starts(unembed_DxV.shape[1], vocab_chunk))[0]
  return d_hidden_BxTxD.astype(hidden_BxTxD.dtype), d_unembed_DxV


# Per-position log-probs from hidden states, for objectives that are not a weighted sum of
# token losses (DPO, NPO, Qi et al.'s constraint): the same chunking, with the cotangent of
# every position's log-prob as that position's MLE weight in the backward pass.


def _logprob_forward(chunk, hidden_BxTxD, unembed_DxV, targets_BxT):
  """(log-prob of the target, logsumexp) per position, chunk positions of logits at a time."""
  b, t, _ = hidden_BxTxD.shape

  def body(carry, starts):
    start, _ = starts
    logp_BxT, lse_BxT = carry
    h_BxCxD = jax.lax.dynamic_slice_in_dim(hidden_BxTxD, start, chunk, axis=1)
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, unembed_DxV,
                              preferred_element_type=jnp.float32)
    targets_BxC = jax.lax.dynamic_slice_in_dim(targets_BxT, start, chunk, axis=1)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    picked_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    # A clamped last chunk rewrites the overlap with the same values.
    logp_BxT = jax.lax.dynamic_update_slice_in_dim(logp_BxT, picked_BxC - lse_BxC, start, 1)
    lse_BxT = jax.lax.dynamic_update_slice_in_dim(lse_BxT, lse_BxC, start, 1)
    return (logp_BxT, lse_BxT), None

  empty_BxT = jnp.zeros((b, t), jnp.float32)
  return jax.lax.scan(body, (empty_BxT, empty_BxT), chunk_starts(t, chunk))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_logprobs(chunk, vocab_chunk, hidden_BxTxD, unembed_DxV, targets_BxT):
  del vocab_chunk
  return _logprob_forward(chunk, hidden_BxTxD, unembed_DxV, targets_BxT)[0]


def _chunked_logprobs_fwd(chunk, vocab_chunk, hidden_BxTxD, unembed_DxV, targets_BxT):
  del vocab_chunk
  logp_BxT, lse_BxT = _logprob_forward(chunk, hidden_BxTxD, unembed_DxV, targets_BxT)
  return logp_BxT, (hidden_BxTxD, unembed_DxV, targets_BxT, lse_BxT)


def _chunked_logprobs_bwd(chunk, vocab_chunk, residuals, ct_BxT):
  """d / d logits of sum(ct * logp) = ct * (onehot(target) - softmax)."""
  del chunk
  hidden_BxTxD, unembed_DxV, targets_BxT, lse_BxT = residuals
  w_BxT = -ct_BxT.astype(jnp.float32)
  d_hidden_BxTxD, d_unembed_DxV = vocab_backward(
      (), vocab_chunk, hidden_BxTxD, unembed_DxV, targets_BxT, w_BxT, None, w_BxT, lse_BxT,
      None)
  return d_hidden_BxTxD, d_unembed_DxV, None


_chunked_logprobs.defvjp(_chunked_logprobs_fwd, _chunked_logprobs_bwd)


def token_logprobs_from_hidden(*, hidden_BxTxD, unembed_DxV, targets_BxT, chunk_size=512):
  """`token_logprobs(logits_BxTxV=hidden_BxTxD @ unembed_DxV, ...)` (fp32) without the
  [B, T, V] logits, differentiable in hidden and unembed; chunking as in
  `derta_loss_from_hidden`."""
  _, t, _ = hidden_BxTxD.shape
  chunk, vocab_chunk = chunk_sizes(t, unembed_DxV.shape[-1], chunk_size)
  return _chunked_logprobs(chunk, vocab_chunk, hidden_BxTxD, unembed_DxV,
                           targets_BxT.astype(jnp.int32))
