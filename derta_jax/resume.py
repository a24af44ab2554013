"""What a checkpoint was trained with, and what a resumed or evaluated run may change.

Every checkpoint stores its run's config (`config.to_dict()`) plus a "tokenizer" record
(path, vocabulary size, sha256 of the vocabulary). Resuming compares the stored config with
the current one and refuses any difference outside RESUMABLE (keys that do not change the
data, model or optimizer trajectory), listing each key with both values; keys named in
`resume.allow_changes` (a key, or a whole section) may differ on purpose. A tokenizer with
another vocabulary is refused by training and evaluation alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from absl import logging

# Keys (or whole sections) that may differ from the checkpoint's without changing what the
# run computes: how long it runs (train.num_steps may grow; the schedule is then recomputed
# over the new length), how often it logs and saves, where it runs and how it is compiled,
# the divergence guard, and the other modes' settings.
RESUMABLE = ("mode", "train.num_steps", "train.epochs", "train.log_every",
             "train.micro_batches", "train.tpu_compiler_options", "train.divergence",
             "model.remat", "model.attention", "data.max_truncated_fraction", "mesh", "ckpt",
             "resume", "export", "eval", "compile", "toyworld", "realmodel")
TOKENIZER = "tokenizer"  # the stored record's key next to the config's sections


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """{"a.b": leaf} of a nested dict, values as JSON stores them (tuples become lists)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.loads(json.dumps(value))
  return out


def _covered(key: str, names) -> bool:
  return any(key == n or key.startswith(n + ".") for n in names)


def allowed_changes(config) -> tuple[str, ...]:
  """resume.allow_changes as names; ValueError names any that is no key or section."""
  text = config.get("resume", {}).get("allow_changes", "")
  names = tuple(n.strip() for n in text.split(",") if n.strip())
  keys = flatten(config.to_dict())
  unknown = [n for n in names if not any(_covered(k, (n,)) for k in keys)]
  if unknown:
    raise ValueError(f"resume.allow_changes={text!r}: {unknown} name no config key or "
                     "section (write them as e.g. optim.lr or optim)")
  return names


def check_resume(stored: Mapping, config, *, where: str) -> dict:
  """Raises ValueError unless `config` may resume a checkpoint trained with `stored`; returns
  the differences it allows ({key: (stored, now)}). Keys only one side has (a newer or older
  schema) are not compared."""
  allowed = allowed_changes(config)
  before = flatten({k: v for k, v in stored.items() if k != TOKENIZER})
  now = flatten(config.to_dict())
  diff = {k: (before[k], now[k]) for k in sorted(before.keys() & now.keys())
          if before[k] != now[k]}
  refused = {k: v for k, v in diff.items() if not _covered(k, RESUMABLE + allowed)}
  if refused:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
    raise ValueError(
        f"{where}: the config differs from the one this checkpoint was trained with, in keys "
        f"that change the data, model or optimizer trajectory: {listed}. Resume with the "
        "checkpoint's values, use a fresh workdir, or allow deliberate changes with "
        f"--config.resume.allow_changes={','.join(refused)}")
  if diff:
    logging.warning("%s: resuming with changed %s", where,
                    "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
  return diff


def tokenizer_record(tokenizer, path) -> dict:
  """What a checkpoint stores of its tokenizer."""
  return dict(path=str(path), vocab_size=tokenizer.vocab_size, sha256=tokenizer.fingerprint())


def check_tokenizer(stored: Mapping, tokenizer, path, *, where: str) -> None:
  """Raises unless `tokenizer` has the vocabulary of the stored record (when there is one)."""
  record = stored.get(TOKENIZER)
  if not record or record["sha256"] == tokenizer.fingerprint():
    return
  raise ValueError(
      f"{where}: the tokenizer {path} ({tokenizer.vocab_size} tokens) is not the one this "
      f"checkpoint was trained with ({record['path']}, {record['vocab_size']} tokens): their "
      "vocabularies differ, so its ids would mean other words. Point data.tokenizer_path at "
      "the training tokenizer")
