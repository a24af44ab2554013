"""LLaMA architectures: `LlamaConfig` (shape and numerics), the named presets, RoPE frequencies."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from derta_jax.models import lora_layer

ATTENTION = ("xla", "splash", "splash_interpret", "dot_product", "cudnn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """LLaMA-3.1 `rope_type="llama3"` frequency scaling."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture plus numerics; `dtype` computes, `param_dtype` stores."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  head_dim: int | None = None  # None: d_model // n_heads
  rms_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  tie_embeddings: bool = False
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  pad_id: int | None = None
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"
  attn_q_block: int = 128  # queries per causal attention block; 0 = one block
  # "xla": blocked einsums (any backend); "splash": the Pallas TPU splash-attention kernel
  # (TPU only); "splash_interpret": that kernel interpreted, to test it on CPU; "cudnn":
  # jax.nn.dot_product_attention's cuDNN flash attention (NVIDIA GPU, bf16/fp16; elsewhere
  # tracing fails naming model.attention rather than silently running something slower);
  # "dot_product": that same call through XLA (any backend). Decoding with a KV cache
  # always uses the einsums.
  attention: str = "xla"
  lora: lora_layer.LoraConfig | None = None  # adapters on the projections; None: none

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if isinstance(self.lora, Mapping):
      object.__setattr__(self, "lora", lora_layer.LoraConfig(**self.lora))
    object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                "head_dim"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
        raise ValueError(f"LlamaConfig.{key} must be a positive int, got {getattr(self, key)!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"LlamaConfig.n_heads ({self.n_heads}) must be a multiple of "
                       f"n_kv_heads ({self.n_kv_heads})")
    if not isinstance(self.attn_q_block, int) or self.attn_q_block < 0:
      raise ValueError(f"LlamaConfig.attn_q_block must be an int >= 0, got {self.attn_q_block!r}")
    if self.attention not in ATTENTION:
      raise ValueError(f"LlamaConfig.attention={self.attention!r}; choose one of {ATTENTION}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim ({self.head_dim}) must be even for RoPE")
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in DTYPES:
        raise ValueError(f"LlamaConfig.{key}={getattr(self, key)!r}; choose one of "
                         f"{sorted(DTYPES)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"LlamaConfig.remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **overrides: Any) -> LlamaConfig:
    unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ValueError(f"unknown LlamaConfig field(s) {sorted(unknown)}")
    return dataclasses.replace(self, **overrides)

  def num_params(self) -> int:
    """Parameter count (tied embeddings counted once)."""
    d, h = self.d_model, self.head_dim
    attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
    block = attn + 3 * d * self.d_ff + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.n_layers * block + d + head


_LLAMA31_SCALING = RopeScaling(8.0, 1.0, 4.0, 8192)
_LLAMA32_SCALING = RopeScaling(32.0, 1.0, 4.0, 8192)
_LLAMA2 = dict(vocab_size=32000, rope_theta=10000.0, bos_id=1, eos_ids=(2,))
_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, bos_id=128000, eos_ids=(128001,))

PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=128, max_position_embeddings=512, bos_id=1, eos_ids=(2,)),
    "llama2_7b": LlamaConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
                             max_position_embeddings=4096, **_LLAMA2),
    "llama3_8b": LlamaConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                             max_position_embeddings=8192, **_LLAMA3),
    "llama3_1_8b": LlamaConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                               max_position_embeddings=131072, rope_scaling=_LLAMA31_SCALING,
                               **_LLAMA3),
    "llama3_70b": LlamaConfig(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
                              max_position_embeddings=8192, **_LLAMA3),
    "llama3_1_70b": LlamaConfig(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                                d_ff=28672, max_position_embeddings=131072,
                                rope_scaling=_LLAMA31_SCALING, **_LLAMA3),
    "llama3_2_1b": LlamaConfig(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                               head_dim=64, max_position_embeddings=131072,
                               rope_scaling=_LLAMA32_SCALING, tie_embeddings=True, **_LLAMA3),
    "llama3_2_3b": LlamaConfig(d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, d_ff=8192,
                               head_dim=128, max_position_embeddings=131072,
                               rope_scaling=_LLAMA32_SCALING, tie_embeddings=True, **_LLAMA3),
}


def preset(name: str, **overrides: Any) -> LlamaConfig:
  """A named architecture with field overrides (e.g. `dtype="bfloat16"`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [H/2] in fp32, as transformers computes them (llama3 scaling incl.)."""
  h = config.head_dim
  exponent = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
  inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv_freq
  low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)
