"""The package stays readable: modules under 400 lines, functions under 60, every package
says what it is for. (Import layers are checked by `lint-imports`, run by CI.)"""

import ast
from pathlib import Path

import pytest

from configs import base

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted((ROOT / "derta_jax").rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_function_sizes(path):
  text = path.read_text(encoding="utf-8")
  assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path} holds two concerns: split it"
  long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(text))
          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
          and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_every_package_says_what_it_is_for():
  for init in (ROOT / "derta_jax").rglob("__init__.py"):
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
    assert doc and len(doc.splitlines()) >= 1, f"{init} has no docstring"


def test_configs_functions_are_short():
  for path in sorted((ROOT / "configs").glob("*.py")):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for n in ast.walk(tree):
      if isinstance(n, ast.FunctionDef):
        assert n.end_lineno - n.lineno + 1 <= MAX_FUNCTION_LINES, f"{path}:{n.name}"


def test_base_config_has_a_comment_on_every_field():
  """Each field of configs/base.py sits under a comment (directly, or in a group of fields
  that one comment describes)."""
  lines = (ROOT / "configs" / "base.py").read_text(encoding="utf-8").splitlines()
  fields = 0
  for i, line in enumerate(lines):
    if not line.lstrip().startswith(("c.", "config.mode", "config.seed")):
      continue
    fields += 1
    j = i - 1
    while lines[j].lstrip().startswith(("c.", "config.")):
      j -= 1
    assert lines[j].lstrip().startswith("#"), f"configs/base.py:{i + 1}: {line.strip()}"
  def count(tree):  # fields, nested sections (a field holding a section) included
    return sum(1 + count(v) if isinstance(v, dict) else 1 for v in tree.values())

  sections = len(base.get_config().to_dict()) - 2  # mode and seed are fields
  assert fields == count(base.get_config().to_dict()) - sections  # every field was looked at


def test_public_api_at_the_package_top():
  import derta_jax

  for name in derta_jax.__all__:
    assert getattr(derta_jax, name) is not None, name
  assert callable(derta_jax.generate) and callable(derta_jax.evaluate)
  assert callable(derta_jax.load_hf) and callable(derta_jax.save_hf)
  assert callable(derta_jax.derta_loss) and callable(derta_jax.train)
