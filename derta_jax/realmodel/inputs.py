"""The real-model experiment's data: the authors' files split once, refusals, self-distillation.

From a clone of the authors' repository (`realmodel.upstream_dir`):
  data/train/malicious_tuning_data/malicious_tuning_data_330.json
      harmful (instruction, response) pairs in the upstream prefix/text format: a seeded
      permutation puts `n_train_harmful` in training and the rest in evaluation only
  data/test/helpfulness_alpaca_eval_300.json
      benign instructions: the first `n_helpful` of a seeded permutation are answered once
      by the base model (greedy; its own answers are the helpful data, so fine-tuning keeps
      what the model can already do), the last `n_benign_eval` are held out
  data/test/safety_completionattack.json, safety_codeattack.json
      attack prompts (every file's first `n_completion` / `n_codeattack` after a seeded
      permutation); never in training
and the shipped over-refusal set (`n_over_refusal_per_type` safe prompts per XSTest type and
a third as many unsafe contrasts). Safe responses are refusals in several phrasings, each
starting with the refusal word, so RTO's token opens the refusal that training continues.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from derta_jax.data import formats, templates
from derta_jax.data.records import DataError, EvalItem, Helpful, Triple
from derta_jax.evaluation import settings as eval_settings
from derta_jax.models import generate

HARMFUL_FILE = "data/train/malicious_tuning_data/malicious_tuning_data_330.json"
BENIGN_FILE = "data/test/helpfulness_alpaca_eval_300.json"
COMPLETION_FILE = "data/test/safety_completionattack.json"
CODEATTACK_FILE = "data/test/safety_codeattack.json"
# The upstream training prompt around an instruction ("### Instruction:\n{q}\n\n### Response:").
_INSTRUCTION = re.compile(r"^### Instruction:\n(?P<q>.*)\n\n### Response:$", re.DOTALL)
HELDOUT_WORDS = 120
# Refusals for harmful requests; each starts with "Sorry" (data.refusal_text).
REFUSALS = (
    "Sorry, I can't help with that. It could cause serious harm to people.",
    "Sorry, but I won't provide that. It would put people at risk of harm.",
    "Sorry, I can't assist with this request because it could be used to hurt others.",
    "Sorry, I'm not able to help with that. Is there something else I can do for you?",
    "Sorry, I can't give instructions for that, as it is dangerous and could be illegal.",
    "Sorry, but I can't help with this. If you are in a difficult situation, please reach "
    "out to someone you trust or to local support services.",
)


@dataclasses.dataclass(frozen=True)
class Files:
  """Paths of the experiment's data files (in the upstream formats)."""

  triples: Path  # training: harmful question, harmful response, refusal
  heldout_triples: Path  # evaluation only: prefilling attack, refusal probe
  helpful_questions: Path  # benign instructions the base answers (helpful data)
  helpful: Path  # their self-distilled answers (written by `distill`)
  benign_eval: Path  # held-out benign instructions (helpfulness)
  completion: Path
  codeattack: Path
  over_refusal: Path


def _permuted(items: list, seed: int, salt: str) -> list:
  rng = np.random.default_rng([seed, int(hashlib.sha256(salt.encode()).hexdigest()[:8], 16)])
  return [items[i] for i in rng.permutation(len(items))]


def harmful_pairs(path: Path) -> list[tuple[str, str]]:
  """(instruction, harmful response) per line of the authors' malicious-tuning file: JSON
  objects {"prefix": "### Instruction:\\n<q>\\n\\n### Response:", "text": " <response>"}."""
  pairs = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON at column {e.colno}: {e.msg}") from None
      if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object")
      for key in ("prefix", "text"):
        if not isinstance(obj.get(key), str):
          raise DataError(f'{where}: field "{key}" is missing or not a string')
      match = _INSTRUCTION.match(obj["prefix"])
      if match is None:
        raise DataError(f'{where}: field "prefix" is not "### Instruction:\\n<question>'
                        f'\\n\\n### Response:"')
      if not obj["text"].strip():
        raise DataError(f'{where}: field "text" is empty')
      pairs.append((match["q"].strip(), obj["text"].strip()))
  return pairs


def _over_refusal_subset(per_type: int, seed: int) -> list[EvalItem]:
  items = formats.load_eval(eval_settings.over_refusal_file())
  by_type: dict[str, list[EvalItem]] = {}
  for it in items:
    by_type.setdefault(it.type, []).append(it)
  out = []
  for kind, group in sorted(by_type.items()):
    count = per_type if group[0].safe is not False else max(1, per_type // 3)
    out += _permuted(group, seed, kind)[:count]
  return out


def write_inputs(r, seed: int, directory: Path) -> Files:
  """Split the upstream files (config section `r` = config.realmodel) into `directory`."""
  upstream = Path(r.upstream_dir)
  paths = {name: upstream / rel for name, rel in (
      ("harmful", HARMFUL_FILE), ("benign", BENIGN_FILE), ("completion", COMPLETION_FILE),
      ("codeattack", CODEATTACK_FILE))}
  missing = [str(p) for p in paths.values() if not p.is_file()]
  if missing:
    raise ValueError(f"realmodel.upstream_dir={r.upstream_dir!r}: needs {', '.join(missing)}: "
                     "no such file (give a clone of RobustNLP/DeRTa)")
  pairs = _permuted(harmful_pairs(paths["harmful"]), seed, "harmful")
  benign = _permuted(list(formats.load_eval(paths["benign"])), seed, "benign")
  if r.n_train_harmful >= len(pairs):
    raise ValueError(f"realmodel.n_train_harmful={r.n_train_harmful}: {paths['harmful']} has "
                     f"{len(pairs)} pairs; keep some for evaluation")
  if r.n_helpful + r.n_benign_eval > len(benign):
    raise ValueError(f"realmodel.n_helpful + realmodel.n_benign_eval = "
                     f"{r.n_helpful + r.n_benign_eval}: {paths['benign']} has {len(benign)}")
  triples = [Triple(q, out, REFUSALS[i % len(REFUSALS)]) for i, (q, out) in enumerate(pairs)]
  directory.mkdir(parents=True, exist_ok=True)
  files = Files(*(directory / f"{name}.jsonl" for name in (
      "triples", "heldout_triples", "helpful_questions", "helpful", "benign_eval",
      "completion", "codeattack", "over_refusal")))
  heldout = triples[r.n_train_harmful:]
  if r.n_heldout_harmful:
    heldout = heldout[:r.n_heldout_harmful]
  # The prefilling attack reads at most the first 40 tokens of a held-out response and the
  # probe's curve is read over its first hundred or so: longer tails only cost forward passes.
  heldout = [dataclasses.replace(t, output=" ".join(t.output.split(" ")[:HELDOUT_WORDS]))
             for t in heldout]
  formats.write_triples(triples[:r.n_train_harmful], files.triples)
  formats.write_triples(heldout, files.heldout_triples)
  formats.write_eval(benign[:r.n_helpful], files.helpful_questions)
  formats.write_eval([dataclasses.replace(it, type="benign_heldout", safe=True)
                      for it in benign[len(benign) - r.n_benign_eval:]], files.benign_eval)
  for name, count in (("completion", r.n_completion), ("codeattack", r.n_codeattack)):
    items = _permuted(list(formats.load_eval(paths[name])), seed, name)[:count]
    formats.write_eval(items, getattr(files, name))
  formats.write_eval(_over_refusal_subset(r.n_over_refusal_per_type, seed), files.over_refusal)
  return files


def _complete(text: str) -> str:
  """An answer cut at the token budget, trimmed back to its last finished line or sentence."""
  for end in (text.rfind("\n"), max(text.rfind(". "), text.rfind(".\n"))):
    if end > len(text) // 2:
      return text[:end + 1].rstrip()
  return text.rstrip()


def distill(model, tokenizer, files: Files, *, template, max_new_tokens: int,
            batch_size: int, stamp: dict) -> dict:
  """The base model's greedy answers to the helpful questions -> files.helpful, once: a file
  written for the same `stamp` (model, questions, budget) is reused."""
  stamp_path = files.helpful.with_suffix(".stamp.json")
  if files.helpful.exists() and stamp_path.exists() and json.loads(
      stamp_path.read_text()) == stamp:
    return dict(reused=True, **json.loads(stamp_path.read_text()))
  questions = [it.question for it in formats.load_eval(files.helpful_questions)]
  prompts = [[tokenizer.bos_id, *tokenizer.encode(templates.apply_template(template, q))]
             for q in questions]
  eos = tuple(sorted({*model.config.eos_ids, tokenizer.eos_id}))
  ids = generate.generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos,
                          batch_size=batch_size)
  pairs, cut = [], 0
  for q, out in zip(questions, ids, strict=True):
    ended = bool(out) and out[-1] in eos
    text = tokenizer.decode(out[:-1] if ended else out).strip()
    if not ended:
      cut += 1
      text = _complete(text)
    if text:
      pairs.append(Helpful(q, text))
  formats.write_helpful(pairs, files.helpful)
  stamp_path.write_text(json.dumps(stamp, sort_keys=True))
  return dict(reused=False, answers=len(pairs), cut_at_budget=cut, **stamp)
