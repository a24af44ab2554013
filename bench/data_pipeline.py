"""Data pipeline throughput on one core; prints one JSON line.

A synthetic DeRTa mix with the paper's proportions (helpful data, 3,000 RTO, 3,000
prefix-MLE) and LLaMA-3's tokenizer (from the llama-models package): build epoch 0
(recipe, tokenize, fit, pack at seq 1024) and every global batch of it, pinned to one core.
Reports packed rows/s and tokens/s (real tokens, padding excluded) and the packing
efficiency (non-padding fraction of the rows).

  python bench/data_pipeline.py [--helpful 12000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np

from derta_jax import data
from derta_jax.data import pipeline

WORDS = ("the a of to and in is that for it with as was on be by this are or from at an "
         "which have but not can will more one all their there been if would when about "
         "step first then use water plan tool system data write explain because however "
         "example result people time year way day make know take see come think look want "
         "give good new long great little own other old right big high different small large "
         "next early young important few public bad same able").split()


def _text(rng, n):
  words = rng.choice(WORDS, n)
  ends = rng.random(n) < 0.08
  return " ".join(w + "." if e else w for w, e in zip(words, ends, strict=True))


def _sources(n_helpful, n_triples, seed=0):
  rng = np.random.default_rng(seed)
  helpful = [data.Helpful(_text(rng, int(rng.integers(8, 40))),
                          _text(rng, int(rng.lognormal(5.0, 0.7)))) for _ in range(n_helpful)]
  triples = [data.Triple(_text(rng, int(rng.integers(8, 30))),
                         _text(rng, int(rng.lognormal(4.5, 0.6))),
                         "I'm sorry, I cannot help with that. " + _text(rng, 30))
             for _ in range(n_triples)]
  return helpful, triples


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--helpful", type=int, default=12000)
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--global-batch", type=int, default=128)
  args = parser.parse_args()
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  spec = importlib.util.find_spec("llama_models")
  if spec is None:
    raise SystemExit("pip install llama-models==0.3.0 (it ships the LLaMA-3 tokenizer file)")
  tokenizer = data.load_tokenizer(os.path.join(os.path.dirname(spec.origin), "llama3",
                                               "tokenizer.model"))
  helpful, triples = _sources(args.helpful, 3000)

  start = time.perf_counter()
  recipe = data.build_recipe("derta", triples=triples, helpful=helpful, seed=0, epoch=0)
  pipe = pipeline.Pipeline(recipe, tokenizer, seq_len=args.seq_len,
                           global_batch=args.global_batch, seed=0, refusal_ids=19701,
                           process_index=0, process_count=1)
  steps = pipe.steps_in_epoch(0)
  real = 0
  for step in range(steps):
    real += int((pipe.batch(step)["segment_ids"] > 0).sum())
  seconds = time.perf_counter() - start
  rows = steps * args.global_batch
  stats = pipe.epoch(0).stats
  print(json.dumps(dict(
      examples=len(recipe), seq_len=args.seq_len, global_batch=args.global_batch, steps=steps,
      rows=rows, seconds=round(seconds, 3), rows_per_s=round(rows / seconds, 1),
      tokens_per_s=round(real / seconds), packing_efficiency=round(real / (rows * args.seq_len), 4),
      dropped_rows=stats.rows - rows, truncated=stats.harmful_prefix_shortened
      + stats.response_truncated + stats.prompt_truncated, cores=1)))


if __name__ == "__main__":
  main()
