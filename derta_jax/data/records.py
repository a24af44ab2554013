"""The records the data pipeline passes around, and its one error type."""

from __future__ import annotations

import dataclasses

KINDS = ("mle", "rto")


class DataError(ValueError):
  """Bad input data; the message names the file, the line and the field."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One training example.

  prompt: the model input before the response (template applied).
  response: the text after it; an MLE target when kind == "mle", the RTO positions when
    kind == "rto" (every response position is trained towards the refusal token).
  harmful_prefix: for prefix-MLE examples, the harmful-response words placed between
    prompt and response (input only, never a target); kept apart so that truncation can
    shorten it first. In the upstream format it is part of "prefix".
  """

  prompt: str
  response: str
  kind: str = "mle"
  harmful_prefix: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Example.kind={self.kind!r}; choose one of {KINDS}")


@dataclasses.dataclass(frozen=True)
class Triple:
  """A harmful question with a harmful (`output`) and a safe response (BeaverTails style)."""

  instruction: str
  output: str
  safe_response: str


@dataclasses.dataclass(frozen=True)
class Helpful:
  """An instruction-following pair."""

  instruction: str
  output: str


@dataclasses.dataclass(frozen=True)
class EvalItem:
  """An evaluation prompt, with a reference answer for GSM8K / MMLU style files, and for
  over-refusal files its prompt type and whether it is safe to answer."""

  question: str
  answer: str | None = None
  type: str | None = None
  safe: bool | None = None
