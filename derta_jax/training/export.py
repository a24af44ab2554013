"""Hugging Face export: the end of a training run, and run.py's export mode."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from derta_jax import config_build
from derta_jax.checkpoints import hf, peft
from derta_jax.models import llama, lora


def write(model: llama.Llama, config, workdir: Path, tokenizer=None) -> dict:
  """<workdir>/hf (with `tokenizer`'s files: the directory loads and evaluates on its own);
  with LoRA the merged weights there and the adapters in <workdir>/peft."""
  dtype = config.export.dtype or None
  out = {}
  if model.config.lora is not None:
    peft.save_peft(model, workdir / "peft", base_name_or_path=config.init.hf_path)
    out["peft_dir"] = str(workdir / "peft")
    model = lora.merge(model, dtype)
  hf.save_hf(model, workdir / "hf", dtype=dtype,
             max_shard_bytes=int(config.export.max_shard_mb * 2**20))
  if tokenizer is not None:
    tokenizer.save(workdir / "hf")
  return dict(out, hf_dir=str(workdir / "hf"))


def _params(model: llama.Llama):
  return nnx.to_flat_state(nnx.state(model, nnx.Param))


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  """Write the config's model as an HF checkpoint in `<workdir>/hf`; reloading must give it
  back (exactly, unless export.dtype casts)."""
  mesh = config_build.mesh(config)
  start = time.perf_counter()
  model = config_build.build_model(config, mesh)
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
