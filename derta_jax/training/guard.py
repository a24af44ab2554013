"""The divergence guard: reads each step's metrics and says when a run has gone bad.

Always (whatever `train.divergence.enabled`): a loss or gradient norm that is NaN or Inf.
With `train.divergence.enabled` (the default):
  dead model  the gradient norm is 0 while the loss is above 0.01: nothing can learn any
              more (after a blow-up, typically at ln V, uniform predictions);
  loss spike  the loss is above `spike_ratio` times the median of the last `window` steps'
              losses and above that median plus `spike_min_delta`, once `warmup` steps
              have been seen in this process (a resumed run starts counting again).
The loop asks the guard about a state's own loss before saving the state, so every
checkpoint holds params that passed it, and stops a run at the first problem, naming the
step, the reason and the last good checkpoint (see training/loop.py).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics

DEAD_GRAD_NORM = 1e-12
DEAD_MIN_LOSS = 0.01


class DivergenceError(FloatingPointError):
  """A run stopped by the guard; the message names the step, the reason and what was kept."""


@dataclasses.dataclass
class Guard:
  """Judges steps' metrics against the run so far (the losses of the last `window` steps)."""

  vocab_size: int
  enabled: bool = True
  spike_ratio: float = 5.0
  spike_min_delta: float = 1.0
  window: int = 50
  warmup: int = 20
  _losses: collections.deque = dataclasses.field(default_factory=collections.deque)

  @classmethod
  def from_config(cls, section, vocab_size: int) -> Guard:
    """From `train.divergence`; ValueError names a bad key and value."""
    problems = [f"train.divergence.{k}={section[k]!r} must be > {low}" for k, low in
                (("spike_ratio", 1.0), ("spike_min_delta", 0.0), ("window", 0),
                 ("warmup", 0)) if not section[k] > low]
    if section.warmup > section.window:
      problems.append(f"train.divergence.warmup ({section.warmup}) must be at most "
                      f"train.divergence.window ({section.window})")
    if problems:
      raise ValueError("; ".join(problems))
    return cls(vocab_size, bool(section.enabled), float(section.spike_ratio),
               float(section.spike_min_delta), int(section.window), int(section.warmup))

  def problem(self, metrics: dict[str, float]) -> str | None:
    """Why these metrics of one step show a diverged run, or None when they do not."""
    loss, grad_norm = metrics["loss"], metrics.get("grad_norm", 1.0)
    if not math.isfinite(loss):
      return f"loss is {loss}"
    if not math.isfinite(grad_norm):
      return f"gradient norm is {grad_norm} (loss {loss:.6g})"
    if not self.enabled:
      return None
    if grad_norm <= DEAD_GRAD_NORM and loss > DEAD_MIN_LOSS:
      uniform = math.log(self.vocab_size)
      note = (f", = ln V ({uniform:.4f}): uniform predictions"
              if abs(loss - uniform) <= 0.01 * uniform else "")
      return f"dead model: gradient norm {grad_norm:.3g} at loss {loss:.6g}{note}"
    if len(self._losses) >= self.warmup:
      median = statistics.median(self._losses)
      if loss > self.spike_ratio * median and loss > median + self.spike_min_delta:
        return (f"loss spike: {loss:.6g} is over {self.spike_ratio:g} x the median "
                f"{median:.6g} of the last {len(self._losses)} steps "
                "(train.divergence.spike_ratio)")
    return None

  def record(self, metrics: dict[str, float]) -> None:
    """Adds a step that passed to the window."""
    self._losses.append(metrics["loss"])
    while len(self._losses) > self.window:
      self._losses.popleft()
