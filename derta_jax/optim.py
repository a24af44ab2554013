"""The DeRTa optimizer: global-norm clipping, AdamW with a warmup schedule, accumulation.

The authors fine-tune with the HF Trainer: torch AdamW, lr 2e-5 (LoRA 70B: 1e-4), cosine
decay after a linear warmup over 3% of the steps, weight decay 2e-5, grad-norm clip 1.0.
`make_optimizer` builds the same update; where it differs from torch/HF:

- Clipping. optax's `clip_by_global_norm` scales by clip / norm when norm >= clip; torch's
  `clip_grad_norm_` scales by min(1, clip / (norm + 1e-6)). When clipping, the two scales
  differ by a factor 1 + 1e-6 / norm, at most 1e-6 relative at clip 1.0 (a few fp32 ulps),
  and Adam divides most of a common scale out again. Torch also shrinks a gradient whose
  norm lies in (clip - 1e-6, clip) by that factor, which optax leaves alone.
- AdamW. optax adds weight_decay * p to the bias-corrected Adam direction and scales the sum
  by -lr, torch multiplies p by (1 - lr * weight_decay) before the Adam step: the same
  update. Torch divides sqrt(v) by sqrt(1 - b2^t) where optax takes sqrt(v / (1 - b2^t)),
  so the two agree to fp32 rounding.
- Schedule. Multipliers are HF's own formulas evaluated in float64 and stored as an fp32
  table, so the learning rate at every step is HF's correctly rounded to fp32. Steps past
  num_steps keep the last value (HF's cosine would rise again; training stops before).
  Step 0 of a warmup has lr 0 in both: the first update only fills Adam's moments.
- Precision. The optimizer runs on fp32 copies of gradients and params, so its state is
  fp32 whatever the param dtype (torch keeps AdamW state in the param dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps_from_ratio(num_steps: int, warmup_ratio: float) -> int:
  """HF's warmup length: ceil(ratio * steps) (`TrainingArguments.get_warmup_steps`)."""
  return math.ceil(num_steps * warmup_ratio)


def _check_schedule_args(lr, num_steps, schedule, warmup_ratio, warmup_steps):
  if schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={schedule!r}; choose one of {SCHEDULES}")
  if not lr > 0 or not math.isfinite(lr):
    raise ValueError(f"optim.lr={lr!r} must be a finite number > 0")
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"optim.num_steps={num_steps!r} must be an int >= 1")
  if not 0.0 <= warmup_ratio < 1.0:
    raise ValueError(f"optim.warmup_ratio={warmup_ratio!r} must be in [0, 1)")
  if warmup_steps is not None:
    if warmup_ratio:
      raise ValueError(f"optim.warmup_steps={warmup_steps!r} and optim.warmup_ratio="
                       f"{warmup_ratio!r} are both set; give one of them")
    if not isinstance(warmup_steps, (int, np.integer)) or not 0 <= warmup_steps <= num_steps:
      raise ValueError(f"optim.warmup_steps={warmup_steps!r} must be an int in "
                       f"[0, optim.num_steps={num_steps}]")


def _multipliers(schedule: str, num_steps: int, warmup: int) -> np.ndarray:
  """HF's LambdaLR multipliers for steps 0..num_steps, float64, in HF's own arithmetic."""
  step = np.arange(num_steps + 1, dtype=np.float64)
  if schedule == "constant":
    after = np.ones_like(step)
  elif schedule == "linear":
    after = np.maximum(0.0, (num_steps - step) / max(1, num_steps - warmup))
  else:
    progress = (step - warmup) / max(1, num_steps - warmup)
    after = np.maximum(0.0, 0.5 * (1.0 + np.cos(np.pi * progress)))
  return np.where(step < warmup, step / max(1, warmup), after)


def make_schedule(*, lr: float, num_steps: int, schedule: str = "cosine",
                  warmup_ratio: float = 0.0, warmup_steps: int | None = None) -> optax.Schedule:
  """Learning rate at each update step (0-based), equal to transformers' `get_*_with_warmup`.

  Warmup is linear from 0 over warmup_steps, or ceil(warmup_ratio * num_steps) steps as HF
  computes it; then cosine to 0, linear to 0, or constant.
  """
  _check_schedule_args(lr, num_steps, schedule, warmup_ratio, warmup_steps)
  warmup = (warmup_steps_from_ratio(num_steps, warmup_ratio) if warmup_steps is None
            else int(warmup_steps))
  # fp32 cannot evaluate 1 + cos(pi * p) near p = 1 to relative precision; a table of
  # float64 values rounded once is exact to fp32 at every step and costs 4 bytes a step.
  lr_table = (lr * _multipliers(schedule, num_steps, warmup)).astype(np.float32)

  def schedule_fn(count):
    return jnp.asarray(lr_table)[jnp.clip(count, 0, num_steps)]

  return schedule_fn


def decay_mask(params):
  """True for parameters to weight-decay, False for norm scales and biases.

  HF Trainer decays every parameter except biases and LayerNorm/RMSNorm weights (names
  matching "bias", "layernorm", "rmsnorm" or "norm"); LLaMA has no biases, so here that is
  every path with "norm" in a name. `params`: an `nnx.State` or a nested dict.
  """

  def decayed(path, _):
    name = jax.tree_util.keystr(path, simple=True, separator="/").lower()
    return "norm" not in name and "bias" not in name

  return jax.tree_util.tree_map_with_path(decayed, params)


def _in_fp32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` applied to fp32 copies of updates and params, so its state is fp32."""

  def init_fn(params):
    return inner.init(optax.tree.cast(params, jnp.float32))

  def update_fn(updates, state, params=None):
    return inner.update(optax.tree.cast(updates, jnp.float32), state,
                        optax.tree.cast(params, jnp.float32))

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(*, lr: float, num_steps: int, schedule: str = "cosine",
                   warmup_ratio: float = 0.0, warmup_steps: int | None = None, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0, mask: Any = None,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(clip_by_global_norm -> AdamW, lr schedule); the schedule is returned for logging.

  clip_norm 0 or None: no clipping. mask: a pytree of bools like the params, or a function
  params -> such a pytree, True where weight decay applies; None: `decay_mask` (HF's rule).
  """
  lr_schedule = make_schedule(lr=lr, num_steps=num_steps, schedule=schedule,
                              warmup_ratio=warmup_ratio, warmup_steps=warmup_steps)
  for key, value in (("b1", b1), ("b2", b2)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f"optim.{key}={value!r} must be in [0, 1)")
  if not eps >= 0:
    raise ValueError(f"optim.eps={eps!r} must be >= 0")
  if not weight_decay >= 0:
    raise ValueError(f"optim.weight_decay={weight_decay!r} must be >= 0")
  if clip_norm is not None and not clip_norm >= 0:
    raise ValueError(f"optim.clip_norm={clip_norm!r} must be >= 0 (0 or None: no clipping)")
  adamw = optax.adamw(lr_schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=decay_mask if mask is None else mask)
  chain = optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw
  return _in_fp32(chain), lr_schedule


def global_norm(grads) -> jax.Array:
  """L2 norm over every leaf, in fp32 (the value clipping compares with clip_norm)."""
  return optax.tree.norm(optax.tree.cast(grads, jnp.float32))


def _fp32_floats(tree):
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def accumulate_gradients(grad_fn: Callable, batch, *, micro_batches: int):
  """Sums grad_fn over micro-batches of `batch` with a `lax.scan` -> ((loss, metrics), grads).

  grad_fn(micro_batch) -> ((loss, metrics), grads). batch: a dict of arrays whose leading
  dim is the G rows of the global batch; micro-batch i takes rows i, i + m, i + 2m, ...
  (m = micro_batches), so rows sharded over devices stay on their device. Loss, metrics and
  grads are summed, not averaged: the caller normalises the loss by the token count of the
  whole global batch (`losses.derta_loss(..., counts=...)`), so the micro-batch losses add
  up to the global-batch loss and their grads to its grad. Metrics that are ratios must be
  rescaled by the caller. Float sums are fp32. Constrain the grads inside grad_fn to the
  params' sharding (`jax.lax.with_sharding_constraint`): the scan carry follows them, and
  without that XLA may keep a replicated fp32 accumulator (it does for an FSDP-sharded
  weight on CPU).
  """
  if not isinstance(micro_batches, (int, np.integer)) or micro_batches < 1:
    raise ValueError(f"micro_batches={micro_batches!r} must be an int >= 1")
  rows = {k: jnp.shape(v)[0] if jnp.ndim(v) else None for k, v in batch.items()}
  if len(set(rows.values())) != 1 or None in rows.values():
    raise ValueError(f"batch arrays must share a leading (rows) dim, got {rows}")
  g = next(iter(rows.values()))
  if g % micro_batches:
    raise ValueError(f"global batch rows ({g}) must be divisible by micro_batches "
                     f"({micro_batches})")
  if micro_batches == 1:
    return _fp32_floats(grad_fn(batch))

  def split(x):
    x = jnp.reshape(x, (g // micro_batches, micro_batches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  micro = jax.tree.map(split, batch)
  out_shapes = jax.eval_shape(grad_fn, jax.tree.map(lambda x: x[0], micro))
  zeros = jax.tree.map(
      lambda s: jnp.zeros(s.shape, jnp.float32 if jnp.issubdtype(s.dtype, jnp.floating)
                          else s.dtype), out_shapes)

  def body(total, micro_batch):
    return jax.tree.map(jnp.add, total, _fp32_floats(grad_fn(micro_batch))), None

  return jax.lax.scan(body, zeros, micro)[0]
