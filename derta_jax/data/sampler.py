"""Harmful-prefix lengths k as a pure, vectorised function of (seed, epoch, example ids).

Each example's draw uses its own key, fold_in(fold_in(key(seed), epoch), example_id), so
k does not depend on the order, the number or the host of the other examples, and every
epoch draws afresh (unless `static`, which reproduces a one-shot cut like the authors').
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("official_word", "token", "fixed")


@jax.jit
def _randint(key, example_ids_N, low_N, high_N):
  """One integer in [low, high] (inclusive) per example."""
  keys_N = jax.vmap(jax.random.fold_in, (None, 0))(key, example_ids_N)
  return jax.vmap(lambda k, lo, hi: jax.random.randint(k, (), lo, hi + 1))(keys_N, low_N, high_N)


@jax.jit
def _uniform(key, example_ids_N):
  keys_N = jax.vmap(jax.random.fold_in, (None, 0))(key, example_ids_N)
  return jax.vmap(lambda k: jax.random.uniform(k, ()))(keys_N)


def sample_prefix_lengths(lengths: Sequence[int], *, seed: int, epoch: int = 0,
                          example_ids: Sequence[int] | None = None, mode: str = "official_word",
                          p: float = 2 / 3, max_k: int | None = None,
                          fixed: Sequence[int] | None = None, static: bool = False) -> np.ndarray:
  """Prefix length k per example, in the units of `lengths` (words or tokens).

  official_word (the authors' script): lengths are word counts n of output.split(" ");
    k = 0 when example_id % 3 == 0, else k ~ U[1, n - 2]. The authors skip examples with
    n < 3 (randint fails), which shifts their lists out of alignment; here they get k = 0.
  token: k ~ U[1, min(max_k, n)] with probability p, else 0 (n = 0 gives 0).
  fixed: the given k's (evaluation), checked against the lengths.
  static: ignore the epoch, so every epoch sees the same cut.
  """
  lengths_N = np.asarray(lengths, np.int64)
  n = len(lengths_N)
  ids_N = np.arange(n) if example_ids is None else np.asarray(example_ids, np.int64)
  if ids_N.shape != (n,):
    raise ValueError(f"example_ids has shape {ids_N.shape}, lengths has {n} entries")
  if n and lengths_N.min() < 0:
    raise ValueError(f"lengths must be >= 0, got {lengths_N.min()}")
  if mode == "fixed":
    if fixed is None:
      raise ValueError('mode="fixed" needs fixed=[k, ...]')
    k_N = np.asarray(fixed, np.int64)
    if k_N.shape != (n,) or (n and (k_N.min() < 0 or np.any(k_N > lengths_N))):
      raise ValueError(f"fixed k's must be {n} values in [0, length]")
    return k_N
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; choose one of {MODES}")
  if n == 0:
    return np.zeros(0, np.int64)
  key = jax.random.fold_in(jax.random.key(seed), 0 if static else epoch)
  ids = jnp.asarray(ids_N, jnp.uint32)
  if mode == "official_word":
    high_N = np.maximum(lengths_N - 2, 1)
    k_N = np.asarray(_randint(key, ids, jnp.ones(n, jnp.int32), jnp.asarray(high_N, jnp.int32)))
    k_N = np.where((ids_N % 3 == 0) | (lengths_N < 3), 0, k_N)
    return k_N.astype(np.int64)
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p={p} must be in [0, 1]")
  high_N = lengths_N if max_k is None else np.minimum(lengths_N, max_k)
  draw_key, keep_key = jax.random.split(key)
  k_N = np.asarray(_randint(draw_key, ids, jnp.ones(n, jnp.int32),
                            jnp.asarray(np.maximum(high_N, 1), jnp.int32)))
  cut_N = np.asarray(_uniform(keep_key, ids)) < p
  return np.where(cut_N & (high_N >= 1), k_N, 0).astype(np.int64)
