"""Examples -> packed rows of token ids, targets and masks (the arrays a train step reads).

An example becomes [BOS] + prompt + harmful prefix + response, each part tokenized on its
own, so the boundary between input and target is exact (`tokenize.upstream_boundary_differs`
compares with the authors' one-string tokenization).

Rows (pack=True) hold several examples, each with its own segment id (1, 2, ...; 0 is
padding) and positions restarting at 0; pack=False puts one example per row. A preference
pair is two adjacent segments of one row, [BOS] prompt chosen and [BOS] prompt rejected,
packed as one unit. Position t of a row predicts targets[t] = input_ids[t + 1] of the same
segment; the masks mark positions whose next token is a response token:
  mle_mask       of an "mle" or "safe" example (safety_mask: of a "safe" one)
  rto_mask       of an "rto" example (targets: the refusal id, when one is given)
  harm_mask      of a "harm" example or of a pair's rejected half (targets: its own tokens)
  chosen_mask    of a pair's chosen half
pair_ids holds, at a pair's chosen and rejected positions, the segment id of its chosen
half; response_index counts the supervised positions of a response from 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from absl import logging

from derta_jax.data.records import DataError, Example
from derta_jax.data.tokenize import Tokenizer

ARRAYS = ("input_ids", "targets", "mle_mask", "rto_mask", "segment_ids", "positions",
          "safety_mask", "harm_mask", "chosen_mask", "pair_ids", "response_index")
# The masks set at the supervised positions of each kind of segment (a pair's halves are
# "chosen" and "rejected").
_MASKS = {"mle": ("mle_mask",), "safe": ("mle_mask", "safety_mask"), "rto": ("rto_mask",),
          "harm": ("harm_mask",), "chosen": ("chosen_mask",), "rejected": ("harm_mask",)}



# The cuts fit_example may make, as bits of one example's flags (EncodeStats counts each).
CUTS = ("harmful_prefix_shortened", "response_truncated", "prompt_truncated")


@dataclasses.dataclass
class EncodeStats:
  """What encoding changed, counted per example (`cut`: examples with any of the CUTS)."""

  examples: int = 0
  rows: int = 0
  tokens: int = 0
  cut: int = 0
  harmful_prefix_shortened: int = 0
  response_truncated: int = 0
  prompt_truncated: int = 0

  def add(self, flags: int) -> None:
    """Counts one example's cuts (bit i: CUTS[i])."""
    self.cut += bool(flags)
    for i, name in enumerate(CUTS):
      if flags >> i & 1:
        setattr(self, name, getattr(self, name) + 1)


class Encoded(dict):
  """The arrays of `encode` (a dict of [rows, seq_len] numpy arrays) plus `.stats`."""

  stats: EncodeStats


def tokenize_examples(examples: Sequence[Example], tokenizer: Tokenizer,
                      cache: dict[str, list[int]] | None = None):
  """(prompt, harmful prefix, response, rejected) ids per example (rejected is empty but for
  pairs); each distinct string is encoded once (and once across calls that share `cache`)."""
  cache = {} if cache is None else cache
  texts = sorted({s for e in examples for s in (e.prompt, e.harmful_prefix, e.response,
                                                e.rejected)} - cache.keys())
  if texts:
    cache.update(zip(texts, tokenizer.encode_batch(texts), strict=True))
  out = []
  for e in examples:
    if e.kind == "pair" and not cache[e.rejected]:
      raise DataError(f"a pair's rejected response {e.rejected[:40]!r} encodes to no tokens: "
                      "nothing to train on")
    out.append((cache[e.prompt], cache[e.harmful_prefix], cache[e.response], cache[e.rejected]))
  return out


def unit_length(parts) -> int:
  """Tokens of one fitted example in a row: one segment, or a pair's two."""
  prompt, harmful, response, rejected = parts
  n = 1 + len(prompt) + len(harmful) + len(response)
  return n + 1 + len(prompt) + len(rejected) if rejected else n


def _cut_tails(chosen: int, rejected: int, cut: int) -> tuple[int, int]:
  """The lengths of a pair's responses once `cut` tokens are taken, one at a time, from the
  longer tail (the rejected one on a tie)."""
  even = min(cut, abs(chosen - rejected))
  if chosen > rejected:
    chosen -= even
  else:
    rejected -= even
  rest = cut - even
  return chosen - rest // 2, rejected - (rest - rest // 2)


def _cut_pair(prompt, chosen, rejected, seq_len: int):
  """`cut_example` for a pair: the longer of the two responses' tails first (each keeps one
  token), then the prompt's head, which both halves repeat."""
  excess, flags = 2 + 2 * len(prompt) + len(chosen) + len(rejected) - seq_len, 0
  if excess > 0 and len(chosen) + len(rejected) > 2:
    cut = min(excess, len(chosen) + len(rejected) - 2)
    n_chosen, n_rejected = _cut_tails(len(chosen), len(rejected), cut)
    chosen, rejected, excess, flags = chosen[:n_chosen], rejected[:n_rejected], excess - cut, 2
  if excess > 0:
    if seq_len < 6:
      raise ValueError(f"seq_len={seq_len} leaves no room for a pair: twice BOS, a prompt token "
                       "and a target")
    prompt, flags = prompt[(excess + 1) // 2:], flags | 4
  return (prompt, [], chosen, rejected), flags


def cut_example(parts, seq_len: int):
  """((prompt, harmful prefix, response, rejected) cut to at most seq_len tokens with BOS,
  flags of the CUTS made): the harmful prefix first, then the response's tail (at least one
  response token stays), then the prompt's head. A pair (rejected not empty) must fit both
  halves; see `_cut_pair`."""
  prompt, harmful, response, rejected = parts
  if not response:
    raise DataError("an example has an empty response: nothing to train on")
  if rejected:
    return _cut_pair(prompt, response, rejected, seq_len)
  excess, flags = 1 + len(prompt) + len(harmful) + len(response) - seq_len, 0
  if excess > 0 and harmful:
    cut = min(excess, len(harmful))
    harmful, excess, flags = harmful[:len(harmful) - cut], excess - cut, flags | 1
  if excess > 0 and len(response) > 1:
    cut = min(excess, len(response) - 1)
    response, excess, flags = response[:len(response) - cut], excess - cut, flags | 2
  if excess > 0:
    if seq_len < 3:
      raise ValueError(f"seq_len={seq_len} leaves no room for BOS, a prompt token and a target")
    prompt, flags = prompt[excess:], flags | 4
  return (prompt, harmful, response, rejected), flags


def fit_example(parts, seq_len: int, stats: EncodeStats):
  """`cut_example`'s parts, its cuts counted in `stats`."""
  fitted, flags = cut_example(parts, seq_len)
  stats.add(flags)
  return fitted


def pack_rows(lengths: Sequence[int], seq_len: int, *, window: int = 16):
  """Assign examples, in order, to rows: first fit among the `window` most recent rows.

  Deterministic in the order given. Returns a list of rows, each a list of example indices.
  """
  rows, free, open_rows = [], [], []
  for i, n in enumerate(lengths):
    for r in open_rows:
      if free[r] >= n:
        rows[r].append(i)
        free[r] -= n
        break
    else:
      rows.append([i])
      free.append(seq_len - n)
      open_rows.append(len(rows) - 1)
      if len(open_rows) > window:
        open_rows.pop(0)
  return rows


def build_rows(fitted, kinds: Sequence[str], rows: Sequence[Sequence[int]], *, seq_len: int,
               bos_id: int, pad_id: int, refusal_id: int | None = None) -> dict[str, np.ndarray]:
  """The arrays of the given rows, from fitted (prompt, harmful prefix, response, rejected)
  ids."""
  out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ARRAYS}
  out["input_ids"][:] = pad_id
  for r, members in enumerate(rows):
    row, t, seg = out["input_ids"][r], 0, 0
    for i in members:
      prompt, harmful, response, rejected = fitted[i]
      halves = ([("chosen", response), ("rejected", rejected)] if kinds[i] == "pair"
                else [(kinds[i], response)])
      pair_id = seg + 1 if kinds[i] == "pair" else 0
      for role, target in halves:
        seg += 1
        head = [*prompt, *harmful]  # a pair has no harmful prefix
        n = 1 + len(head) + len(target)
        first_target = n - len(target)
        row[t] = bos_id
        row[t + 1:t + first_target] = head
        row[t + first_target:t + n] = target
        out["segment_ids"][r, t:t + n] = seg
        out["positions"][r, t:t + n] = np.arange(n)
        out["targets"][r, t:t + n - 1] = row[t + 1:t + n]
        supervised = slice(t + first_target - 1, t + n - 1)
        for mask in _MASKS[role]:
          out[mask][r, supervised] = 1
        out["response_index"][r, supervised] = np.arange(len(target))
        out["pair_ids"][r, supervised] = pair_id
        if refusal_id is not None and role == "rto":
          out["targets"][r, supervised] = refusal_id
        t += n
  return out


def first_refusal_id(refusal_ids: Sequence[int] | int | None) -> int | None:
  if refusal_ids is None or isinstance(refusal_ids, (int, np.integer)):
    return refusal_ids
  return tuple(refusal_ids)[0]


def encode(examples: Sequence[Example], tokenizer: Tokenizer, *, seq_len: int,
           refusal_ids: Sequence[int] | int | None = None, pack: bool = True,
           window: int = 16) -> Encoded:
  """Examples -> rows: the ARRAYS (see the module docstring).

  refusal_ids: when given, RTO positions hold the (first) refusal id as their target, so
  `targets` alone shows what every supervised position is trained towards; the loss
  gathers the whole refusal set there either way.
  """
  stats = EncodeStats(examples=len(examples))
  fitted = [fit_example(p, seq_len, stats) for p in tokenize_examples(examples, tokenizer)]
  lengths = [unit_length(f) for f in fitted]
  rows = (pack_rows(lengths, seq_len, window=window) if pack
          else [[i] for i in range(len(examples))])
  out = Encoded(build_rows(fitted, [e.kind for e in examples], rows, seq_len=seq_len,
                           bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id,
                           refusal_id=first_refusal_id(refusal_ids)))
  stats.rows, stats.tokens = len(rows), int(sum(lengths))
  out.stats = stats
  if stats.cut:
    logging.info("encode: %d of %d examples cut to seq_len %d (%s)", stats.cut, len(examples),
                 seq_len, stats)
  return out
