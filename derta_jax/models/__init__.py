"""The LLaMA-family model in Flax NNX: architecture configs, attention kernels, in-model
FSDP, LoRA adapters (layer and whole-model transform), HF config dialects, KV-cache decoding."""
