"""Decoupled Refusal Training (DeRTa) for LLaMA-family models in JAX/Flax NNX.

The public API; each name's module documents it:
  load_hf, save_hf, read_config, CheckpointError   HF safetensors <-> our model
  Llama, LlamaConfig, preset, init_model            the model
  derta_loss, derta_loss_from_hidden, LossConfig     the DeRTa objective (MLE + RTO)
  generate                                           batched KV-cache decoding
  evaluate                                           evaluation suites -> <workdir>/eval
  train                                              a training run from a config
"""

from derta_jax.checkpoints.hf import CheckpointError, load_hf, read_config, save_hf
from derta_jax.evaluation.evaluate import evaluate
from derta_jax.losses import LossConfig, derta_loss, derta_loss_from_hidden
from derta_jax.models.generate import generate
from derta_jax.models.llama import Llama, LlamaConfig, init_model, preset
from derta_jax.training.loop import run as train

__all__ = ["CheckpointError", "Llama", "LlamaConfig", "LossConfig", "derta_loss",
           "derta_loss_from_hidden", "evaluate", "generate", "init_model", "load_hf", "preset",
           "read_config", "save_hf", "train"]
