"""Decoupled Refusal Training (DeRTa) for LLaMA-family models in JAX/Flax."""

from derta_jax.checkpoints.hf import CheckpointError, load_hf, read_config, save_hf
from derta_jax.models.llama import Llama, LlamaConfig, init_model, preset

__all__ = ["CheckpointError", "Llama", "LlamaConfig", "init_model", "load_hf", "preset",
           "read_config", "save_hf"]
