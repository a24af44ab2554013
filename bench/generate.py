"""Greedy decode tokens/s: derta_jax.generate vs transformers' `generate`, CPU, one run.

  python bench/generate.py [--batch 8 --prompt 64 --new 64 --repeats 5]

Same weights (the HF model is saved and loaded with `load_hf`), fp32, a batch of prompts
of equal length (so transformers needs no padding), EOS disabled so both decode exactly
--new tokens per row. Checks the two outputs are equal token for token, then prints one
JSON line: new tokens/s of each (medians, interleaved repeats after a warm-up, compile
excluded) and the ratio ours / reference.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))

from model_forward import median_seconds  # noqa: E402

import derta_jax  # noqa: E402
from derta_jax.models import generate as gen  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
             bos_token_id=1, eos_token_id=2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  torch.manual_seed(0)
  ref = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp)
    ours = derta_jax.load_hf(tmp)
  rng = np.random.RandomState(0)
  prompts = rng.randint(3, SHAPE["vocab_size"], (args.batch, args.prompt))
  prompts[:, 0] = 1
  ids_torch = torch.tensor(prompts)

  def run_ours():
    return gen.generate(ours, prompts.tolist(), max_new_tokens=args.new, eos_id=())

  def run_ref():
    with torch.no_grad():
      # eos_token_id=-1 never matches: decode --new tokens like ours.
      out = ref.generate(ids_torch, attention_mask=torch.ones_like(ids_torch),
                         max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                         eos_token_id=-1, pad_token_id=0)
    return out[:, args.prompt:].tolist()

  same = run_ours() == run_ref()  # also the warm-up (compiles ours)
  ours_s, ref_s = median_seconds([run_ours, run_ref], args.repeats)
  new_tokens = args.batch * args.new
  print(json.dumps({
      "bench": "generate", "batch": args.batch, "prompt_len": args.prompt,
      "new_tokens": args.new, "layers": SHAPE["num_hidden_layers"],
      "d_model": SHAPE["hidden_size"], "vocab": SHAPE["vocab_size"], "dtype": "float32",
      "torch_threads": torch.get_num_threads(), "outputs_equal": same,
      "ours_tokens_per_s": round(new_tokens / ours_s, 1),
      "reference_tokens_per_s": round(new_tokens / ref_s, 1),
      "ratio": round(ref_s / ours_s, 3), "repeats": args.repeats,
  }))


if __name__ == "__main__":
  main()
