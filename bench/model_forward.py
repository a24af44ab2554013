"""Forward tokens/s: derta_jax (jit, XLA CPU) vs transformers' PyTorch LlamaForCausalLM.

  python bench/model_forward.py [--repeats 7]

Same weights (the HF model is saved and loaded with `load_hf`), fp32, CPU, one run;
prints one JSON line with both medians and the ratio (ours / reference).
"""

import argparse
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

import derta_jax

SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)


def median_seconds(fns, repeats):
  """Median wall time of each function, interleaved so machine noise hits both alike."""
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, ts in zip(fns, times, strict=True):
      start = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - start)
  return [statistics.median(ts) for ts in times]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()

  torch.manual_seed(0)
  ref = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp)
    ours = derta_jax.load_hf(tmp)
  ids = np.random.RandomState(0).randint(0, SHAPE["vocab_size"], (args.batch, args.seq))
  ids_jax, ids_torch = jnp.asarray(ids), torch.tensor(ids)

  forward = nnx.jit(lambda m, x: m(x))

  def run_ours():
    return forward(ours, ids_jax).block_until_ready()

  def run_ref():
    with torch.no_grad():
      return ref(ids_torch).logits

  # The first calls are the warm-up (and JAX's compilation).
  max_diff = float(np.abs(np.asarray(run_ours()) - run_ref().numpy()).max())
  t_ours, t_ref = median_seconds([run_ours, run_ref], args.repeats)
  tokens = args.batch * args.seq
  print(json.dumps({
      "bench": "model_forward", "batch": args.batch, "seq": args.seq, "dtype": "float32",
      "layers": SHAPE["num_hidden_layers"], "d_model": SHAPE["hidden_size"],
      "vocab": SHAPE["vocab_size"], "repeats": args.repeats,
      "ours_tokens_per_s": round(tokens / t_ours, 1),
      "transformers_tokens_per_s": round(tokens / t_ref, 1),
      "ratio": round(t_ref / t_ours, 3), "max_abs_logit_diff": max_diff,
      "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
      "reference_attention": ref.config._attn_implementation,
  }))


if __name__ == "__main__":
  main()
