"""Training metrics out: a progress bar, `<workdir>/metrics.jsonl`, TensorBoard events."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

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
    self._file = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    self._tb = SummaryWriter(str(workdir / "tensorboard"))
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


def _plain(v):
  return v if isinstance(v, (int, str)) else float(v)
