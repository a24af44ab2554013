"""LlamaConfig <-> transformers `config.json` (both dialects: 4.x and 5.x)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from derta_jax.models.llama_config import LlamaConfig, RopeScaling


class HFConfigError(ValueError):
  """A Hugging Face `config.json` this model cannot represent; names the key and value."""


def _hf_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  # transformers 5 writes `rope_parameters`; checkpoints saved by 4.x carry top-level
  # `rope_theta` and `rope_scaling` (whose type key was once `type`).
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  merged = {**scaling, **params}
  rope_type = merged.get("rope_type", merged.get("type", "default"))
  if rope_type == "default":
    return float(theta), None
  if rope_type != "llama3":
    raise HFConfigError(f"unsupported rope_type {rope_type!r}; derta_jax supports 'default' "
                        "and 'llama3'")
  try:
    return float(theta), RopeScaling(
        factor=float(merged["factor"]), low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_position_embeddings=int(merged["original_max_position_embeddings"]))
  except KeyError as e:
    raise HFConfigError(f"rope_type 'llama3' needs key {e.args[0]!r} in rope_scaling / "
                        "rope_parameters") from None


def from_hf_config(hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
  """LlamaConfig from a transformers `config.json` dict (4.x or 5.x dialect)."""
  if hf.get("model_type", "llama") != "llama":
    raise HFConfigError(f"unsupported model_type {hf.get('model_type')!r}; expected 'llama'")
  archs = hf.get("architectures") or ["LlamaForCausalLM"]
  if "LlamaForCausalLM" not in archs:
    raise HFConfigError(f"unsupported architectures {archs}; expected 'LlamaForCausalLM'")
  for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    if hf.get(key, want) != want:
      raise HFConfigError(f"unsupported {key}={hf[key]!r}; LLaMA uses {want!r}")
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size") if k not in hf]
  if missing:
    raise HFConfigError(f"missing key(s) {missing}")
  theta, scaling = _hf_rope(hf)
  eos = hf.get("eos_token_id")
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"],
      n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      d_ff=hf["intermediate_size"], head_dim=hf.get("head_dim"),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      bos_id=hf.get("bos_token_id"),
      eos_ids=() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
      pad_id=hf.get("pad_token_id"), init_std=float(hf.get("initializer_range", 0.02)))
  try:
    return LlamaConfig(**{**fields, **overrides})
  except (TypeError, ValueError) as e:
    raise HFConfigError(str(e)) from None


def to_hf_config(config: LlamaConfig, *, dtype: str | None = None) -> dict[str, Any]:
  """A `config.json` dict that transformers 4.x, 5.x and vLLM all read the same way."""
  rope = {"rope_type": "default", "rope_theta": config.rope_theta}
  scaling = None
  if config.rope_scaling is not None:
    scaling = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    rope = {**scaling, "rope_theta": config.rope_theta}
  eos = list(config.eos_ids)
  dtype = dtype or config.param_dtype
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": config.vocab_size, "hidden_size": config.d_model,
      "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
      "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
      "head_dim": config.head_dim, "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_eps, "initializer_range": config.init_std,
      "rope_theta": config.rope_theta, "rope_scaling": scaling, "rope_parameters": rope,
      "tie_word_embeddings": config.tie_embeddings, "attention_bias": False,
      "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1, "use_cache": True,
      "bos_token_id": config.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
      "pad_token_id": config.pad_id, "dtype": dtype, "torch_dtype": dtype,
  }
