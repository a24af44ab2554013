"""The tokenizer a GGUF file describes (`tokenizer.ggml.*`) as a `tokenizers` BPE tokenizer.

llama.cpp stores a byte-level BPE vocabulary (`tokenizer.ggml.model` "gpt2") as its tokens
in the GPT-2 byte alphabet, the merges as "left right" strings, a type per token (3: control,
4: user-defined) and the name of the pre-tokenizer split it was trained with
(`tokenizer.ggml.pre`); `tokenizer.chat_template` is the model's jinja chat template.
"""

from __future__ import annotations

import os

from derta_jax.data.records import DataError

CONTROL, USER_DEFINED = 3, 4
# GPT-2's split, and the LLaMA-3 one (the cl100k-style pattern).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split digits one by one first, the split pattern); as llama.cpp's
# vocabulary loader groups them.
PRE_TOKENIZERS = {
    "default": (False, _GPT2_SPLIT), "gpt2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT), "starcoder": (True, _GPT2_SPLIT),
    "refact": (True, _GPT2_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT), "llama-v3": (False, _LLAMA3_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT), "smaug-bpe": (False, _LLAMA3_SPLIT),
}


def read_metadata(path: str | os.PathLike) -> dict:
  """The `tokenizer.*` metadata of a GGUF file."""
  import gguf

  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError / struct errors on a bad header
    raise DataError(f"{path}: not a readable GGUF file ({e})") from None
  return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _field(meta: dict, path, key: str):
  if key not in meta:
    raise DataError(f"{path}: GGUF metadata key {key} is missing")
  return meta[key]


def build(path: str | os.PathLike):
  """A `transformers.PreTrainedTokenizerFast` over the file's vocabulary, with its special
  tokens and chat template."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  meta = read_metadata(path)
  kind = _field(meta, path, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise DataError(f"{path}: tokenizer.ggml.model={kind!r} is not supported; derta_jax reads "
                    "byte-level BPE vocabularies ('gpt2'); convert the tokenizer to an HF "
                    "directory and pass it as data.tokenizer_path")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise DataError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported; known: "
                    f"{sorted(PRE_TOKENIZERS)}")
  tokens = list(_field(meta, path, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ")) for m in _field(meta, path, "tokenizer.ggml.merges")]
  bad = next((m for m in merges if len(m) != 2), None)
  if bad is not None:
    raise DataError(f"{path}: tokenizer.ggml.merges holds {' '.join(bad)!r}, not 'left right'")
  types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=False))
  digits, split = PRE_TOKENIZERS[pre]
  steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
  steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
  tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, k in zip(tokens, types, strict=True) if k == CONTROL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED])

  def token(key):
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=token("bos"), eos_token=token("eos"),
      unk_token=token("unknown"), pad_token=token("padding"),
      chat_template=meta.get("tokenizer.chat_template"),
      add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
      clean_up_tokenization_spaces=False)
