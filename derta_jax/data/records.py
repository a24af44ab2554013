"""The records the data pipeline passes around, and its one error type."""

from __future__ import annotations

import dataclasses

KINDS = ("mle", "rto", "safe", "harm", "pair")


class DataError(ValueError):
  """Bad input data; the message names the file, the line and the field."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One training example.

  prompt: the model input before the response (template applied).
  response: the text after it, trained according to `kind`:
    "mle"   a helpful (utility) response, an MLE target;
    "safe"  a safe response (a refusal, also after a harmful prefix), an MLE target exactly
            like "mle", marked apart so that objectives can tell safety from utility data;
    "rto"   a harmful response whose every position is trained towards the refusal token;
    "harm"  a harmful response whose own tokens are the targets of an unlearning or
            rerouting objective (NPO, circuit breakers), never of MLE;
    "pair"  a preference pair: `response` is the chosen (safe) response, `rejected` the
            rejected (harmful) one, both after the same prompt.
  harmful_prefix: for prefix-MLE examples, the harmful-response words placed between
    prompt and response (input only, never a target); kept apart so that truncation can
    shorten it first. In the upstream format it is part of "prefix". Pairs take none.
  rejected: the rejected response of a "pair"; empty for every other kind.
  """

  prompt: str
  response: str
  kind: str = "mle"
  harmful_prefix: str = ""
  rejected: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Example.kind={self.kind!r}; choose one of {KINDS}")
    if self.kind != "pair" and self.rejected:
      raise ValueError(f"Example.rejected is set on a {self.kind!r} example; only kind "
                       "'pair' has a rejected response")
    if self.kind == "pair" and not self.rejected:
      raise ValueError("a 'pair' Example needs a non-empty rejected response")
    if self.kind == "pair" and self.harmful_prefix:
      raise ValueError(f"a 'pair' Example takes no harmful_prefix (got "
                       f"{self.harmful_prefix[:40]!r}); put it in the prompt")


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
