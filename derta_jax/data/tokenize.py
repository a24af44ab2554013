"""Tokenizers (HF directory, GGUF file or LLaMA-3 tiktoken file) and refusal ids.

An example is tokenized part by part (`derta_jax.data.packing`), so the boundary between
input and target is exact. The authors instead tokenize prefix + text as one string and
mask the first len(tokenize(prefix)) labels; the two agree unless a token spans the
boundary (e.g. a prefix ending in a space before a text starting with one):
`upstream_boundary_differs` finds those rows.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import Sequence

from derta_jax.data import gguf_vocab
from derta_jax.data.records import DataError

# The LLaMA-3 pre-tokenizer split (the cl100k-style pattern Meta's tokenizer uses).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>", "<|image|>")
class Tokenizer:
  """The interface the pipeline uses: text <-> ids with special-token strings recognised."""

  bos_id: int
  eos_id: int
  pad_id: int
  vocab_size: int
  path: str  # where it was read from

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def vocabulary(self) -> dict[str, int]:
    """token -> id, special tokens included."""
    raise NotImplementedError

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the tokenizer's files into `directory` (e.g. next to an exported model)."""
    raise NotImplementedError

  def fingerprint(self) -> str:
    """sha256 of the vocabulary: equal for tokenizers that map text to the same ids."""
    items = sorted(self.vocabulary().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items).encode("utf-8")).hexdigest()

  @property
  def unk_id(self) -> int | None:
    """The id of the unknown token, or None when every text has its own tokens."""
    return None

  @property
  def chat_template(self) -> str | None:
    """The model's jinja chat template (HF `tokenizer_config.json` or GGUF metadata)."""
    return None

  def render_chat(self, messages: Sequence[dict], *, generation_prompt: bool) -> str:
    """`messages` rendered as text by the chat template."""
    raise DataError(f"{self.path}: this tokenizer has no chat template")


class TiktokenTokenizer(Tokenizer):
  """A LLaMA-3 `tokenizer.model` (base64 token, rank per line) read with tiktoken."""

  def __init__(self, path: str | os.PathLike):
    import tiktoken

    ranks = {}
    with open(path, "rb") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          token, rank = line.split()
          ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
          raise DataError(f"{path}:{number}: not a tiktoken 'base64 rank' line ({e})") from None
    special = list(LLAMA3_SPECIAL) + [f"<|reserved_special_token_{i}|>" for i in
                                      range(2, LLAMA3_NUM_SPECIAL - len(LLAMA3_SPECIAL) + 2)]
    self.special = {name: len(ranks) + i for i, name in enumerate(special)}
    self._ranks, self.path = ranks, os.fspath(path)
    self._enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN,
                                  mergeable_ranks=ranks, special_tokens=self.special)
    self.bos_id = self.special["<|begin_of_text|>"]
    self.eos_id = self.special["<|end_of_text|>"]
    self.pad_id = self.special["<|finetune_right_pad_id|>"]
    self.vocab_size = len(ranks) + len(special)

  def encode(self, text):
    return self._enc.encode(text, allowed_special="all", disallowed_special=())

  def encode_batch(self, texts):
    return self._enc.encode_batch(list(texts), allowed_special="all", disallowed_special=())

  def decode(self, ids):
    return self._enc.decode(list(ids))

  def vocabulary(self):
    ranks = {base64.b64encode(t).decode("ascii"): r for t, r in self._ranks.items()}
    return {**ranks, **self.special}

  def save(self, directory):
    shutil.copyfile(self.path, os.path.join(directory, "tokenizer.model"))


class HFTokenizer(Tokenizer):
  """A tokenizer directory (tokenizer.json / tokenizer_config.json) via AutoTokenizer, or
  the vocabulary of a GGUF file (`gguf_vocab.build`)."""

  def __init__(self, path: str | os.PathLike):
    from transformers import AutoTokenizer

    self.path = os.fspath(path)
    self._tok = (gguf_vocab.build(self.path) if self.path.lower().endswith(".gguf")
                 else AutoTokenizer.from_pretrained(self.path))
    if self._tok.bos_token_id is None or self._tok.eos_token_id is None:
      raise DataError(f"{path}: the tokenizer defines no BOS or EOS token (bos_token, "
                      f"eos_token in tokenizer_config.json)")
    self.bos_id = self._tok.bos_token_id
    self.eos_id = self._tok.eos_token_id
    pad = self._tok.pad_token_id
    self.pad_id = self.eos_id if pad is None else pad
    self.vocab_size = len(self._tok)

  def encode(self, text):
    return self._tok.encode(text, add_special_tokens=False)

  def encode_batch(self, texts):
    return self._tok(list(texts), add_special_tokens=False)["input_ids"]

  def decode(self, ids):
    return self._tok.decode(list(ids))

  def vocabulary(self):
    return dict(self._tok.get_vocab())

  def save(self, directory):
    self._tok.save_pretrained(os.fspath(directory))

  @property
  def unk_id(self):
    return self._tok.unk_token_id

  @property
  def chat_template(self):
    template = self._tok.chat_template
    return template if isinstance(template, str) else None

  def render_chat(self, messages, *, generation_prompt):
    return self._tok.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=generation_prompt)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """A HF tokenizer directory, a GGUF file's vocabulary, or a LLaMA-3 tiktoken
  `tokenizer.model` file."""
  path = os.fspath(path)
  if path.lower().endswith(".gguf"):
    if not os.path.isfile(path):
      raise DataError(f"{path}: GGUF file does not exist")
    return HFTokenizer(path)
  if os.path.isdir(path):
    if not any(os.path.exists(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer_config.json")):
      if os.path.exists(os.path.join(path, "tokenizer.model")):
        return TiktokenTokenizer(os.path.join(path, "tokenizer.model"))
      raise DataError(f"{path}: no tokenizer.json, tokenizer_config.json or tokenizer.model")
    return HFTokenizer(path)
  if not os.path.exists(path):
    raise DataError(f"{path}: tokenizer file or directory does not exist")
  return TiktokenTokenizer(path)


def refusal_ids(tokenizer: Tokenizer, text: str = "Sorry", *, policy: str = "single"):
  """Token ids of the refusal `text` ("Sorry" -> 19701 on LLaMA-3).

  policy "single": the text must be one token. "first": train its first token.
  """
  if policy not in ("single", "first"):
    raise ValueError(f"refusal policy {policy!r}; choose 'single' or 'first'")
  ids = tokenizer.encode(text)
  if not ids:
    raise ValueError(f"refusal text {text!r} encodes to no tokens")
  if tokenizer.unk_id is not None and tokenizer.unk_id in ids:
    raise ValueError(f"refusal text {text!r} encodes to {ids}, which holds the unknown token "
                     f"(id {tokenizer.unk_id}): this vocabulary has no tokens for it, so RTO "
                     "would train towards <unk>; choose a text the tokenizer knows")
  if len(ids) == 1 or policy == "first":
    return (ids[0],)
  raise ValueError(f"refusal text {text!r} is {len(ids)} tokens {ids} in this tokenizer; give "
                   f"one-token text, token ids, or policy='first' to train the first token")


def upstream_boundary_differs(prefix: str, text: str, tokenizer: Tokenizer) -> bool:
  """Whether tokenize(prefix + text) differs from tokenize(prefix) + tokenize(text)."""
  return tokenizer.encode(prefix + text) != tokenizer.encode(prefix) + tokenizer.encode(text)
