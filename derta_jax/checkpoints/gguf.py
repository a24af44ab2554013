"""GGUF (llama.cpp) LLaMA files -> derta_jax models, through the `gguf` package (numpy).

A GGUF file holds the config as metadata (`llama.*`), the tokenizer (`tokenizer.ggml.*`,
read by `data.gguf_vocab`) and the weights under llama.cpp names, often quantized. Each
tensor is dequantized to fp32 with `gguf.quants.dequantize` when first read, renamed to
its HF name, and llama.cpp's Q/K row permutation (its rotary layout interleaves the two
halves that HF's `rotate_half` keeps apart) is undone; `hf.load_tensors` does the rest, as
for a safetensors directory: `hf.load_hf` and `hf.read_config` take a `.gguf` path too.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from derta_jax.checkpoints.errors import CheckpointError

# What `gguf.quants.dequantize` turns into fp32 and this module accepts. The K-quants,
# Q4/Q5/Q8 blocks and the float types cover what llama.cpp's converters write for LLaMA.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K",
                   "Q3_K", "Q4_K", "Q5_K", "Q6_K")
ARCHITECTURES = ("llama",)
# llama.cpp tensor name -> HF name ("{i}": the layer).
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def is_gguf(path: str | os.PathLike) -> bool:
  """Whether `path` names a GGUF file (by its suffix)."""
  return os.fspath(path).lower().endswith(".gguf")


def _reader(path: Path):
  import gguf

  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError / struct errors on a bad header
    raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def metadata(reader) -> dict[str, Any]:
  """The file's key -> value metadata, arrays as lists (token lists included)."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    out[key] = field.contents()
  return out


def hf_config_dict(meta: dict[str, Any], tensor_names: set[str], path: Path) -> dict[str, Any]:
  """A transformers `config.json` dict equivalent to the file's `llama.*` metadata."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise CheckpointError(f"{path}: general.architecture={arch!r} is not supported; "
                             f"derta_jax reads {ARCHITECTURES}")

  def get(key, default=None):
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
      raise CheckpointError(f"{path}: metadata key {arch}.{key} is missing")
    return value

  if "rope_freqs.weight" in tensor_names or meta.get(f"{arch}.rope.scaling.type") not in (
      None, "none"):
    raise CheckpointError(f"{path}: rope scaling (tensor rope_freqs.weight or "
                             f"{arch}.rope.scaling.type) is not supported in GGUF files; "
                             "load the HF checkpoint instead")
  tokens = meta.get("tokenizer.ggml.tokens")
  heads = int(get("attention.head_count"))
  d_model = int(get("embedding_length"))
  head_dim = int(meta.get(f"{arch}.attention.key_length", d_model // heads))
  eos = meta.get("tokenizer.ggml.eos_token_id")
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": int(meta.get(f"{arch}.vocab_size", len(tokens or ()))),
      "hidden_size": d_model, "intermediate_size": int(get("feed_forward_length")),
      "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
      "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
      "head_dim": head_dim, "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
      "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
      "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": None if eos is None else int(eos),
      "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
  }


def _hf_name(name: str) -> str | None:
  parts = name.split(".")
  if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
    pattern = ".".join(["blk", "{i}", *parts[2:]])
    hf_name = _NAMES.get(pattern)
    return None if hf_name is None else hf_name.format(i=int(parts[1]))
  return _NAMES.get(name)


def unpermute(w_RxC: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's Q/K permutation: per head, rows [0, 2, 4, ..., 1, 3, ...] of HF's
  layout were stored interleaved as (pairs, 2) -> back to (2, pairs)."""
  rows, cols = w_RxC.shape
  half = rows // n_heads // 2
  return w_RxC.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class _Dense:
  """One dequantized tensor with the slice interface of a safetensors file."""

  def __init__(self, load, shape, dtype):
    self._load, self._shape, self._dtype = load, shape, dtype

  def get_shape(self):
    return list(self._shape)

  def get_dtype(self):
    return self._dtype

  def __getitem__(self, index):
    return self._load()[index]


class GGUFTensors:
  """The file's weights under HF names, dequantized lazily (the last few kept)."""

  def __init__(self, path: Path, reader, config: dict[str, Any]):
    import gguf

    self.path = path
    self._gguf = gguf
    self.tensors, self.file_of = {}, {}
    self._last: tuple[str | None, np.ndarray | None] = (None, None)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for t in reader.tensors:
      hf_name = _hf_name(t.name)
      if hf_name is None:
        raise CheckpointError(f"{path}: tensor {t.name} is not part of a LLaMA model")
      if t.tensor_type.name not in SUPPORTED_TYPES:
        raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, "
                                 f"which derta_jax does not dequantize; supported: "
                                 f"{', '.join(SUPPORTED_TYPES)}")
      kind = t.name.split(".")[-2]
      self.tensors[hf_name] = (t, heads.get(kind))
      self.file_of[hf_name] = path.name

  def _array(self, name: str) -> np.ndarray:
    # Every device's block of a tensor is read from one dequantized copy, kept until the
    # next tensor is read (parameters are read one after another).
    if self._last[0] != name:
      t, heads = self.tensors[name]
      value = np.asarray(self._gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
      # ggml lists dimensions innermost first: [cols, rows] is numpy's (rows, cols).
      value = value.reshape([int(n) for n in reversed(t.shape)])
      self._last = (name, unpermute(value, heads) if heads else value)
    return self._last[1]

  def location(self, name: str) -> str:
    return f"{self.path} (tensor {self.tensors[name][0].name})"

  def slice(self, name: str) -> _Dense:
    t, _ = self.tensors[name]
    shape = tuple(int(n) for n in reversed(t.shape))
    return _Dense(functools.partial(self._array, name), shape, "F32")


def open_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], GGUFTensors]:
  """(the file's HF `config.json` dict, its tensors under HF names)."""
  path = Path(path)
  reader = _reader(path)
  hf_dict = hf_config_dict(metadata(reader), {t.name for t in reader.tensors}, path)
  return hf_dict, GGUFTensors(path, reader, hf_dict)
