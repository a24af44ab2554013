"""LoRA adapters -> a PEFT adapter directory that `PeftModel.from_pretrained(base, path)` loads.

`adapter_config.json` plus `adapter_model.safetensors` with PEFT's names for a
LlamaForCausalLM: "base_model.model." + the HF module (from checkpoints.hf, the module that
knows HF names) + ".lora_A.weight" [R, in_features] or ".lora_B.weight" [out_features, R].
Heads flatten as in the HF weights: feature n * H + h is head n, dim h.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.experimental import multihost_utils

from derta_jax.checkpoints import hf
from derta_jax.models import llama, lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _tensors(model: llama.Llama):
  """(PEFT name, fp32 array) one layer at a time."""
  cfg = model.config
  modules = hf.module_names(cfg)
  adapters = dict(nnx.to_flat_state(nnx.state(model, lora.LoraParam)))
  for target in cfg.lora.targets:
    block = lora.PROJECTIONS[target][0]
    module = "base_model.model." + modules[("layers", block, target)]
    a, b = (adapters[("layers", block, f"{target}_lora", m)][...] for m in ("a", "b"))
    r = cfg.lora.rank
    for i in range(cfg.n_layers):
      a_IxR = hf.host_value(a[i]).astype(np.float32).reshape(-1, r)
      b_RxO = hf.host_value(b[i]).astype(np.float32).reshape(r, -1)
      yield module.format(i=i) + ".lora_A.weight", a_IxR.T
      yield module.format(i=i) + ".lora_B.weight", b_RxO.T


def adapter_config(config: llama.LlamaConfig, base_name_or_path: str) -> dict:
  """PEFT's LoraConfig fields for these adapters (PEFT fills in the rest)."""
  lc = config.lora
  modules = hf.module_names(config)
  targets = [modules[("layers", lora.PROJECTIONS[t][0], t)].rsplit(".", 1)[-1]
             for t in lc.targets]
  alpha = int(lc.alpha) if float(lc.alpha).is_integer() else lc.alpha
  return {
      "base_model_name_or_path": base_name_or_path or None, "peft_type": "LORA",
      "task_type": "CAUSAL_LM", "r": lc.rank, "lora_alpha": alpha,
      "lora_dropout": lc.dropout, "target_modules": targets, "bias": "none",
      "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "init_lora_weights": True if lc.init_a == "kaiming_uniform" else "gaussian",
      "modules_to_save": None, "layers_to_transform": None, "inference_mode": True,
  }


def save_peft(model: llama.Llama, path: str | os.PathLike, *, base_name_or_path: str = ""):
  """Write the model's adapters (fp32) as a PEFT directory; it appears complete or not at
  all. `base_name_or_path`: the HF base they were trained on (recorded, not checked)."""
  if model.config.lora is None:
    raise ValueError("save_peft: the model has no LoRA adapters (model.config.lora is None)")
  directory = Path(path)
  writer = jax.process_index() == 0
  tensors = {name: np.ascontiguousarray(value) for name, value in _tensors(model)}
  if writer:
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
      safetensors.numpy.save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
      with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(adapter_config(model.config, base_name_or_path), f, indent=2, sort_keys=True)
        f.write("\n")
      if directory.exists():
        shutil.rmtree(directory)
      os.replace(tmp, directory)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"save_peft:{directory}")
