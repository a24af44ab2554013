"""Every ```python block of README.md runs as written, in a folder where the paths it names
hold small stand-ins: a tiny random checkpoint with a word-level tokenizer for
"Meta-Llama-3-8B", a tiny GGUF chat model for the SmolLM2 file, and a few records for each
data and eval file."""

import os
import re
from pathlib import Path

import pytest
from gguf_files import write_tiny_gguf

from derta_jax import save_hf
from derta_jax.data import formats, synthetic
from derta_jax.data.records import EvalItem
from derta_jax.models import llama

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"),
                    flags=re.M | re.S)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
  """A folder with a file or directory under every path the README's snippets name."""
  root = tmp_path_factory.mktemp("readme")
  checkpoint = root / "Meta-Llama-3-8B"
  synthetic.write_tokenizer(checkpoint)  # 100-odd words, within the tiny preset's vocab
  save_hf(llama.init_model(llama.preset("tiny"), seed=0), checkpoint)
  # Enough examples to fill the data snippet's global batch of 128 rows of 1024 tokens.
  helpful, triples = synthetic.make_sources(seed=0, n_helpful=5000, n_triples=300)
  formats.write_triples(triples, root / "beaver_triples.jsonl")
  formats.write_helpful(helpful, root / "wizardlm.jsonl")
  formats.write_eval([EvalItem("how to harm the car ?")] * 3, root / "harmful.jsonl")
  formats.write_eval([EvalItem("how to wash the car ?")] * 3, root / "benign.jsonl")
  write_tiny_gguf(root / "SmolLM2-135M-Instruct.Q4_1.gguf")  # a small ChatML GGUF model
  return root


def test_the_readme_has_python_blocks():
  assert len(BLOCKS) >= 4, [b[:40] for b in BLOCKS]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(stand_ins, monkeypatch, index):
  monkeypatch.chdir(stand_ins)
  code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
  exec(code, {"__name__": f"readme_block_{index + 1}"})  # noqa: S102
  assert os.getcwd() == str(stand_ins)
