"""Global batches as a pure function of (seed, step), each process building only its rows.

Epoch e: the examples of that epoch (a recipe re-cuts its harmful prefixes every epoch), in
a permutation seeded by (seed, e) (a preference pair is one example, so its two halves
stay in one row), packed into rows in that order; the epoch has
rows // global_batch steps (the remainder rows are dropped and counted). Step s maps to
(epoch, batch within epoch) by walking the epochs' step counts, so nothing but the step
is needed to resume, whatever the number of hosts. Process p of P takes rows
[p * G / P, (p + 1) * G / P) of the global batch of G rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from derta_jax.data import packing, tokenize
from derta_jax.data.records import Example


@dataclasses.dataclass
class _Epoch:
  fitted: list
  flags: np.ndarray  # per example: bits of the packing.CUTS made to fit seq_len
  kinds: list[str]
  rows: list[list[int]]
  stats: packing.EncodeStats


class Pipeline:
  """`batch(step)`: this process's rows of global batch `step`, a dict of numpy arrays."""

  def __init__(self, examples: Sequence[Example] | Callable[[int], Sequence[Example]],
               tokenizer: tokenize.Tokenizer, *, seq_len: int, global_batch: int, seed: int,
               refusal_ids=None, pack: bool = True, window: int = 16,
               process_index: int | None = None, process_count: int | None = None):
    if process_index is None or process_count is None:
      import jax

      process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch % process_count:
      raise ValueError(f"train.global_batch ({global_batch}) must be divisible by the number "
                       f"of processes ({process_count})")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self._examples = examples if callable(examples) else (lambda epoch: examples)
    self.tokenizer = tokenizer
    self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
    self.refusal_id = packing.first_refusal_id(refusal_ids)
    self.pack, self.window = pack, window
    self.process_index, self.process_count = process_index, process_count
    self._cache: dict[str, list[int]] = {}
    self._epochs: dict[int, _Epoch] = {}
    # Steps of every epoch built so far: `locate` walks them all at every step, and only
    # the last two epochs' rows are kept.
    self._steps: dict[int, int] = {}

  def epoch(self, epoch: int) -> _Epoch:
    """The packed rows of one epoch (computed once; every process computes the same)."""
    if epoch not in self._epochs:
      examples = self._examples(epoch)
      if not examples:
        raise ValueError(f"epoch {epoch} has no examples")
      order = np.random.default_rng([self.seed, epoch]).permutation(len(examples))
      examples = [examples[i] for i in order]
      stats = packing.EncodeStats(examples=len(examples))
      fitted, flags = zip(*(packing.cut_example(p, self.seq_len) for p in
                            packing.tokenize_examples(examples, self.tokenizer, self._cache)),
                          strict=True)
      for f in flags:
        stats.add(f)
      lengths = [packing.unit_length(f) for f in fitted]
      rows = (packing.pack_rows(lengths, self.seq_len, window=self.window) if self.pack
              else [[i] for i in range(len(examples))])
      if len(rows) < self.global_batch:
        raise ValueError(f"epoch {epoch} packs into {len(rows)} rows, fewer than "
                         f"train.global_batch ({self.global_batch})")
      stats.rows, stats.tokens = len(rows), int(sum(lengths))
      self._epochs = {e: v for e, v in self._epochs.items() if e >= epoch - 1}
      self._epochs[epoch] = _Epoch(list(fitted), np.asarray(flags), [e.kind for e in examples],
                                   rows, stats)
      self._steps[epoch] = len(rows) // self.global_batch
    return self._epochs[epoch]

  def steps_in_epoch(self, epoch: int) -> int:
    if epoch not in self._steps:
      self.epoch(epoch)
    return self._steps[epoch]

  def locate(self, step: int) -> tuple[int, int]:
    """(epoch, batch index within it) of a global step."""
    if step < 0:
      raise ValueError(f"step {step} < 0")
    epoch = 0
    while step >= (n := self.steps_in_epoch(epoch)):
      step, epoch = step - n, epoch + 1
    return epoch, step

  def _rows(self, step: int, lo: int, hi: int) -> dict[str, np.ndarray]:
    epoch, index = self.locate(step)
    data = self.epoch(epoch)
    first = index * self.global_batch
    return packing.build_rows(data.fitted, data.kinds, data.rows[first + lo:first + hi],
                               seq_len=self.seq_len, bos_id=self.tokenizer.bos_id,
                               pad_id=self.tokenizer.pad_id, refusal_id=self.refusal_id)

  def cuts_at(self, step: int) -> dict[str, int]:
    """How many examples of global step `step` were cut to fit seq_len, per kind of cut."""
    epoch, index = self.locate(step)
    data = self.epoch(epoch)
    rows = data.rows[index * self.global_batch:(index + 1) * self.global_batch]
    flags = data.flags[[i for row in rows for i in row]]
    return {f"cut_{name.split('_')[0]}": int((flags >> i & 1).sum())
            for i, name in enumerate(packing.CUTS)}

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's [global_batch / process_count, seq_len] rows of global step `step`."""
    local = self.global_batch // self.process_count
    return self._rows(step, self.process_index * local, (self.process_index + 1) * local)

  def global_batch_at(self, step: int) -> dict[str, np.ndarray]:
    """All rows of global step `step` (what the processes' slices add up to)."""
    return self._rows(step, 0, self.global_batch)
