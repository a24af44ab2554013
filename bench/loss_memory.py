"""Memory and speed of the chunked DeRTa loss against full logits; prints one JSON line.

Memory: XLA's compiled memory analysis (temporary bytes) of loss + gradient w.r.t. hidden
states and unembedding, at LLaMA-3-8B's vocabulary and width over one 8k sequence. Nothing
runs: the two programs are only compiled, so the figures are exact and repeatable.
Speed: CPU wall time of the same two programs at a size that runs in seconds, interleaved
repeats, medians.

  python bench/loss_memory.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from derta_jax import losses

REFUSAL_ID = 19701


def _programs(chunk_size):
  def naive(hidden_BxTxD, unembed_DxV, batch):
    logits_BxTxV = jnp.einsum("btd,dv->btv", hidden_BxTxD, unembed_DxV,
                              preferred_element_type=jnp.float32)
    return losses.derta_loss(logits_BxTxV=logits_BxTxV, batch=batch, refusal_ids=REFUSAL_ID)[0]

  def chunked(hidden_BxTxD, unembed_DxV, batch):
    return losses.derta_loss_from_hidden(hidden_BxTxD=hidden_BxTxD, unembed_DxV=unembed_DxV,
                                         batch=batch, refusal_ids=REFUSAL_ID,
                                         chunk_size=chunk_size)[0]

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # noqa: E731
  return grad(naive), grad(chunked)


def _abstract(b, t, d, v):
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  return (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          dict(targets=tokens, mle_mask=tokens, rto_mask=tokens))


def _concrete(b, t, d, v, seed=0):
  rng = np.random.default_rng(seed)
  kind_BxT = rng.integers(0, 3, (b, t))  # 0 prompt/padding, 1 MLE, 2 RTO
  batch = dict(targets=jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
               mle_mask=jnp.asarray(kind_BxT == 1, jnp.int32),
               rto_mask=jnp.asarray(kind_BxT == 2, jnp.int32))
  return (jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32), batch)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chunk-size", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  naive, chunked = _programs(args.chunk_size)

  b, t, d, v = 1, 8192, 4096, 128256
  temp = {name: f.lower(*_abstract(b, t, d, v)).compile().memory_analysis().temp_size_in_bytes
          for name, f in (("naive", naive), ("chunked", chunked))}

  tb, tt, td, tv = 2, 1024, 256, 32000
  inputs = _concrete(tb, tt, td, tv)
  outs = [jax.block_until_ready(f(*inputs)) for f in (naive, chunked)]
  loss_diff = abs(float(outs[0][0]) - float(outs[1][0]))
  grad_diff = max(float(jnp.max(jnp.abs(a - c)) / jnp.max(jnp.abs(a)))
                  for a, c in zip(outs[0][1], outs[1][1], strict=True))
  seconds = {"naive": [], "chunked": []}
  for _ in range(args.repeats):
    for name, f in (("naive", naive), ("chunked", chunked)):
      start = time.perf_counter()
      jax.block_until_ready(f(*inputs))
      seconds[name].append(time.perf_counter() - start)
  median = {k: statistics.median(s) for k, s in seconds.items()}
  print(json.dumps(dict(
      vocab=v, seq_len=t, d_model=d, batch=b, dtype="float32", chunk_size=args.chunk_size,
      naive_temp_bytes=temp["naive"], chunked_temp_bytes=temp["chunked"],
      ratio=round(temp["chunked"] / temp["naive"], 4),
      time_shape=dict(batch=tb, seq_len=tt, d_model=td, vocab=tv),
      naive_seconds=round(median["naive"], 4), chunked_seconds=round(median["chunked"], 4),
      time_ratio=round(median["chunked"] / median["naive"], 3),
      loss_abs_diff=loss_diff, grad_max_rel_diff=grad_diff, repeats=args.repeats,
      backend=jax.default_backend())))


if __name__ == "__main__":
  main()
