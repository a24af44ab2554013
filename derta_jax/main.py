"""What `run.py` calls: one function per `config.mode`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from derta_jax import sharding
from derta_jax.checkpoints import hf
from derta_jax.models import llama

MODES = ("train", "export", "compile", "eval", "toyworld")


def model_config(config: ml_collections.ConfigDict) -> llama.LlamaConfig:
  m = config.model
  return llama.preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype,
                      scan_layers=m.scan_layers, remat=m.remat, attention=m.attention)


def config_mesh(config: ml_collections.ConfigDict):
  """The mesh of config.mesh over all devices, or the first mesh.num_devices of them."""
  m = config.mesh
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
                          scan_layers=m.scan_layers, remat=m.remat)
  return model_config(config)


_ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                "head_dim", "rope_theta", "rope_scaling", "tie_embeddings")


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
                      remat=m.remat)
  if not m.preset:
    raise ValueError("model.preset is '' and init.hf_path is unset: nothing says which "
                     f"model to build; choose a preset of {sorted(llama.PRESETS)}")
  return llama.init_model(model_config(config), seed=config.seed)


def export(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  """Write the model as an HF checkpoint in `<workdir>/hf`; reloading must give it back."""
  mesh = config_mesh(config)
  start = time.perf_counter()
  model = build_model(config, mesh)
  out = workdir / "hf"
  hf.save_hf(model, out, dtype=config.export.dtype or None,
             max_shard_bytes=int(config.export.max_shard_mb * 2**20))
  reloaded = hf.load_hf(out, dtype=model.config.weight_dtype, mesh=mesh)
  params_diff = max(
      float(jnp.max(jnp.abs(a[...].astype(jnp.float32) - b[...].astype(jnp.float32))))
      for (_, a), (_, b) in zip(_params(model), _params(reloaded), strict=True))
  probe = jax.random.randint(jax.random.key(config.seed), (2, 16), 0, model.config.vocab_size)
  summary = {
      "mode": "export", "hf_dir": str(out), "params": model.config.num_params(),
      "files": sorted(p.name for p in out.iterdir()),
      "reload_max_abs_param_diff": params_diff,
      "reload_max_abs_logit_diff": float(jnp.max(jnp.abs(model(probe) - reloaded(probe)))),
      "seconds": round(time.perf_counter() - start, 2),
  }
  if config.export.dtype in ("", model.config.param_dtype) and params_diff != 0.0:
    raise RuntimeError(f"export check failed: reloaded parameters differ by {params_diff}")
  return summary


def _params(model: llama.Llama):
  return nnx.to_flat_state(nnx.state(model, nnx.Param))


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  if config.mode not in MODES:
    raise ValueError(f"config.mode={config.mode!r}; choose one of {MODES}")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  logging.info("mode=%s workdir=%s devices=%s", config.mode, workdir, jax.devices())
  if config.mode == "compile":
    from derta_jax import aot

    summary = aot.compile_report(config, workdir)
  elif config.mode == "eval":
    from derta_jax import eval_run

    summary = eval_run.run(config, workdir)
  elif config.mode == "toyworld":
    from derta_jax import toyworld_run

    summary = toyworld_run.run(config, workdir)
  else:
    from derta_jax import train

    summary = {"export": export, "train": train.run}[config.mode](config, workdir)
  if jax.process_index() == 0:
    print(json.dumps(summary, default=lambda x: np.asarray(x).tolist()))
  if config.mode == "compile" and not summary["fits"]:
    raise SystemExit(f"does not fit: {summary['total_bytes']} bytes per device > "
                     f"{summary['hbm_bytes']} of HBM on {summary['topology']}")
  return summary
