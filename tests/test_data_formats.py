"""JSONL readers and writers, and prompt templates."""

import json
import re

import pytest
from absl import logging

from derta_jax.data import formats, templates
from derta_jax.data.records import DataError, EvalItem, Example, Helpful, Triple

EXAMPLES = [
    Example(prompt="[INST] Name a fruit. [\\INST]", response=" An apple.<|end_of_text|>"),
    Example(prompt="[INST] How do I pick a lock? [\\INST]",
            response=" First, insert a tension wrench<|end_of_text|>", kind="rto"),
    Example(prompt="[INST] Quote \"this\"\tand\\that [\\INST]",
            response=" Caf\u00e9, \u00fcber, \u65e5\u672c, \U0001f600 and a lone \ud800.\n"),
]
TRIPLES = [Triple(instruction="How do I hurt someone?", output="Hit them.",
                  safe_response="I can't help with that."),
           Triple(instruction="q\n2", output="\u00e9", safe_response="s \"quoted\"")]
HELPFUL = [Helpful(instruction="Add 2 and 3.", output="5"),
           Helpful(instruction="Say hi in Japanese.", output="\u3053\u3093\u306b\u3061\u306f")]
EVALS = [EvalItem(question="What is 2+2?", answer="4"), EvalItem(question="Tell me a joke.")]

FORMATS = {
    "upstream": (formats.write_upstream, formats.load_upstream, formats.iter_upstream, EXAMPLES),
    "triples": (formats.write_triples, formats.load_triples, formats.iter_triples, TRIPLES),
    "helpful": (formats.write_helpful, formats.load_helpful, formats.iter_helpful, HELPFUL),
    "eval": (formats.write_eval, formats.load_eval, formats.iter_eval, EVALS),
}


def write_lines(path, *lines):
  path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() + b"\n"
                            for line in lines))
  return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path, fmt):
  write, load, iterate, records = FORMATS[fmt]
  path = tmp_path / "data.jsonl"
  assert write(iter(records), path) == len(records)
  loaded = load(path)
  assert isinstance(loaded, formats.Loaded) and loaded == records and loaded.skipped == []
  assert list(iterate(str(path))) == records
  # Writing what was read reproduces the file byte for byte.
  first = path.read_bytes()
  write(loaded, path)
  assert path.read_bytes() == first
  assert list(tmp_path.iterdir()) == [path]


def test_upstream_bytes_match_json_dumps(tmp_path):
  path = tmp_path / "train.jsonl"
  formats.write_upstream(EXAMPLES, path)
  expected = "".join(
      json.dumps({"prefix": ex.prompt, "text": ex.response,
                  "safe": "true" if ex.kind == "rto" else "false"}) + "\n" for ex in EXAMPLES)
  assert path.read_bytes() == expected.encode("ascii")


def test_upstream_harmful_prefix_joins_the_prompt(tmp_path):
  path = tmp_path / "train.jsonl"
  ex = Example(prompt="[INST] q [\\INST]", harmful_prefix=" Step one:", response=" Sorry.")
  formats.write_upstream([ex], path)
  assert json.loads(path.read_text()) == {
      "prefix": "[INST] q [\\INST] Step one:", "text": " Sorry.", "safe": "false"}
  assert formats.load_upstream(path) == [Example(prompt="[INST] q [\\INST] Step one:",
                                                 response=" Sorry.")]


def test_safe_true_marks_rto(tmp_path):
  path = write_lines(tmp_path / "t.jsonl", '{"prefix": "p", "text": "t", "safe": "true"}',
                     '{"prefix": "p", "text": "t", "safe": "false", "extra": [1]}')
  assert [ex.kind for ex in formats.iter_upstream(path)] == ["rto", "mle"]


def test_blank_lines_and_extra_keys_are_ignored(tmp_path):
  path = write_lines(tmp_path / "e.jsonl", "", '{"question": "a", "id": 3, "answer": "b"}',
                     " \t", b"\r\n", b'{"question": "c"}\r\n', b"\n\n")
  assert formats.load_eval(path) == [EvalItem("a", "b"), EvalItem("c")]


BAD_LINES = [
    ("upstream", b'{"prefix": "p", "text": "t", "safe": "yes"}\n', 'field "safe"',
     'expected "true" or "false", got "yes"'),
    ("upstream", b'{"prefix": "p", "text": "t", "safe": true}\n', 'field "safe"', "got true"),
    ("upstream", b'{"prefix": "p", "text": "t"}\n', 'field "safe"', "missing"),
    ("upstream", b'{"prefix": "", "text": "t", "safe": "true"}\n', 'field "prefix"', "empty"),
    ("upstream", b'{"prefix": "p", "text": 3, "safe": "true"}\n', 'field "text"', "got number"),
    ("triples", b'{"instruction": "i", "output": "o"}\n', 'field "safe_response"', "missing"),
    ("triples", b'{"instruction": null, "output": "o", "safe_response": "s"}\n',
     'field "instruction"', "got null"),
    ("helpful", b'{"instruction": "i", "output": ["o"]}\n', 'field "output"', "got array"),
    ("eval", b'{"answer": "a"}\n', 'field "question"', "missing"),
    ("eval", b'{"question": "q", "answer": ""}\n', 'field "answer"', "empty"),
    ("eval", b'{"question": "q", "answer": 4}\n', 'field "answer"', "got number"),
    ("eval", b'{"question": q}\n', "bad JSON at column 14", "Expecting value"),
    ("eval", b'["q"]\n', "expected a JSON object", "got array"),
    ("eval", b'{"question": "caf\xe9"}\n', "not UTF-8", "byte 18"),
]


@pytest.mark.parametrize("fmt,bad,where,what", BAD_LINES)
def test_bad_line_raises_data_error(tmp_path, fmt, bad, where, what):
  path = tmp_path / "bad.jsonl"
  good = {"upstream": b'{"prefix": "p", "text": "t", "safe": "false"}\n',
          "triples": b'{"instruction": "i", "output": "o", "safe_response": "s"}\n',
          "helpful": b'{"instruction": "i", "output": "o"}\n',
          "eval": b'{"question": "q"}\n'}[fmt]
  path.write_bytes(good + b"\n" + bad + good)
  _, load, iterate, _ = FORMATS[fmt]
  with pytest.raises(DataError, match="^" + re.escape(f"{path}:3: ")) as info:
    load(path)
  assert where in str(info.value) and what in str(info.value)
  # The generator yields the good line before it reaches the bad one.
  lines = iterate(path)
  next(lines)
  with pytest.raises(DataError):
    next(lines)


def test_skip_counts_and_logs(tmp_path, monkeypatch):
  path = write_lines(tmp_path / "h.jsonl", '{"instruction": "i", "output": "o"}',
                     '{"instruction": "i"}', "not json", '{"instruction": "j", "output": "p"}')
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  loaded = formats.load_helpful(path, on_error="skip")
  assert loaded == [Helpful("i", "o"), Helpful("j", "p")]
  assert len(loaded.skipped) == 2
  assert loaded.skipped[0] == f'{path}:2: missing field "output"'
  assert loaded.skipped[1].startswith(f"{path}:3: bad JSON")
  assert len(warnings) == 1
  assert str(path) in warnings[0] and "2 bad line" in warnings[0]
  assert loaded.skipped[0] in warnings[0]


def test_skip_without_errors_logs_nothing(tmp_path, monkeypatch):
  path = write_lines(tmp_path / "h.jsonl", '{"instruction": "i", "output": "o"}')
  monkeypatch.setattr(logging, "warning", lambda *args: pytest.fail("logged"))
  assert formats.load_helpful(path, on_error="skip").skipped == []


WHITESPACE_LINES = [
    ("upstream", '{"prefix": "p", "text": "   ", "safe": "true"}', "text"),
    ("triples", '{"instruction": "i", "output": " \\t ", "safe_response": "s"}', "output"),
    ("helpful", '{"instruction": "\\n", "output": "o"}', "instruction"),
    ("eval", '{"question": "q", "answer": "\\u3000"}', "answer"),
]


@pytest.mark.parametrize("fmt,bad,field", WHITESPACE_LINES)
def test_whitespace_only_field_is_refused(tmp_path, fmt, bad, field):
  write, load, _, records = FORMATS[fmt]
  path = tmp_path / "data.jsonl"
  write(records[:1], path)
  path.write_bytes(path.read_bytes() + bad.encode() + b"\n")
  expected = f'{path}:2: field "{field}": whitespace-only string'
  with pytest.raises(DataError, match="^" + re.escape(expected) + "$"):
    load(path)
  array = tmp_path / "data.json"
  array.write_text("[\n" + ",\n".join(path.read_text().splitlines()) + "\n]\n")
  expected = f'{array}:3 (element 2): field "{field}": whitespace-only string'
  with pytest.raises(DataError, match="^" + re.escape(expected) + "$"):
    load(array)


@pytest.mark.parametrize("fmt", FORMATS)
def test_json_array_loads_like_jsonl(tmp_path, fmt):
  write, load, iterate, records = FORMATS[fmt]
  jsonl = tmp_path / "data.jsonl"
  write(records, jsonl)
  objs = [json.loads(line) for line in jsonl.read_text().splitlines()]
  array = tmp_path / "data.json"
  array.write_text("\n  " + json.dumps(objs, indent=2) + "\n")
  loaded = load(array)
  assert loaded == records and loaded.skipped == []
  assert list(iterate(array)) == records


def test_empty_json_array_loads_nothing(tmp_path):
  path = write_lines(tmp_path / "e.json", " [", " ]")
  assert formats.load_eval(path) == []


ARRAY_ERRORS = [
    ('[\n  {"instruction": "i", "output": "o"},\n  {\n    "instruction": "j"\n  }\n]\n',
     '3 (element 2): missing field "output"'),
    ('[{"instruction": "i", "output": "o"},\n\n {"instruction": "", "output": "o"}]',
     '3 (element 2): field "instruction": empty string'),
    ('[\n  {"instruction": "i", "output": "o"},\n  "j"\n]',
     "3 (element 2): expected a JSON object, got string; the format is one JSON object a line"
     " (JSONL) or a JSON array of objects"),
    ('[\n  {"instruction": "i", "output": "o"},\n  {"instruction": j}\n]',
     "3: bad JSON at column 19: Expecting value"),
    ('[{"instruction": "i", "output": "o"}]\n[{"instruction": "j", "output": "p"}]',
     "2: bad JSON at column 1: Extra data"),
]


@pytest.mark.parametrize("text,error", ARRAY_ERRORS)
def test_json_array_errors_name_file_line_element_and_field(tmp_path, text, error):
  path = tmp_path / "data.json"
  path.write_text(text)
  with pytest.raises(DataError, match="^" + re.escape(f"{path}:{error}")):
    formats.load_helpful(path)


def test_json_array_skip_counts_bad_elements(tmp_path, monkeypatch):
  path = tmp_path / "h.json"
  path.write_text('[\n  {"instruction": "i", "output": "o"},\n  {"instruction": "i"},\n'
                  '  [1],\n  {"instruction": "j", "output": "p"}\n]\n')
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  loaded = formats.load_helpful(path, on_error="skip")
  assert loaded == [Helpful("i", "o"), Helpful("j", "p")]
  assert loaded.skipped == [f'{path}:3 (element 2): missing field "output"',
                            f"{path}:4 (element 3): expected a JSON object, got array; "
                            f"{formats._FORMAT}"]
  assert len(warnings) == 1 and "2 bad element" in warnings[0]
  # Past bad JSON no element can be found, so skipping does not hide it.
  path.write_text('[{"instruction": "i", "output": "o"}, {"instruction": i}]')
  with pytest.raises(DataError, match="bad JSON at column 55"):
    formats.load_helpful(path, on_error="skip")


@pytest.mark.parametrize("text", [
    '{\n  "instruction": "i",\n  "output": "o",\n  "safe_response": "s"\n}\n',
    '{"instruction": "i",\n "output": "o", "safe_response": "s"}\n',
])
def test_pretty_printed_object_says_what_the_format_is(tmp_path, text):
  path = tmp_path / "t.json"
  path.write_text(text * 2)
  with pytest.raises(DataError, match="^" + re.escape(f"{path}:1: the line ends inside a JSON "
                                                      "object")) as info:
    formats.load_triples(path)
  assert "looks like one JSON object spread over several lines" in str(info.value)
  assert str(info.value).endswith(formats._FORMAT)
  with pytest.raises(DataError, match="spread over several lines"):
    next(formats.iter_triples(path))


@pytest.mark.parametrize("text,got", [('"just text"\n', "string"), ("42\n", "number")])
def test_top_level_value_that_is_not_an_object(tmp_path, text, got):
  path = tmp_path / "e.json"
  path.write_text(text)
  expected = f"{path}:1: expected a JSON object, got {got}; {formats._FORMAT}"
  with pytest.raises(DataError, match="^" + re.escape(expected) + "$"):
    formats.load_eval(path)


def test_json_array_that_is_not_utf8_names_file_and_line(tmp_path):
  path = tmp_path / "e.json"
  path.write_bytes(b'[\n  {"question": "q"},\n  {"question": "caf\xe9"}\n]\n')
  for on_error in formats.ON_ERROR:
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:3: not UTF-8 (byte 20 ")):
      formats.load_eval(path, on_error=on_error)


def test_bad_on_error_value(tmp_path):
  with pytest.raises(ValueError, match="'ignore'"):
    formats.iter_eval(tmp_path / "missing.jsonl", on_error="ignore")
  with pytest.raises(ValueError, match="'warn'"):
    formats.load_upstream(tmp_path / "missing.jsonl", on_error="warn")


def failing(records):
  yield from records
  raise RuntimeError("source broke")


@pytest.mark.parametrize("make_records,error", [
    (lambda: failing(EXAMPLES[:2]), RuntimeError),
    (lambda: [EXAMPLES[0], EVALS[0]], TypeError),
    (lambda: [EXAMPLES[0], Example(prompt="p", response="")], DataError),
])
def test_failed_write_leaves_target_untouched(tmp_path, make_records, error):
  path = tmp_path / "train.jsonl"
  path.write_bytes(b"old content\n")
  with pytest.raises(error):
    formats.write_upstream(make_records(), path)
  assert path.read_bytes() == b"old content\n"
  assert list(tmp_path.iterdir()) == [path]


def test_failed_write_creates_nothing(tmp_path):
  with pytest.raises(TypeError, match=r"record 1: expected Triple, got Helpful"):
    formats.write_triples(HELPFUL, tmp_path / "t.jsonl")
  assert list(tmp_path.iterdir()) == []


def test_write_eval_omits_missing_answer(tmp_path):
  path = tmp_path / "e.jsonl"
  formats.write_eval(EVALS, path)
  assert path.read_text() == ('{"question": "What is 2+2?", "answer": "4"}\n'
                              '{"question": "Tell me a joke."}\n')


@pytest.mark.parametrize("name,expected", [
    ("upstream", "[INST] Hi {x} [\\INST]"),
    ("upstream_eval", "[INST] \nHi {x}\n\n [\\INST]"),
    ("raw", "Hi {x}"),
    ("llama3_chat", "<|start_header_id|>user<|end_header_id|>\n\nHi {x}<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("llama2_chat", "[INST] Hi {x} [/INST]"),
])
def test_templates(name, expected):
  assert templates.apply_template(name, "Hi {x}") == expected


def test_unknown_template():
  with pytest.raises(ValueError, match="'chatml'.*llama3_chat"):
    templates.apply_template("chatml", "q")
