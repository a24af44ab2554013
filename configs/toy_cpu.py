"""Embedded default: the tiny LLaMA on CPU.

  python run.py                                   # = --config=configs/toy_cpu.py

Until the synthetic safety world lands (issue #7) this runs `mode=export`: a random tiny
LLaMA is written as a Hugging Face checkpoint to runs/toy_cpu/hf, reloaded, and its
parameters compared; it prints one JSON line with "reload_max_abs_param_diff": 0.0.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg  # no variants yet
  config = ml_collections.ConfigDict()
  # What run.py does: "export" (build or load the model, write <workdir>/hf).
  config.mode = "export"
  # Seed of parameter init and of every random draw.
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  # Architecture preset of derta_jax.models.llama.PRESETS; with init.hf_path set, the
  # checkpoint must match it ("" = take the checkpoint's architecture).
  config.model.preset = "tiny"
  # Compute dtype of activations and matmuls.
  config.model.dtype = "float32"
  # Storage dtype of parameters (master weights).
  config.model.param_dtype = "float32"
  # Scan over layers (compile time independent of depth) instead of unrolling.
  config.model.scan_layers = True
  # Rematerialisation policy per layer: none | full | dots | dots_no_batch.
  config.model.remat = "none"

  config.init = ml_collections.ConfigDict()
  # HF checkpoint directory to start from; "" = random init of model.preset.
  config.init.hf_path = ""

  config.mesh = ml_collections.ConfigDict()
  # Mesh axis sizes; -1 = all remaining devices.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1

  config.export = ml_collections.ConfigDict()
  # dtype of the exported safetensors; "" = the parameter dtype.
  config.export.dtype = ""
  # Largest safetensors shard, in MiB.
  config.export.max_shard_mb = 5120
  return config
