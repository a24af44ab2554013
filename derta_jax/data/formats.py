"""Streaming JSONL readers and writers for the four data formats, one JSON object a line.

  upstream  {"prefix": str, "text": str, "safe": "true"|"false"}  -> Example
            ("true" marks an RTO row, "false" an MLE row; the authors' training format,
            which writes "safe" examples as MLE rows and has no form for "harm" or "pair")
  triples   {"instruction": str, "output": str, "safe_response": str}  -> Triple
  helpful   {"instruction": str, "output": str}  -> Helpful
  eval      {"question": str[, "answer": str][, "type": str, "safe": bool]}  -> EvalItem

The readers also take a file that is one JSON array of such objects (its first non-blank
byte is "["), read whole. Extra keys are ignored and whitespace-only lines are skipped; a
field that is empty or whitespace-only is refused. Any other bad line or array element
raises DataError naming the file, the 1-based line (where the element starts) and the field,
or with on_error="skip" is left out and counted; an array file that is not UTF-8 or not
valid JSON always raises, since no element after the fault can be found. Writers emit
`json.dumps(obj) + "\\n"` like the authors' scripts, so a JSONL file read and written back is
byte-identical. Paths are local or gs:// (etils.epath).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from absl import logging
from etils import epath

from derta_jax.data.records import DataError, EvalItem, Example, Helpful, Triple

# The kinds of the Examples an upstream file gives.
UPSTREAM_KINDS = ("mle", "rto")

PathLike = str | os.PathLike
ON_ERROR = ("raise", "skip")
# JSON's own whitespace; anything else on a line is reported, not silently dropped.
_BLANK = " \t\r\n"
_BLANK_BYTES = _BLANK.encode()
# What lies between two elements of a valid JSON array, or before its first.
_BETWEEN = re.compile(r"[ \t\r\n]*,?[ \t\r\n]*")
_FORMAT = "the format is one JSON object a line (JSONL) or a JSON array of objects"
_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number",
               str: "string", list: "array", dict: "object"}


class Loaded(list):
  """The records of a file; `where` says where each is ("file:line", with " (element n)" in
  an array file); `skipped` holds the messages of the bad lines (or elements) left out."""

  def __init__(self, records: Iterable[Any] = (), skipped: Iterable[str] = (),
               where: Iterable[str] = ()):
    super().__init__(records)
    self.skipped = list(skipped)
    self.where = list(where)


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
  if value.isspace():
    raise DataError(f'{where}: field "{key}": whitespace-only string')
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
  kind = _text(obj, "type", where) if "type" in obj else None
  safe = obj.get("safe")
  if safe is not None and not isinstance(safe, bool):
    raise DataError(f'{where}: field "safe": expected true or false, got {_json_type(safe)}')
  return EvalItem(question=question, answer=answer, type=kind, safe=safe)


def _parse_value(obj: Any, where: str, parse: Callable[[dict, str], Any]) -> Any:
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object, got {_json_type(obj)}; {_FORMAT}")
  return parse(obj, where)


def _bad_json(line: str, e: json.JSONDecodeError, where: str) -> DataError:
  # An object cut off by the end of its line is most likely a pretty-printed file.
  if line.lstrip(_BLANK).startswith("{") and e.pos >= len(line.rstrip(_BLANK)):
    return DataError(f"{where}: the line ends inside a JSON object ({e.msg}); the file looks "
                     f"like one JSON object spread over several lines, but {_FORMAT}")
  return DataError(f"{where}: bad JSON at column {e.colno}: {e.msg}")


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
    raise _bad_json(line, e, where) from None
  return _parse_value(obj, where, parse)


def _array(data: bytes, name: str) -> Iterator[tuple[int, Any]]:
  """(line, value) for each element of a JSON array file, the line being where it starts."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    lineno = data.count(b"\n", 0, e.start) + 1
    byte = e.start - data.rfind(b"\n", 0, e.start)
    raise DataError(f"{name}:{lineno}: not UTF-8 (byte {byte} of the line: {e.reason})") from None
  try:
    values = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{name}:{e.lineno}: bad JSON at column {e.colno}: {e.msg}") from None
  # The text is valid JSON, so decoding element by element finds where each one starts.
  decoder = json.JSONDecoder()
  pos = text.index("[") + 1
  lineno, counted = 1, 0
  for value in values:
    pos = _BETWEEN.match(text, pos).end()
    lineno += text.count("\n", counted, pos)
    counted = pos
    _, pos = decoder.raw_decode(text, pos)
    yield lineno, value


def _head(f) -> list[bytes]:
  """The leading blank lines of a file and its first other line."""
  head = []
  for raw in f:
    head.append(raw)
    if raw.strip(_BLANK_BYTES):
      break
  return head


def _records(path: PathLike, parse, on_error: str, skipped: list[str]) -> Iterator[Any]:
  """(where, record) of each good line or array element."""
  name = os.fspath(path)
  with epath.Path(path).open("rb") as f:
    head = _head(f)
    is_array = b"".join(head).lstrip(_BLANK_BYTES).startswith(b"[")
    if is_array:
      elements = enumerate(_array(b"".join(head) + f.read(), name), start=1)
      steps = ((_parse_value, value, f"{name}:{lineno} (element {i})")
               for i, (lineno, value) in elements)
    else:
      lines = enumerate(itertools.chain(head, f), start=1)
      steps = ((_parse_line, raw, f"{name}:{lineno}") for lineno, raw in lines)
    for step, arg, where in steps:
      try:
        record = step(arg, where, parse)
      except DataError as e:
        if on_error == "raise":
          raise
        skipped.append(str(e))
        continue
      if record is not None:
        yield where, record
  if skipped:
    logging.warning("%s: skipped %d bad %s(s); the first: %s", name, len(skipped),
                    "element" if is_array else "line", skipped[0])


def _iter(path: PathLike, parse, on_error: str, skipped: list[str] | None = None):
  # Checked here rather than inside the generator, so a bad value fails at the call.
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r}; choose one of {ON_ERROR}")
  return (record for _, record in _records(path, parse, on_error,
                                            [] if skipped is None else skipped))


def _load(path: PathLike, parse, on_error: str) -> Loaded:
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r}; choose one of {ON_ERROR}")
  skipped = []
  located = list(_records(path, parse, on_error, skipped))
  return Loaded([r for _, r in located], skipped, [w for w, _ in located])


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
        try:
          obj = to_obj(record)
        except DataError as e:
          raise DataError(f"{where}: {e}") from None
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
  if ex.kind not in ("mle", "safe", "rto"):
    raise DataError(f"an Example of kind {ex.kind!r} has no upstream form (it holds RTO rows "
                    "and MLE rows, which 'mle' and 'safe' examples both become); keep it in "
                    "memory or as triples")
  return {"prefix": ex.prompt + ex.harmful_prefix, "text": ex.response,
          "safe": "true" if ex.kind == "rto" else "false"}


def _triple_obj(t: Triple) -> dict:
  return {"instruction": t.instruction, "output": t.output, "safe_response": t.safe_response}


def _helpful_obj(h: Helpful) -> dict:
  return {"instruction": h.instruction, "output": h.output}


def _eval_obj(item: EvalItem) -> dict:
  obj = {"question": item.question}
  for key in ("answer", "type", "safe"):
    if getattr(item, key) is not None:
      obj[key] = getattr(item, key)
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
