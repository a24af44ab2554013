"""LoRA as a transform over a whole model: attach fresh adapters, merge them into the weights.

The adapter layer itself (config, variables, forward, dropout keys) is `lora_layer`; its
public names are re-exported here, so `lora.LoraParam`, `lora.from_config`, ... work.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from derta_jax import sharding
from derta_jax.models import llama
from derta_jax.models.lora_layer import (
    INITS,
    PROJECTIONS,
    TARGETS,
    Adapter,
    LoraConfig,
    LoraParam,
    from_config,
    layer_keys,
    num_params,
    row_keys,
)

__all__ = ["INITS", "PROJECTIONS", "TARGETS", "Adapter", "LoraConfig", "LoraParam", "attach",
           "from_config", "layer_keys", "merge", "num_params", "row_keys"]


def attach(model, config: LoraConfig, *, seed: int = 0, mesh=None):
  """`model` (without adapters) plus fresh adapters on `config.targets`, placed on `mesh` by
  their logical axes (None: the first local device); B = 0, so the new model computes what
  `model` does. A is drawn on the host with numpy from (seed, target): the same values on
  every host and platform, and no random-number program to compile."""
  if model.config.lora is not None:
    raise ValueError(f"attach: the model already has adapters ({model.config.lora}); "
                     "lora.merge it first")
  cfg = model.config.replace(lora=config)
  graphdef, adapters, _ = nnx.split(llama.abstract_model(cfg), LoraParam, nnx.Param)
  flat = dict(nnx.to_flat_state(adapters))  # paths ("layers", block, "<target>_lora", a | b)
  for path, var in flat.items():
    if path[3] == "a":  # [L, I..., R]
      rng = np.random.default_rng([seed, TARGETS.index(path[2].removesuffix("_lora"))])
      fan_in = math.prod(var.shape[1:-1])
      value = (rng.uniform(-1, 1, var.shape) / math.sqrt(fan_in)
               if config.init_a == "kaiming_uniform"
               else rng.standard_normal(var.shape) / config.rank).astype(np.float32)
    else:
      value = np.zeros(var.shape, np.float32)
    if mesh is None:
      placement = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
      placement = sharding.param_sharding("/".join(path), var.shape,
                                          var.get_metadata()["out_sharding"], mesh)
    flat[path] = var.replace(jax.make_array_from_callback(
        var.shape, placement, lambda index, value=value: value[index]))
  return nnx.merge(graphdef, nnx.from_flat_state(flat), nnx.state(model, nnx.Param))


def merge(model, dtype=None):
  """The model without adapters: W + scale * A B summed in fp32 into every target weight,
  all weights stored in `dtype` (default: the base's). Logits match the adapted model's."""
  cfg = model.config
  if cfg.lora is None:
    return model
  dtype = jnp.dtype(dtype or cfg.weight_dtype)
  base = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  adapters = dict(nnx.to_flat_state(nnx.state(model, LoraParam)))
  merged = {path: var.replace(var[...].astype(dtype)) for path, var in base.items()}
  for target in cfg.lora.targets:
    block, inputs, outputs = PROJECTIONS[target]
    path = ("layers", block, target)
    a = adapters[("layers", block, f"{target}_lora", "a")][...]
    b = adapters[("layers", block, f"{target}_lora", "b")][...]
    merged[path] = base[path].replace(_merged_weight(
        base[path][...], a, b, scale=cfg.lora.scale,
        spec=f"L{inputs}R,LR{outputs}->L{inputs}{outputs}", dtype=dtype))
  plain = llama.abstract_model(cfg.replace(lora=None, param_dtype=dtype.name))
  return nnx.merge(nnx.graphdef(plain), nnx.from_flat_state(merged))


@functools.partial(jax.jit, static_argnames=("scale", "spec", "dtype"))
def _merged_weight(w, a, b, *, scale: float, spec: str, dtype):
  delta = jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  return (w.astype(jnp.float32) + scale * delta).astype(dtype)
