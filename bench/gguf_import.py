"""A GGUF LLaMA file through derta_jax vs transformers' own GGUF loading, CPU, fp32.

  python bench/gguf_import.py --gguf=PATH [--prompts 3]

Loads the file both ways (weights and tokenizer, timed), then prints one JSON line: the max
abs logit difference over --prompts ChatML chat prompts (rendered by transformers' tokenizer
from the file's chat template), the greedy agreement per prompt (tokens before the first
difference / 64, EOS ignored), and tokenizer agreement on a few hundred mixed strings: with
transformers as it loads the file, and with its pre-tokenizer given the digit split that
llama.cpp applies for `tokenizer.ggml.pre` values like "smollm" and transformers leaves out.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from gguf_files import CHATS, mixed_strings  # noqa: E402

from derta_jax.checkpoints import hf  # noqa: E402
from derta_jax.data import gguf_vocab, load_tokenizer  # noqa: E402
from derta_jax.models import generate as gen  # noqa: E402

NEW_TOKENS = 64
QUESTIONS = ("Explain how a bicycle works.", "Give me three tips for sleeping better.",
             "What is 17 times 23? Show your steps.", "Write a haiku about autumn rain.",
             "How do I make a cup of green tea?", "Summarise the plot of Hamlet.",
             "Why is the sky blue?", "List five animals that live in the ocean.")


def chats(n):
  """The test chats first, then one-turn questions."""
  extra = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
           for i in range(max(0, n - len(CHATS)))]
  return [*CHATS, *extra][:n]


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def common_prefix(a, b):
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gguf", required=True, help="a LLaMA GGUF file")
  parser.add_argument("--prompts", type=int, default=3)
  parser.add_argument("--strings", type=int, default=300)
  args = parser.parse_args()
  path = Path(args.gguf)
  # A second torch thread only waits on a busy small machine; one is fastest and steady.
  torch.set_num_threads(1)

  ours, ours_model_s = timed(lambda: hf.load_hf(path))
  tok, ours_tok_s = timed(lambda: load_tokenizer(path))
  ref, ref_model_s = timed(lambda: AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32).eval())
  ref_tok, ref_tok_s = timed(lambda: AutoTokenizer.from_pretrained(path.parent,
                                                                   gguf_file=path.name))

  prompts = [ref_tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                         return_dict=False) for m in chats(args.prompts)]
  width = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), width), np.int64)
  valid = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    ids[i, :len(p)], valid[i, :len(p)] = p, True
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64)))
  got = nnx.jit(lambda m, i, s: m(i, segment_ids_BxT=s))(
      ours, jnp.asarray(ids, jnp.int32), jnp.asarray(valid.astype(np.int32)))
  logit_diff = float(np.abs(np.asarray(got) - want.logits.float().numpy())[valid].max())

  ours_new = gen.generate(ours, prompts, max_new_tokens=NEW_TOKENS, eos_id=())
  agreement = []
  for p, new in zip(prompts, ours_new, strict=True):
    x = torch.tensor([p])
    with torch.no_grad():
      out = ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=NEW_TOKENS, eos_token_id=None,
                         pad_token_id=tok.pad_id)
    agreement.append(common_prefix(new, out[0, len(p):].tolist()) / NEW_TOKENS)

  strings = mixed_strings(args.strings)
  pre = gguf_vocab.read_metadata(path).get("tokenizer.ggml.pre", "default")
  split = Tokenizer.from_str(ref_tok.backend_tokenizer.to_str())
  if gguf_vocab.PRE_TOKENIZERS.get(pre, (False,))[0]:
    split.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), split.pre_tokenizer])
  ours_ids = [tok.encode(s) for s in strings]
  raw_same = sum(a == ref_tok.encode(s, add_special_tokens=False)
                 for a, s in zip(ours_ids, strings, strict=True))
  split_same = sum(a == split.encode(s, add_special_tokens=False).ids
                   for a, s in zip(ours_ids, strings, strict=True))

  print(json.dumps({
      "bench": "gguf_import", "gguf": path.name, "tokenizer_pre": pre,
      "prompts": len(prompts), "max_abs_logit_diff": float(f"{logit_diff:.3g}"),
      "greedy_new_tokens": NEW_TOKENS, "greedy_agreement": agreement,
      "tokenizer_strings": len(strings),
      "tokenizer_agreement": round(raw_same / len(strings), 4),
      "tokenizer_agreement_digit_split": round(split_same / len(strings), 4),
      "load_s_ours": {"model": round(ours_model_s, 2), "tokenizer": round(ours_tok_s, 2)},
      "load_s_transformers": {"model": round(ref_model_s, 2), "tokenizer": round(ref_tok_s, 2)},
      "torch_threads": torch.get_num_threads(),
  }))


if __name__ == "__main__":
  main()
