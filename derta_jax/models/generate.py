"""Batched decoding with a KV cache: one prefill, then a jitted decode loop.

Prompts of different lengths share a batch left-padded to a length bucket: row b's tokens
sit at cache slots [start_b, P), its positions count from 0 at start_b, and no query sees
a slot before start_b. A batch compiles once per (rows, bucket, max_new_tokens).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from derta_jax.models import llama


def generate(model: llama.Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | Sequence[int] | None = None, batch_size: int | None = None,
             bucket: int = 64) -> list[list[int]]:
  """New tokens for each prompt (token-id lists, BOS included), up to and including EOS.

  Greedy when `temperature` is 0, else nucleus sampling (`top_p`) at that temperature.
  Sampling keys are fold_in(seed, prompt index, step), so a prompt's sample does not
  depend on the batch it lands in. `eos_id` None = model.config.eos_ids; () never stops.
  """
  vocab = model.config.vocab_size
  _check(prompts, vocab, max_new_tokens, temperature, top_p, batch_size, bucket)
  if eos_id is None:
    eos = tuple(model.config.eos_ids)
  else:
    eos = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id)
  eos = tuple(int(e) for e in eos)
  if not prompts:
    return []
  rows = batch_size or min(len(prompts), 32)
  # Longest first, so each batch pads to a similar length; results go back in order.
  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
  graphdef, state = nnx.split(model)
  results: list[list[int]] = [[] for _ in prompts]
  for first in range(0, len(order), rows):
    ids = order[first:first + rows]
    width = -(-max(len(prompts[i]) for i in ids) // bucket) * bucket
    tokens_BxP = np.zeros((rows, width), np.int32)
    starts_B = np.full((rows,), width - 1, np.int32)
    row_ids_B = np.zeros((rows,), np.int32)
    for r, i in enumerate(ids):
      tokens_BxP[r, width - len(prompts[i]):] = prompts[i]
      starts_B[r] = width - len(prompts[i])
      row_ids_B[r] = i
    out_BxN, steps = _decode(graphdef, state, jnp.asarray(tokens_BxP), jnp.asarray(starts_B),
                             jnp.asarray(row_ids_B), jnp.int32(seed),
                             max_new_tokens=max_new_tokens, temperature=float(temperature),
                             top_p=float(top_p), eos=eos)
    out_BxN = np.asarray(out_BxN)[:, :int(steps)]
    for r, i in enumerate(ids):
      results[i] = _until_eos(out_BxN[r].tolist(), eos)
  return results


def _until_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
  for n, tok in enumerate(tokens):
    if tok in eos:
      return tokens[:n + 1]
  return tokens


def _check(prompts, vocab, max_new_tokens, temperature, top_p, batch_size, bucket):
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  if not temperature >= 0.0:
    raise ValueError(f"temperature must be >= 0, got {temperature!r}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
  if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
    raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
  if not isinstance(bucket, int) or bucket < 1:
    raise ValueError(f"bucket must be an int >= 1, got {bucket!r}")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
    bad = [t for t in p if not 0 <= int(t) < vocab]
    if bad:
      raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {vocab})")


def _next_token(logits_BxV, keys_B, temperature: float, top_p: float):
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_p < 1.0:
    # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_B = jnp.sum(before_BxV < top_p, axis=-1)
    cutoff_B = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < cutoff_B, -jnp.inf, logits_BxV)
  return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_p", "eos"))
def _decode(graphdef, state, tokens_BxP, starts_B, row_ids_B, seed, *, max_new_tokens: int,
            temperature: float, top_p: float, eos: tuple[int, ...]):
  """(new tokens [B, max_new_tokens], steps run); rows past EOS hold EOS-padding junk."""
  model = nnx.merge(graphdef, state)
  b, p = tokens_BxP.shape
  slots_S = jnp.arange(p + max_new_tokens)
  visible_BxS = slots_S[None] >= starts_B[:, None]
  unembed_DxV = model.unembed_DxV().astype(model.config.compute_dtype)
  base_key = jax.random.key(seed)
  row_keys_B = jax.vmap(lambda r: jax.random.fold_in(base_key, r))(row_ids_B)
  eos_E = jnp.asarray(eos if eos else (-1,), jnp.int32)

  def logits(hidden_BxD):
    return jnp.einsum("BD,DV->BV", hidden_BxD, unembed_DxV, preferred_element_type=jnp.float32)

  def pick(logits_BxV, step):
    keys_B = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys_B)
    return _next_token(logits_BxV, keys_B, temperature, top_p)

  positions_BxP = jnp.maximum(jnp.arange(p)[None] - starts_B[:, None], 0)
  mask_BxPxS = (slots_S[None, None] <= jnp.arange(p)[None, :, None]) & visible_BxS[:, None]
  hidden_BxPxD, cache = model.decode(tokens_BxP, positions_BxP, mask_BxPxS,
                                     model.init_cache(b, p + max_new_tokens), 0)
  token_B = pick(logits(hidden_BxPxD[:, -1]), 0)
  out_BxN = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(token_B)
  done_B = jnp.isin(token_B, eos_E)

  def cond(carry):
    step, _, done_B, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    step, token_B, done_B, out_BxN, cache = carry
    slot = p + step - 1  # where the previous step's token goes
    mask_Bx1xS = ((slots_S[None] <= slot) & visible_BxS)[:, None]
    hidden_Bx1xD, cache = model.decode(token_B[:, None], (slot - starts_B)[:, None],
                                       mask_Bx1xS, cache, slot)
    new_B = jnp.where(done_B, token_B, pick(logits(hidden_Bx1xD[:, 0]), step))
    out_BxN = out_BxN.at[:, step].set(new_B)
    return step + 1, new_B, done_B | jnp.isin(new_B, eos_E), out_BxN, cache

  steps, _, _, out_BxN, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), token_B, done_B, out_BxN, cache))
  return out_BxN, steps
