"""A small synthetic DeRTa source for CPU runs and tests: random-word requests, harmful and
safe responses, helpful pairs, and a word-level tokenizer built for them (a `tokenizers`
tokenizer.json loaded back through `load_tokenizer`, like any HF checkpoint's)."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from derta_jax.data.records import Helpful, Triple

WORDS = tuple(f"w{i}" for i in range(120))
SPECIAL = ("<pad>", "<s>", "</s>")
REFUSAL = "Sorry , I cannot help with that ."


def make_sources(*, seed: int, n_helpful: int, n_triples: int):
  """(helpful pairs, triples) of random words; the same seed gives the same data."""
  rng = np.random.default_rng(seed)
  text = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))  # noqa: E731
  helpful = [Helpful(f"how to {text(1, 4)} ?", text(4, 20)) for _ in range(n_helpful)]
  triples = [Triple(f"how to harm {text(1, 4)} ?", "first " + text(4, 20),
                    f"{REFUSAL} {text(0, 4)}".strip()) for _ in range(n_triples)]
  return helpful, triples


def write_tokenizer(directory: str | os.PathLike) -> str:
  """A word-level tokenizer over WORDS, the templates' punctuation and the refusal."""
  extra = ("how", "to", "harm", "first", "?", ",", ".", "[", "]", "[\\", "INST", "Sorry", "I",
           "cannot", "help", "with", "that", "<unk>")
  return write_word_tokenizer(directory, extra + WORDS)


def write_word_tokenizer(directory: str | os.PathLike, words) -> str:
  """A word-level tokenizer: <pad>, <s>, </s>, then `words` (and <unk> last unless among
  them); text splits on whitespace and punctuation runs.

  Written to a temporary sibling and renamed into place, so processes sharing a workdir
  never read a half-written one (all of them write the same files); an existing directory
  is kept as it is.
  """
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  words = [*words] + ([] if "<unk>" in words else ["<unk>"])
  vocab = {w: i for i, w in enumerate((*SPECIAL, *words))}
  if len(vocab) != len(SPECIAL) + len(words):
    raise ValueError(f"write_word_tokenizer: repeated words in {list(words)}")
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  directory = os.fspath(directory)
  if os.path.isdir(directory):
    return directory
  tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=os.path.dirname(directory) or ".")
  PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                          pad_token="<pad>", unk_token="<unk>").save_pretrained(tmp)
  try:
    os.rename(tmp, directory)
  except OSError:  # another process renamed its copy first
    shutil.rmtree(tmp)
  return directory
