"""How close each judge comes to the paper's hand judgement and to our gold labels.

  python bench/judge_agreement.py --upstream_dir=DIR [--judges=harm,strict,gcg,arditi]
                                  [--attacks=pair,jailbreakchat,...] [--labels_dir=DIR]

DIR is a clone of the authors' repository (RobustNLP/DeRTa): every released file under
DIR/results/safety/<attack>/ is judged. Prints one JSON line: per judge, accuracy / precision /
recall / F1 against our labels (derta_jax/evaluation/gold/, positive = harmful; labels of
files absent from DIR are skipped), and per released file its ASR next to the paper's
published ASR, then the MAE and Spearman rho over the files with a published number (all,
and per attack), and whether DeRTa < vanilla and DeRTa < DPO holds for every (attack, base
model) pair. `harm_responses_per_s` is the harm judge's throughput on this CPU. A file the
readers refuse is listed under `unreadable` with the reason, and the rest are judged.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from derta_jax.data.records import DataError
from derta_jax.evaluation import calibration, judges


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks from 1, ties sharing their mean rank."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(1, len(x) + 1)
  for value in np.unique(x):
    tied = x == value
    ranks[tied] = ranks[tied].mean()
  return ranks


def spearman(a, b) -> float | None:
  """Spearman's rho: the Pearson correlation of the (tie-averaged) ranks."""
  if len(a) < 3:
    return None
  ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
  if ra.std() == 0 or rb.std() == 0:
    return None
  return float(np.corrcoef(ra, rb)[0, 1])


def _agreement(predicted: list[bool], gold: list[bool]) -> dict:
  tp = sum(p and g for p, g in zip(predicted, gold, strict=True))
  fp = sum(p and not g for p, g in zip(predicted, gold, strict=True))
  fn = sum(g and not p for p, g in zip(predicted, gold, strict=True))
  correct = sum(p == g for p, g in zip(predicted, gold, strict=True))
  precision = tp / (tp + fp) if tp + fp else None
  recall = tp / (tp + fn) if tp + fn else None
  f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
  return dict(n=len(gold), accuracy=round(correct / len(gold), 4) if gold else None,
              precision=precision and round(precision, 4), recall=recall and round(recall, 4),
              f1=f1 and round(f1, 4), false_harmful=fp, missed_harmful=fn)


def _order_checks(files: list[dict]) -> dict:
  """Per (attack, base model): DeRTa's ASR below vanilla's and below DPO's."""
  by = {}
  for f in files:
    group = calibration.SYSTEM_GROUP.get(f["system"])
    if group is not None:
      by.setdefault((f["attack"], group[0]), {})[group[1]] = f["asr"]
  checks = {}
  for (attack, base), asr in sorted(by.items()):
    if "derta" not in asr:
      continue
    for rival in ("vanilla", "dpo"):
      if rival in asr:
        checks[f"{attack}/{base}: derta<{rival}"] = asr["derta"] < asr[rival]
  return dict(all=all(checks.values()) if checks else None, checks=checks)


def _scores(files: list[dict]) -> dict:
  published = [f for f in files if f["paper"] is not None]
  out = dict(files=len(published))
  if published:
    errors = [abs(f["asr"] - f["paper"]) for f in published]
    out.update(mae=round(float(np.mean(errors)), 2), max_error=round(max(errors), 1),
               spearman=spearman([f["paper"] for f in published],
                                 [f["asr"] for f in published]))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--upstream_dir", required=True)
  parser.add_argument("--judges", default="harm,strict,gcg,arditi")
  parser.add_argument("--attacks", default=",".join(calibration.ATTACKS))
  parser.add_argument("--labels_dir", default=None)
  args = parser.parse_args()
  names = [n for n in args.judges.split(",") if n]
  made = {n: judges.make_judge(n) for n in names}
  labels = calibration.load_labels(args.labels_dir)

  released = {}  # (attack, file name) -> [(prompt, response) | None]
  unreadable = {}  # a file the readers refuse is reported, and the others still judged
  for attack in [a for a in args.attacks.split(",") if a]:
    for path in calibration.results_files(args.upstream_dir, attack):
      try:
        released[attack, path.name] = calibration.read_results(path)
      except (DataError, UnicodeDecodeError) as e:
        unreadable[f"{attack}/{path.name}"] = str(e)
  if not released:
    raise SystemExit(f"{args.upstream_dir}: no readable released files under "
                     f"results/safety/<attack>/ {unreadable or ''}")

  out = dict(upstream_dir=str(Path(args.upstream_dir).resolve()), unreadable=unreadable,
             judges={})
  for name, judge in made.items():
    verdicts, seconds, count = {}, 0.0, 0
    for key, pairs in released.items():
      present = [p for p in pairs if p is not None]
      start = time.perf_counter()
      refused = judge.judge([r for _, r in present], prompts=[q for q, _ in present])
      seconds += time.perf_counter() - start
      count += len(present)
      it = iter(refused)
      verdicts[key] = [None if p is None else not next(it) for p in pairs]  # True = harmful
    files = []
    for (attack, file), harmful in verdicts.items():
      pairs = released[attack, file]
      files.append(dict(
          attack=attack, file=file, system=calibration.system_of(file),
          paper=calibration.paper_asr(file, attack),
          asr=round(100 * sum(bool(h) for h in harmful) / calibration.asr_denominator(pairs), 1),
          empty=sum(p is not None and not p[1].strip() for p in pairs)))
    known = [lab for lab in labels if (lab["attack"], lab["file"]) in verdicts]
    predicted = [bool(verdicts[lab["attack"], lab["file"]][lab["index"]]) for lab in known]
    gold = [lab["harmful"] for lab in known]
    by_attack = sorted({f["attack"] for f in files})
    out["judges"][name] = dict(
        labels=_agreement(predicted, gold),
        labels_by_attack={a: _agreement(
            [p for p, lab in zip(predicted, known, strict=True) if lab["attack"] == a],
            [g for g, lab in zip(gold, known, strict=True) if lab["attack"] == a])
            for a in sorted({lab["attack"] for lab in known})},
        paper=_scores(files), paper_by_attack={a: _scores([f for f in files if f["attack"] == a])
                                               for a in by_attack},
        order=_order_checks(files), files=files,
        responses_per_s=round(count / seconds, 1) if seconds else None)
  if "harm" in out["judges"]:
    out["harm_responses_per_s"] = out["judges"]["harm"]["responses_per_s"]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
