"""Training metrics out: a progress bar, `<workdir>/metrics.jsonl`, TensorBoard events.

metrics.jsonl holds one row per logged step. A run resumed from step s first drops the rows
of steps after s (written by the run that was stopped after its last checkpoint; the resumed
run computes those steps again) and a half-written last line; TensorBoard is told to purge
them too (`purge_step`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from absl import logging

BAR_KEYS = ("loss", "mle_loss", "rto_loss", "lr", "tokens_per_s")


class MetricsLogger:
  """Writes one JSON object per logged step (appended across restarts); process 0 only."""

  def __init__(self, workdir: str | os.PathLike, *, total_steps: int, start_step: int,
               enabled: bool = True):
    self.enabled = enabled
    self._bar = self._file = self._tb = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    workdir = Path(workdir)
    drop_rows_after(workdir / "metrics.jsonl", start_step)
    self._file = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    self._tb = SummaryWriter(str(workdir / "tensorboard"),
                             purge_step=start_step + 1 if start_step else None)
    self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def log(self, step: int, metrics: dict[str, float], *, write: bool) -> None:
    """Advance the bar to `step` (1-based count of finished steps); write when asked."""
    if not self.enabled:
      return
    self._bar.update(step - self._bar.n)
    self._bar.set_postfix({k: f"{metrics[k]:.4g}" for k in BAR_KEYS if k in metrics},
                          refresh=False)
    if write:
      record = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"train/{k}", v, step)

  def close(self) -> None:
    if self.enabled:
      self._bar.close()
      self._file.close()
      self._tb.close()


def drop_rows_after(path: Path, step: int) -> None:
  """Rewrites a metrics file without rows of steps after `step` or a half-written last line
  (a temporary sibling renamed over it, so a kill leaves the old file or the new one)."""
  if not path.exists():
    return
  lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
  kept = [x for x in lines if x.endswith("\n") and (n := _step_of(x)) is not None
          and n <= step]
  if len(kept) == len(lines):
    return
  logging.info("%s: dropped %d row(s) after step %d, the step this run resumes from", path,
               len(lines) - len(kept), step)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text("".join(kept), encoding="utf-8")
  os.replace(tmp, path)


def _step_of(line: str) -> int | None:
  try:
    step = json.loads(line).get("step")
  except (json.JSONDecodeError, AttributeError):
    return None
  return step if isinstance(step, int) else None


def _plain(v):
  return v if isinstance(v, (int, str)) else float(v)
