"""The LoRA adapter layer (Hu et al., 2021) on LLaMA's projections, computed as PEFT does.

Shape legend as in llama.py, plus R the adapter rank and I / O a projection's input and
output features (D; N H; K H; F).

Each target projection W gains `y = x W + (alpha / R) * (dropout(x) A) B` (PEFT's scale, not
rsLoRA's alpha / sqrt(R)). A [I, R] starts as PEFT's default does: kaiming-uniform with
a = sqrt(5), which is U(-1/sqrt(I), 1/sqrt(I)) for I input features ("gaussian": normal
with std 1/R, PEFT's `init_lora_weights="gaussian"`); B [R, O] starts at zero, so a fresh
adapter changes nothing. Adapters are `LoraParam` variables held in fp32 while the base
weights stay `nnx.Param`: `nnx.split(model, LoraParam, nnx.Param)` separates what trains
from what is frozen, and everything that reads `nnx.Param` alone sees the base model.

Dropout acts on the adapter's input only (PEFT's `lora_dropout`) and only when the forward
pass is given per-row PRNG keys (training). Row b's masks are a function of (its key, the
layer, the projection), so a row draws the same masks on any mesh and in any micro-batch.
Attaching adapters to a whole model and merging them back: `derta_jax.models.lora`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
INITS = ("kaiming_uniform", "gaussian")
# Each target's block ("attn" | "mlp") and the einsum letters of its input and output
# features, as in llama.py's weights (q: [D, N, H] is D -> NH).
PROJECTIONS = {"q": ("attn", "D", "NH"), "k": ("attn", "D", "KH"), "v": ("attn", "D", "KH"),
               "o": ("attn", "NH", "D"), "gate": ("mlp", "D", "F"), "up": ("mlp", "D", "F"),
               "down": ("mlp", "F", "D")}
_AXES = {"D": "embed", "N": "q_heads", "K": "kv_heads", "H": "head_dim", "F": "mlp"}
# Keeps dropout draws apart from the other draws made from (seed, step), e.g. RTO keep masks.
_DROPOUT_STREAM = 0x4C6F5241


class LoraParam(nnx.Variable):
  """An adapter matrix: trained, while the `nnx.Param` base stays frozen."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Rank R, alpha (scale = alpha / R), adapter-input dropout, target projections, A's init."""

  rank: int
  alpha: float
  dropout: float = 0.0
  targets: tuple[str, ...] = TARGETS
  init_a: str = "kaiming_uniform"

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    problems = []
    if not isinstance(self.rank, int) or self.rank < 1:
      problems.append(f"lora.rank={self.rank!r} must be an int >= 1 (0 turns LoRA off)")
    if not self.alpha > 0:
      problems.append(f"lora.alpha={self.alpha!r} must be > 0")
    if not 0.0 <= self.dropout < 1.0:
      problems.append(f"lora.dropout={self.dropout!r} must be in [0, 1)")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
      problems.append(f"lora.targets={','.join(self.targets)!r}: give distinct names from "
                      f"{','.join(TARGETS)!r}" + (f"; unknown {unknown}" if unknown else ""))
    if self.init_a not in INITS:
      problems.append(f"lora.init_a={self.init_a!r}; choose one of {INITS}")
    if problems:
      raise ValueError("; ".join(problems))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def from_config(section) -> LoraConfig | None:
  """The LoraConfig of a config's `lora` section; None when lora.rank is 0 (LoRA off)."""
  if section.rank == 0:
    return None
  targets = tuple(t.strip() for t in section.targets.split(",") if t.strip())
  return LoraConfig(rank=section.rank, alpha=section.alpha, dropout=section.dropout,
                    targets=targets, init_a=section.init_a)


def _sizes(config) -> dict[str, int]:
  return {"D": config.d_model, "N": config.n_heads, "K": config.n_kv_heads,
          "H": config.head_dim, "F": config.d_ff}


def num_params(config) -> int:
  """Adapter parameters of a LlamaConfig with `lora` set (all layers)."""
  sizes, r = _sizes(config), config.lora.rank
  per_layer = sum(r * (math.prod(sizes[c] for c in PROJECTIONS[t][1])
                       + math.prod(sizes[c] for c in PROJECTIONS[t][2]))
                  for t in config.lora.targets)
  return config.n_layers * per_layer


class Adapter(nnx.Module):
  """The low-rank update of one projection: `scale * (dropout(x) A) B`."""

  def __init__(self, target: str, config, *, rngs: nnx.Rngs):
    lora, sizes = config.lora, _sizes(config)
    _, inputs, outputs = PROJECTIONS[target]
    in_shape = tuple(sizes[c] for c in inputs)
    out_shape = tuple(sizes[c] for c in outputs)
    r = lora.rank
    self.salt = TARGETS.index(target)  # this projection's dropout stream
    self.scale, self.rate = lora.scale, lora.dropout
    self.spec_a = f"BT{inputs},{inputs}R->BTR"
    self.spec_b = f"BTR,R{outputs}->BT{outputs}"
    # (`attach` draws A the same way with numpy; this draw serves models built whole.)
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = (jax.random.uniform(rngs.lora(), in_shape + (r,), jnp.float32, -bound, bound)
         if lora.init_a == "kaiming_uniform"
         else jax.random.normal(rngs.lora(), in_shape + (r,), jnp.float32) / r)
    self.a = LoraParam(a, out_sharding=tuple(_AXES[c] for c in inputs) + ("lora_rank",),
                       eager_sharding=False)
    self.b = LoraParam(jnp.zeros((r,) + out_shape, jnp.float32),
                       out_sharding=("lora_rank",) + tuple(_AXES[c] for c in outputs),
                       eager_sharding=False)

  def __call__(self, x_BxTxI, keys_B, fetch: Callable):
    """The update in x's dtype. `fetch(variable)` gives a weight ready for the einsum (cast,
    gathered); `keys_B` are this layer's per-row keys, None: no dropout."""
    if keys_B is not None and self.rate > 0:
      x_BxTxI = _dropout(x_BxTxI, keys_B, self.rate, self.salt)
    h_BxTxR = jnp.einsum(self.spec_a, x_BxTxI, fetch(self.a)) * self.scale
    return jnp.einsum(self.spec_b, h_BxTxR, fetch(self.b))


def _dropout(x_BxTxI, keys_B, rate: float, salt: int):
  keep = 1.0 - rate

  def row_mask(key):
    return jax.random.bernoulli(jax.random.fold_in(key, salt), keep, x_BxTxI.shape[1:])

  # Kept inputs are scaled by 1 / keep (inverted dropout, as torch's nn.Dropout).
  return jnp.where(jax.vmap(row_mask)(keys_B), x_BxTxI / keep, 0).astype(x_BxTxI.dtype)


def row_keys(*, seed: int, step, rows: int):
  """Dropout keys of the global batch's rows [G] at `step`: fold_in(seed, step, row)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM), step)
  return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(rows))


def layer_keys(keys_B, layer):
  """Row keys [B] for one layer (`layer` may be traced, as inside the layer scan)."""
  return jax.vmap(jax.random.fold_in, (0, None))(keys_B, layer)
