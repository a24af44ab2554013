"""LLaMA-3-8B on a Cloud TPU slice, from a Hugging Face checkpoint.

  python run.py --config=configs/llama3_tpu.py \
      --config.init.hf_path=/path/to/Meta-Llama-3-8B --workdir=/tmp/llama3

Until sharded training lands (issue #5) this runs `mode=export`: the checkpoint is read
straight onto the ("data", "fsdp", "tensor") mesh (each host reads only its shards),
written back as HF safetensors to <workdir>/hf, reloaded and compared. It
prints one JSON line with "reload_max_abs_param_diff": 0.0.
"""

import ml_collections

from configs import toy_cpu


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg  # no variants yet
  config = toy_cpu.get_config()
  # LLaMA-3-8B; use "llama3_1_8b" for LLaMA-3.1 (rope scaling, 128k context).
  config.model.preset = "llama3_8b"
  # bf16 matmuls on the MXU; parameters stay fp32 (master weights).
  config.model.dtype = "bfloat16"
  # Recompute each layer's activations in the backward pass, keeping matmul outputs.
  config.model.remat = "dots_no_batch"
  # The HF checkpoint directory (config.json + *.safetensors); set it on the command line.
  # Left "", a randomly initialised model.preset is exported instead.
  config.init.hf_path = ""
  # All chips on FSDP; tensor parallelism pays off only beyond ~256 chips for 8B.
  config.mesh.fsdp = -1
  # Export in bf16, as Meta ships LLaMA-3.
  config.export.dtype = "bfloat16"
  return config
