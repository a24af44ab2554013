"""What a LoRA training run adds to train.run: config checks, the frozen base, resume checks.

The base is never checkpointed: a run (and each resume of it) rebuilds it from the config,
so the config keys that decide it must not change between a checkpoint and its resume.
"""

from __future__ import annotations

import jax
from flax import nnx

from derta_jax import main as derta_main
from derta_jax.checkpoints import orbax
from derta_jax.models import llama, lora

# Config keys that decide a LoRA run's base weights (seed and preset: of a random base).
_BASE_KEYS = ("init.hf_path", "init.orbax_path", "model.preset", "seed")


def config_problems(section) -> list[str]:
  """What is wrong with a config's `lora` section, each naming its key and value."""
  if not isinstance(section.rank, int) or section.rank < 0:
    return [f"lora.rank={section.rank!r} must be an int >= 0 (0: LoRA off)"]
  problems = []
  try:
    lora.from_config(section)
  except ValueError as e:
    problems.append(str(e))
  if section.rank and section.base_dtype not in llama.DTYPES:
    problems.append(f"lora.base_dtype={section.base_dtype!r}; choose one of "
                    f"{sorted(llama.DTYPES)}")
  return problems


def frozen_base_model(config, mesh) -> llama.Llama:
  """The base of a LoRA run: init.hf_path's model, or model.preset's random init with
  `seed`, with init.orbax_path's params if set; weights in lora.base_dtype."""
  base_config = config.copy_and_resolve_references()
  base_config.model.param_dtype = config.lora.base_dtype
  model = derta_main.build_model(base_config, mesh)
  if config.init.orbax_path:
    params = nnx.state(model, nnx.Param)
    nnx.update(model, orbax.load_params(config.init.orbax_path, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)))
  return model


def check_same_base(stored: dict, config, directory) -> None:
  """Raises unless the checkpoint's stored config names the base this config builds."""
  def get(tree, key):
    for part in key.split("."):
      tree = tree.get(part) if isinstance(tree, dict) else None
    return tree

  keys = _BASE_KEYS if not config.init.hf_path else _BASE_KEYS[:2]
  current = config.to_dict()
  diff = {k: (get(stored, k), get(current, k)) for k in keys if get(stored, k) != get(current, k)}
  if diff:
    raise ValueError(f"{directory}: these adapters were trained on another base; "
                     f"(checkpoint, config) differ in {diff}; resume with the checkpoint's "
                     "values or start in a fresh workdir")


def adapted_model(config, path, mesh=None) -> llama.Llama:
  """The LoRA model of a checkpoint (e.g. to evaluate it): the base the config names plus
  the adapters saved in `path`, a `<workdir>/checkpoints/<step>` directory."""
  model = lora.attach(frozen_base_model(config, mesh), lora.from_config(config.lora),
                      seed=config.seed, mesh=mesh)
  graphdef, adapters, base = nnx.split(model, lora.LoraParam, nnx.Param)
  adapters = orbax.load_params(path, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), adapters))
  return nnx.merge(graphdef, adapters, base)
