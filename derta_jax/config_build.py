"""The one place a run's config becomes objects: model config, mesh, model, optimizer, loss
config, tokenizer, data, refusal ids, LoRA base and adapters, and the "settings differ" check.

Every mode (train, export, compile, eval, toyworld) builds through these functions, so a
config key means the same thing everywhere. Checks raise ValueError naming key and value.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from derta_jax import data, losses, optim, sharding
from derta_jax.checkpoints import hf, orbax
from derta_jax.losses import objectives
from derta_jax.models import llama, lora

_ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                "head_dim", "rope_theta", "rope_scaling", "tie_embeddings")


# ---------------------------------------------------------------------------- settings


def _get(tree: Mapping, key: str):
  for part in key.split("."):
    tree = tree.get(part) if isinstance(tree, Mapping) else None
  return tree


def _leaves(tree, prefix: str) -> dict:
  """{"prefix.a.b": leaf} of a nested dict; {prefix: tree} for a leaf (None included)."""
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_leaves(value, f"{prefix}.{key}"))
  return out


def check_same_settings(stored: Mapping, current: Mapping, keys: Iterable[str], *, where: str,
                        hint: str = "use a fresh workdir") -> None:
  """Raises unless `stored` and `current` agree on every (dotted) key, a section compared
  leaf by leaf; the message names `where`, each differing key as (stored, now), and `hint`.
  Values are compared as JSON stores them (tuples read back as lists). A leaf only one side
  has (a newer or older schema) is not compared, as on resume."""
  stored, current = (json.loads(json.dumps(t)) for t in (stored, current))
  diff = {}
  for key in keys:
    before, now = _leaves(_get(stored, key), key), _leaves(_get(current, key), key)
    diff.update({k: (before[k], now[k]) for k in sorted(before.keys() & now.keys())
                 if before[k] != now[k]})
  if diff:
    raise ValueError(f"{where}; (stored, now) differ in {sorted(diff)}: {diff}; {hint}")


def latest_checkpoint(workdir: Path) -> Path | None:
  """<workdir>/checkpoints/<latest step>, or None."""
  if not (workdir / "checkpoints").is_dir():
    return None
  with orbax.Checkpointer(workdir, every_steps=1) as ckpt:
    step = ckpt.latest_step()
  return None if step is None else workdir / "checkpoints" / str(step)


def stored_config(workdir: Path) -> dict | None:
  """The config saved with the latest checkpoint in <workdir>/checkpoints, or None."""
  if latest_checkpoint(workdir) is None:
    return None
  with orbax.Checkpointer(workdir, every_steps=1) as ckpt:
    return ckpt.restore_config()


def checkpoint_config(path) -> dict | None:
  """The config stored with a train checkpoint `path` (<workdir>/checkpoints/<step>); None
  for saved params without one."""
  path = epath.Path(path)
  if not (path.name.isdigit() and path.parent.name == "checkpoints"
          and (path / orbax.CONFIG).is_dir()):
    return None
  with orbax.Checkpointer(path.parent.parent, every_steps=1) as ckpt:
    return ckpt.restore_config(int(path.name))


# ------------------------------------------------------------------------ model, mesh


def model_config(config: ml_collections.ConfigDict) -> llama.LlamaConfig:
  """model.preset with the config's numerics."""
  m = config.model
  return llama.preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype,
                      scan_layers=m.scan_layers, remat=m.remat, attention=m.attention)


def mesh(config: ml_collections.ConfigDict, devices=None):
  """The mesh of config.mesh over `devices` (default: all, or the first mesh.num_devices)."""
  m = config.mesh
  if devices is None:
    devices = jax.devices()
    if m.get("num_devices", -1) != -1:
      if not 1 <= m.num_devices <= len(devices) or jax.process_count() > 1:
        raise ValueError(f"mesh.num_devices={m.num_devices}: choose -1 or 1..{len(devices)} "
                         "(single-process runs only)")
      devices = devices[:m.num_devices]
  return sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=devices)


def resolved_model_config(config: ml_collections.ConfigDict) -> llama.LlamaConfig:
  """The architecture that build_model will give: the checkpoint's when model.preset is ""."""
  m = config.model
  if config.init.hf_path and not m.preset:
    return hf.read_config(config.init.hf_path, dtype=m.dtype, param_dtype=m.param_dtype,
                          scan_layers=m.scan_layers, remat=m.remat, attention=m.attention)
  return model_config(config)


def build_model(config: ml_collections.ConfigDict, mesh=None) -> llama.Llama:
  """From `init.hf_path` when set, else a random init of `model.preset` with `seed`.

  With both set, the checkpoint's architecture must be the preset's ("" skips the check).
  """
  m = config.model
  if config.init.hf_path:
    if m.preset:
      want, found = model_config(config), hf.read_config(config.init.hf_path)
      diff = {k: (getattr(want, k), getattr(found, k)) for k in _ARCH_FIELDS
              if getattr(want, k) != getattr(found, k)}
      if diff:
        raise ValueError(f"init.hf_path={config.init.hf_path!r} is not model.preset="
                         f"{m.preset!r}; (preset, checkpoint) differ in {diff}; set "
                         "--config.model.preset='' to take the checkpoint's architecture")
    return hf.load_hf(config.init.hf_path, dtype=jnp.dtype(m.param_dtype), mesh=mesh,
                      compute_dtype=jnp.dtype(m.dtype), scan_layers=m.scan_layers,
                      remat=m.remat, attention=m.attention)
  if not m.preset:
    raise ValueError("model.preset is '' and init.hf_path is unset: nothing says which "
                     f"model to build; choose a preset of {sorted(llama.PRESETS)}")
  return llama.init_model(model_config(config), seed=config.seed)


def _abstract_on(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def checkpoint_model(config, path: str, mesh) -> llama.Llama:
  """The model of a train checkpoint `path` (<workdir>/checkpoints/<step>) or saved params:
  model.preset's (or init.hf_path's) architecture, params placed by their logical axes on
  the mesh; for a LoRA run the base the config names plus the adapters in `path`."""
  if config.lora.rank > 0:
    return adapted_model(config, path, mesh)
  graphdef, params = nnx.split(llama.abstract_model(resolved_model_config(config)), nnx.Param)
  abstract = _abstract_on(params, sharding.param_shardings(params, mesh))
  return nnx.merge(graphdef, orbax.load_params(path, abstract))


# ---------------------------------------------------------------------------------- LoRA


def lora_problems(section) -> list[str]:
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
  `seed`, with init.orbax_path's params if set; weights in lora.base_dtype. It is never
  checkpointed: each resume rebuilds it from the config."""
  base_config = config.copy_and_resolve_references()
  base_config.model.param_dtype = config.lora.base_dtype
  model = build_model(base_config, mesh)
  if config.init.orbax_path:
    # load_params reads onto the shardings of the arrays it is given.
    nnx.update(model, orbax.load_params(config.init.orbax_path, nnx.state(model, nnx.Param)))
  return model


def adapted_model(config, path, mesh=None) -> llama.Llama:
  """The LoRA model of a checkpoint (e.g. to evaluate it): the base the config names plus
  the adapters saved in `path`, a `<workdir>/checkpoints/<step>` directory."""
  model = lora.attach(frozen_base_model(config, mesh), lora.from_config(config.lora),
                      seed=config.seed, mesh=mesh)
  graphdef, adapters, base = nnx.split(model, lora.LoraParam, nnx.Param)
  return nnx.merge(graphdef, orbax.load_params(path, adapters), base)


# ------------------------------------------------------------------- optimizer, loss


def optimizer(config, num_steps: int):
  """(tx, schedule) of config.optim for a run of `num_steps` steps."""
  o = config.optim
  return optim.make_optimizer(
      lr=o.lr, num_steps=num_steps, schedule=o.schedule, warmup_ratio=o.warmup_ratio,
      b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm)


def objective(config) -> str:
  """loss.objective, with "auto" resolved from data.recipe."""
  name = config.loss.objective
  if name == "auto":
    return config.data.recipe if config.data.recipe in objectives.OBJECTIVES else "derta"
  return name


def loss_config(config, refusal_ids, num_steps: int = 1) -> losses.LossConfig:
  lo = config.loss
  retain = tuple(lo.cb_retain_layers)
  if objective(config) == "circuit_breaker" and not retain:
    retain = tuple(range(resolved_model_config(config).n_layers))
  return losses.LossConfig(
      refusal_ids=tuple(refusal_ids), rto_weight=lo.rto_weight, normalize=lo.normalize,
      z_loss=lo.z_loss, chunk_size=lo.chunk_size, rto_keep_rate=lo.rto_keep_rate,
      seed=config.seed, objective=objective(config), dpo_beta=lo.dpo_beta,
      dpo_sft_weight=lo.dpo_sft_weight, qi_betas=tuple(float(b) for b in lo.qi_betas),
      qi_beta_rest=lo.qi_beta_rest, npo_beta=lo.npo_beta, door_alpha=lo.door_alpha,
      wdoor_tau=lo.wdoor_tau if lo.wdoor_path else 0.0, cb_alpha=lo.cb_alpha,
      cb_reroute_layers=tuple(int(i) for i in lo.cb_reroute_layers),
      cb_retain_layers=tuple(int(i) for i in retain), total_steps=max(1, int(num_steps)))


# Recipe parts each objective trains on; a part it would ignore is a config error.
_OBJECTIVE_PARTS = {"derta": ("rto", "prefix", "vanilla"), "dpo": ("pair", "prefix", "vanilla"),
                    "qi": ("prefix", "vanilla"), "door": ("prefix", "vanilla", "harm"),
                    "circuit_breaker": ("prefix", "vanilla", "harm")}


def objective_problems(config) -> list[str]:
  """What is wrong with the loss.* keys of the rival objectives, each naming key and value."""
  lo, name = config.loss, config.loss.objective
  if name != "auto" and name not in objectives.OBJECTIVES:
    return [f"loss.objective={name!r}; choose 'auto' or one of {objectives.OBJECTIVES}"]
  name, problems = objective(config), []
  if name in ("dpo", "door", "circuit_breaker") and config.data.source == "upstream":
    problems.append(f"loss.objective={name!r} trains on recipe parts (pairs, harmful "
                    "responses) that the upstream format does not have; use data.source="
                    f"'recipe' with data.recipe={name!r}")
  if config.data.source != "upstream" and config.data.recipe in data.RECIPES:
    ignored = sorted(set(dict(data.RECIPES[config.data.recipe])) - set(_OBJECTIVE_PARTS[name]))
    if ignored:
      problems.append(f"data.recipe={config.data.recipe!r} has parts {ignored} that "
                      f"loss.objective={name!r} does not train on; pick the matching "
                      "objective (or loss.objective='auto')")
  for key in ("dpo_beta", "npo_beta", "qi_beta_rest", "wdoor_tau", "cb_alpha"):
    if not lo[key] > 0:
      problems.append(f"loss.{key}={lo[key]!r} must be > 0")
  if not all(b > 0 for b in lo.qi_betas):
    problems.append(f"loss.qi_betas={tuple(lo.qi_betas)!r} must all be > 0")
  if not 0.0 <= lo.door_alpha <= 1.0 or lo.dpo_sft_weight < 0:
    problems.append(f"loss.door_alpha={lo.door_alpha!r} must be in [0, 1] and "
                    f"loss.dpo_sft_weight={lo.dpo_sft_weight!r} >= 0")
  if name == "circuit_breaker":
    n_layers = resolved_model_config(config).n_layers
    layers = tuple(lo.cb_reroute_layers) + tuple(lo.cb_retain_layers)
    if not lo.cb_reroute_layers or any(not 0 <= i < n_layers for i in layers):
      problems.append(f"loss.cb_reroute_layers={tuple(lo.cb_reroute_layers)!r}, "
                      f"loss.cb_retain_layers={tuple(lo.cb_retain_layers)!r}: give block "
                      f"indices in [0, {n_layers}) (at least one to reroute)")
    if not config.lora.rank:
      problems.append("loss.objective='circuit_breaker' trains LoRA adapters (the reference "
                      "is the base with its adapters off): set lora.rank > 0")
  if lo.wdoor_path and name != "door":
    problems.append(f"loss.wdoor_path={lo.wdoor_path!r} weights DOOR's refusal tokens; "
                    f"loss.objective is {name!r}")
  return problems


def weighting_model(config, mesh) -> llama.Llama:
  """W-DOOR's weighting model from loss.wdoor_path, in model.param_dtype, on the mesh."""
  return hf.load_hf(config.loss.wdoor_path, dtype=jnp.dtype(config.model.param_dtype),
                    compute_dtype=jnp.dtype(config.model.dtype), mesh=mesh)


def check_train_config(config) -> None:
  """Value checks of train/loss/lora keys that would otherwise fail mid-run or inside jit."""
  t, lo = config.train, config.loss
  problems = []
  if lo.normalize not in losses.NORMALIZE:
    problems.append(f"loss.normalize={lo.normalize!r}; choose one of {losses.NORMALIZE}")
  if not 0.0 < lo.rto_keep_rate <= 1.0:
    problems.append(f"loss.rto_keep_rate={lo.rto_keep_rate} must be in (0, 1]")
  if lo.chunk_size < 1:
    problems.append(f"loss.chunk_size={lo.chunk_size} must be >= 1")
  if t.global_batch < 1 or t.seq_len < 3:
    problems.append(f"train.global_batch={t.global_batch}, train.seq_len={t.seq_len}: need "
                    "global_batch >= 1 and seq_len >= 3 (BOS, a prompt token, a target)")
  elif t.micro_batches < 1 or t.global_batch % t.micro_batches:
    problems.append(f"train.micro_batches ({t.micro_batches}) must divide train.global_batch "
                    f"({t.global_batch})")
  if t.num_steps < 0 or (t.num_steps == 0 and t.epochs <= 0):
    problems.append(f"train.num_steps={t.num_steps}, train.epochs={t.epochs}: set a positive "
                    "num_steps, or num_steps=0 and epochs > 0")
  if t.log_every < 1 or config.ckpt.every_steps < 1 or config.ckpt.max_to_keep < 0:
    problems.append(f"train.log_every ({t.log_every}) and ckpt.every_steps "
                    f"({config.ckpt.every_steps}) must be >= 1, ckpt.max_to_keep "
                    f"({config.ckpt.max_to_keep}) >= 0 (0: keep all)")
  if not 0.0 <= config.data.max_truncated_fraction <= 1.0:
    problems.append(f"data.max_truncated_fraction={config.data.max_truncated_fraction} must "
                    "be in [0, 1]")
  if t.tpu_compiler_options not in sharding.TPU_COMPILER_OPTIONS:
    problems.append(f"train.tpu_compiler_options={t.tpu_compiler_options!r}; choose one of "
                    f"{sorted(sharding.TPU_COMPILER_OPTIONS)}")
  if config.model.attention == "splash" and jax.default_backend() != "tpu":
    problems.append(f"model.attention='splash' runs on TPU only (this is {jax.default_backend()}"
                    "); use 'xla' (mode=compile checks a TPU step from any machine)")
  problems += lora_problems(config.lora)
  problems += objective_problems(config)
  if problems:
    raise ValueError("; ".join(problems))
