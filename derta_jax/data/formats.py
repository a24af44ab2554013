"""Streaming JSONL readers and writers for the four data formats, one JSON object a line.

  upstream  {"prefix": str, "text": str, "safe": "true"|"false"}  -> Example
            ("true" marks an RTO row, "false" an MLE row; the authors' training format)
  triples   {"instruction": str, "output": str, "safe_response": str}  -> Triple
  helpful   {"instruction": str, "output": str}  -> Helpful
  eval      {"question": str[, "answer": str]}  -> EvalItem

Extra keys are ignored and whitespace-only lines are skipped. Any other bad line raises
DataError naming the file, the 1-based line and the field, or with on_error="skip" is left
out and counted. Writers emit `json.dumps(obj) + "\\n"` like the authors' scripts, so an
upstream file read and written back is byte-identical. Paths are local or gs:// (etils.epath).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from absl import logging
from etils import epath

from derta_jax.data.records import DataError, EvalItem, Example, Helpful, Triple

PathLike = str | os.PathLike
ON_ERROR = ("raise", "skip")
# JSON's own whitespace; anything else on a line is reported, not silently dropped.
_BLANK = " \t\r\n"
_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number",
               str: "string", list: "array", dict: "object"}


class Loaded(list):
  """The records of a file; `skipped` holds the messages of the bad lines left out."""

  def __init__(self, records: Iterable[Any] = (), skipped: Iterable[str] = ()):
    super().__init__(records)
    self.skipped = list(skipped)


def _json_type(value: Any) -> str:
  return _JSON_TYPES.get(type(value), type(value).__name__)


def _shown(value: Any, limit: int = 60) -> str:
  text = json.dumps(value, default=repr)
  return text if len(text) <= limit else text[:limit] + "..."


def _field(obj: dict, key: str, where: str) -> Any:
  if key not in obj:
    raise DataError(f'{where}: missing field "{key}"')
  return obj[key]


def _text(obj: dict, key: str, where: str) -> str:
  value = _field(obj, key, where)
  if not isinstance(value, str):
    raise DataError(f'{where}: field "{key}": expected a string, got {_json_type(value)}')
  if not value:
    raise DataError(f'{where}: field "{key}": empty string')
  return value


def _parse_upstream(obj: dict, where: str) -> Example:
  prompt = _text(obj, "prefix", where)
  response = _text(obj, "text", where)
  safe = _field(obj, "safe", where)
  if safe not in ("true", "false"):
    raise DataError(f'{where}: field "safe": expected "true" or "false", got {_shown(safe)}')
  return Example(prompt=prompt, response=response, kind="rto" if safe == "true" else "mle")


def _parse_triple(obj: dict, where: str) -> Triple:
  return Triple(instruction=_text(obj, "instruction", where), output=_text(obj, "output", where),
                safe_response=_text(obj, "safe_response", where))


def _parse_helpful(obj: dict, where: str) -> Helpful:
  return Helpful(instruction=_text(obj, "instruction", where), output=_text(obj, "output", where))


def _parse_eval(obj: dict, where: str) -> EvalItem:
  question = _text(obj, "question", where)
  answer = _text(obj, "answer", where) if "answer" in obj else None
  return EvalItem(question=question, answer=answer)


def _parse_line(raw: bytes, where: str, parse: Callable[[dict, str], Any]) -> Any:
  """The record on one line, or None for a blank line."""
  try:
    # Decoded per line, not by the file object, so that the error can name the line.
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not UTF-8 (byte {e.start + 1} of the line: {e.reason})") from None
  if not line.strip(_BLANK):
    return None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: bad JSON at column {e.colno}: {e.msg}") from None
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object, got {_json_type(obj)}")
  return parse(obj, where)


def _records(path: PathLike, parse, on_error: str, skipped: list[str]) -> Iterator[Any]:
  name = os.fspath(path)
  with epath.Path(path).open("rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        record = _parse_line(raw, f"{name}:{lineno}", parse)
      except DataError as e:
        if on_error == "raise":
          raise
        skipped.append(str(e))
        continue
      if record is not None:
        yield record
  if skipped:
    logging.warning("%s: skipped %d bad line(s); the first: %s", name, len(skipped), skipped[0])


def _iter(path: PathLike, parse, on_error: str, skipped: list[str] | None = None):
  # Checked here rather than inside the generator, so a bad value fails at the call.
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r}; choose one of {ON_ERROR}")
  return _records(path, parse, on_error, [] if skipped is None else skipped)


def _load(path: PathLike, parse, on_error: str) -> Loaded:
  skipped = []
  records = list(_iter(path, parse, on_error, skipped))
  return Loaded(records, skipped)


def iter_upstream(path: PathLike, *, on_error: str = "raise") -> Iterator[Example]:
  """Examples from an upstream training file, read line by line."""
  return _iter(path, _parse_upstream, on_error)


def iter_triples(path: PathLike, *, on_error: str = "raise") -> Iterator[Triple]:
  """Triples from a JSONL file, read line by line."""
  return _iter(path, _parse_triple, on_error)


def iter_helpful(path: PathLike, *, on_error: str = "raise") -> Iterator[Helpful]:
  """Helpful pairs from a JSONL file, read line by line."""
  return _iter(path, _parse_helpful, on_error)


def iter_eval(path: PathLike, *, on_error: str = "raise") -> Iterator[EvalItem]:
  """Evaluation items from a JSONL file, read line by line."""
  return _iter(path, _parse_eval, on_error)


def load_upstream(path: PathLike, *, on_error: str = "raise") -> Loaded:
  """All Examples of an upstream training file."""
  return _load(path, _parse_upstream, on_error)


def load_triples(path: PathLike, *, on_error: str = "raise") -> Loaded:
  """All Triples of a JSONL file."""
  return _load(path, _parse_triple, on_error)


def load_helpful(path: PathLike, *, on_error: str = "raise") -> Loaded:
  """All Helpful pairs of a JSONL file."""
  return _load(path, _parse_helpful, on_error)


def load_eval(path: PathLike, *, on_error: str = "raise") -> Loaded:
  """All EvalItems of a JSONL file."""
  return _load(path, _parse_eval, on_error)


def _write(path: PathLike, records: Iterable[Any], cls: type, to_obj, parse) -> int:
  """Writes to a temporary sibling, renamed over `path` only once every record is written."""
  name = os.fspath(path)
  target = epath.Path(path)
  tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
  count = 0
  try:
    with tmp.open("wb") as f:
      for count, record in enumerate(records, start=1):
        where = f"{name}: record {count}"
        if not isinstance(record, cls):
          raise TypeError(f"{where}: expected {cls.__name__}, got {type(record).__name__}")
        obj = to_obj(record)
        # A file the readers would reject is never written.
        parse(obj, where)
        f.write((json.dumps(obj) + "\n").encode("utf-8"))
    # os.replace for local paths; a rename with overwrite for gs://.
    tmp.replace(target)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return count


def _upstream_obj(ex: Example) -> dict:
  return {"prefix": ex.prompt + ex.harmful_prefix, "text": ex.response,
          "safe": "true" if ex.kind == "rto" else "false"}


def _triple_obj(t: Triple) -> dict:
  return {"instruction": t.instruction, "output": t.output, "safe_response": t.safe_response}


def _helpful_obj(h: Helpful) -> dict:
  return {"instruction": h.instruction, "output": h.output}


def _eval_obj(item: EvalItem) -> dict:
  obj = {"question": item.question}
  if item.answer is not None:
    obj["answer"] = item.answer
  return obj


def write_upstream(examples: Iterable[Example], path: PathLike) -> int:
  """Writes Examples in the upstream training format; returns how many."""
  return _write(path, examples, Example, _upstream_obj, _parse_upstream)


def write_triples(triples: Iterable[Triple], path: PathLike) -> int:
  """Writes Triples as JSONL; returns how many."""
  return _write(path, triples, Triple, _triple_obj, _parse_triple)


def write_helpful(pairs: Iterable[Helpful], path: PathLike) -> int:
  """Writes Helpful pairs as JSONL; returns how many."""
  return _write(path, pairs, Helpful, _helpful_obj, _parse_helpful)


def write_eval(items: Iterable[EvalItem], path: PathLike) -> int:
  """Writes EvalItems as JSONL, without "answer" where it is None; returns how many."""
  return _write(path, items, EvalItem, _eval_obj, _parse_eval)
