"""LLaMA-3-8B DeRTa full fine-tune on a Cloud TPU slice, with the paper's hyper-parameters.

  python run.py --config=configs/llama3_tpu.py --workdir=gs://bucket/llama3_derta \
      --config.init.hf_path=/path/to/Meta-Llama-3-8B \
      --config.data.triples_path=beaver_triples.jsonl \
      --config.data.helpful_path=wizardlm_60k.jsonl

lr 2e-5 cosine with 3% warmup, weight decay 2e-5, 2 epochs, global batch 128, seq 1024,
grad-norm clip 1.0, bf16 compute with fp32 master weights, 5% of RTO targets kept per
example, refusal token "Sorry" (19701). Data: helpful + 3,000 RTO + 3,000 harmful-prefix.
Check it compiles and fits first:  --config.mode=compile --config.compile.topology=v5p:4x4x4
`:export` re-exports the checkpoint (the round trip of issue #2).
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "export"):
    raise ValueError(f"configs/llama3_tpu.py:{arg}: variants are '' and 'export'")
  config = base.get_config()
  if arg == "export":  # re-export the checkpoint in <workdir>/hf
    config.mode = "export"
  # LLaMA-3-8B; use "llama3_1_8b" for LLaMA-3.1 (rope scaling, 128k context).
  config.model.preset = "llama3_8b"
  # bf16 matmuls on the MXU; parameters stay fp32 (master weights).
  config.model.dtype = "bfloat16"
  # Recompute each layer's activations in the backward pass, keeping matmul outputs.
  config.model.remat = "dots_no_batch"
  # The Pallas splash-attention kernel: causal and packed-segment masks without [T, T] masks.
  config.model.attention = "splash"
  # The paper's mix (helpful + 3,000 RTO + 3,000 harmful-prefix) from your files.
  config.data.source = "recipe"
  # The authors append this text to every response; LLaMA-3 reads it as EOS.
  config.data.eos_text = "<|end_of_text|>"
  # The authors' 8B run trains 5% of the RTO targets of each example.
  config.loss.rto_keep_rate = 0.05
  config.train.global_batch = 128
  config.train.seq_len = 1024
  config.optim.weight_decay = 2e-5
  # Export in bf16, as Meta ships LLaMA-3.
  config.export.dtype = "bfloat16"
  return config
