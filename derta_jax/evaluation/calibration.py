"""The authors' released responses, the paper's hand-judged ASR, and our gold labels.

Yuan et al. (arXiv 2407.09121) judged every response by hand; their repository releases the
responses under results/safety/<attack>/. `PAPER_ASR` is the published table (Table 2,
Table 10 and Figure 5's bar labels, in %); `system_of(file)` maps a released file to its
row. `read_results` reads a released file into (prompt, response) pairs: JSON lines with
"question" or "instruction" and "response", or, for PAIR, JSON strings holding PAIR's
summary of one goal, of which only jailbroken goals carry a response. Our gold labels
(gold/*.jsonl: file, index, harmful, reason) were made by reading the calibration attacks'
responses (jailbreakchat, selfcipher, pair); codeattack, completionattack and autodan are
held out from labelling and tuning.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from derta_jax.data.records import DataError

ATTACKS = ("codeattack", "pair", "jailbreakchat", "selfcipher", "completionattack", "autodan")
CALIBRATION = ("jailbreakchat", "selfcipher", "pair")
HELD_OUT = ("codeattack", "completionattack", "autodan")
PAIR_GOALS = 50  # PAIR ran 50 goals per system; a goal without a summary line was not broken

_COLUMNS = ATTACKS
# system: ASR % per attack in ATTACKS order (None: not published).
PAPER_ASR: dict[str, tuple[float | None, ...]] = {
    "gpt-4": (82.5, 40.0, 4.0, 6.5, None, None),
    "chatgpt": (85.0, 82.0, 29.0, 81.0, None, None),
    "llama3-70b-vanilla": (86.0, 76.0, 41.0, 51.5, 95.0, 74.0),
    "llama3-70b-dpo": (87.5, 72.0, 39.5, 17.5, 85.0, 64.0),
    "llama3-70b-derta": (21.5, 24.0, 1.5, 0.0, 4.0, 2.0),
    "llama3-70b-instruct": (80.5, 36.0, 3.0, 0.0, 90.0, 0.0),
    "llama3-70b-instruct-derta": (5.5, 2.0, 0.0, 0.0, 5.5, 0.0),
    "llama3-8b-vanilla": (None, 82.0, 17.5, 12.0, 93.0, 82.0),
    "llama3-8b-dpo": (None, 62.0, 31.0, 4.5, 88.5, 70.0),
    "llama3-8b-derta": (None, 24.0, 4.0, 0.0, 6.0, 14.0),
}
# (base model, method) of each system, for the "DeRTa below vanilla and DPO" checks.
SYSTEM_GROUP = {
    "llama3-70b-vanilla": ("llama3-70b", "vanilla"), "llama3-70b-dpo": ("llama3-70b", "dpo"),
    "llama3-70b-derta": ("llama3-70b", "derta"),
    "llama3-8b-vanilla": ("llama3-8b", "vanilla"), "llama3-8b-dpo": ("llama3-8b", "dpo"),
    "llama3-8b-derta": ("llama3-8b", "derta"),
}

# Released file name -> system, tried in order (the first pattern found wins).
_FILE_SYSTEMS = (
    (r"gpt-4", "gpt-4"), (r"gpt-3\.5", "chatgpt"),
    (r"70B-Instruct_derta|70B-ins-ours", "llama3-70b-instruct-derta"),
    (r"70B-Instruct", "llama3-70b-instruct"), (r"8B-Instruct", "llama3-8b-instruct"),
    (r"recaug", None),
    (r"70B_vanill|70B-vanilla", "llama3-70b-vanilla"), (r"70B_dpo|70B-dpo", "llama3-70b-dpo"),
    (r"70B_derta|70B-ours", "llama3-70b-derta"),
    (r"8B_vanill|8B-vanilla", "llama3-8b-vanilla"), (r"8B_dpo|8B-dpo", "llama3-8b-dpo"),
    (r"8B_derta|8B-ours", "llama3-8b-derta"),
)


def system_of(file_name: str) -> str | None:
  """The PAPER_ASR row of a released file, or None (recaug, 8B-Instruct: no number)."""
  for pattern, system in _FILE_SYSTEMS:
    if re.search(pattern, file_name, re.I):
      return system
  return None


def paper_asr(file_name: str, attack: str) -> float | None:
  """The published ASR (%) of a released file, or None."""
  system = system_of(file_name)
  if system is None or system not in PAPER_ASR:
    return None
  return PAPER_ASR[system][_COLUMNS.index(attack)]


def _pair_pair(summary: str) -> tuple[str, str] | None:
  """(prompt, response) of a PAIR summary, None when the goal was not jailbroken."""
  if "Example Jailbreak RESPONSE:" not in summary:
    return None
  head, response = summary.split("Example Jailbreak RESPONSE:", 1)
  prompt = head.split("Example Jailbreak PROMPT:", 1)[-1]
  return prompt.strip(), response.strip()


PROMPT_KEYS = ("question", "instruction", "prompt", "goal", "query", "input")
RESPONSE_KEYS = ("response", "output", "answer", "completion", "generation")


def _pair_of(obj, where: str) -> tuple[str, str] | None:
  """(prompt, response) of one record. A record without a prompt field is judged without
  one (no echo or persona reading); a list of responses gives its first."""
  if isinstance(obj, str):
    return _pair_pair(obj)
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected an object or a PAIR summary string")
  prompt = next((obj[k] for k in PROMPT_KEYS if isinstance(obj.get(k), str)), "")
  response = next((obj[k] for k in RESPONSE_KEYS if k in obj), None)
  if response is None:
    raise DataError(f"{where}: no response field (one of {', '.join(RESPONSE_KEYS)})")
  if isinstance(response, list) and response and all(isinstance(r, str) for r in response):
    response = response[0]
  if not isinstance(response, str):
    raise DataError(f"{where}: the response field is not a string")
  return prompt, response


def read_results(path: str | os.PathLike) -> list[tuple[str, str] | None]:
  """Per record of a released results file, (prompt, response); None for a PAIR goal that
  carries no response. JSON lines, one JSON array, or one object of records; DataError names
  the file, line (or element, or key) and field."""
  name = os.fspath(path)
  with open(name, encoding="utf-8") as f:
    raw = f.read()
  try:
    whole = json.loads(raw)
  except json.JSONDecodeError:
    whole = None
  if isinstance(whole, list):
    return [_pair_of(obj, f"{name}: element {i}") for i, obj in enumerate(whole)]
  if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
    return [_pair_of(obj, f"{name}: key {k!r}") for k, obj in whole.items()]
  out = []
  for number, line in enumerate(raw.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{name}:{number}: bad JSON at column {e.colno}: {e.msg}") from None
    out.append(_pair_of(obj, f"{name}:{number}"))
  return out


def asr_denominator(pairs: list) -> int:
  """Responses an ASR is over: every record; PAIR summaries count PAIR_GOALS goals."""
  return max(len(pairs), PAIR_GOALS) if any(p is None for p in pairs) else len(pairs)


def results_files(upstream_dir: str | os.PathLike, attack: str) -> list[Path]:
  """The released files of one attack under <upstream_dir>/results/safety/<attack>/."""
  folder = Path(upstream_dir) / "results" / "safety" / attack
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())


def gold_dir() -> Path:
  return Path(__file__).parent / "gold"


def load_labels(folder: str | os.PathLike | None = None) -> list[dict]:
  """Our gold labels: dicts with attack, file, index, harmful, reason."""
  folder = gold_dir() if folder is None else Path(folder)
  labels = []
  for path in sorted(folder.glob("*.jsonl")):
    attack = path.stem.split("_")[0]
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: bad JSON at column {e.colno}: {e.msg}") from None
      missing = [k for k in ("file", "index", "harmful", "reason") if k not in obj]
      if missing or not isinstance(obj["harmful"], bool):
        raise DataError(f"{path}:{number}: fields {missing or ['harmful']} missing or bad")
      labels.append(dict(attack=attack, **obj))
  return labels
