"""8 fake CPU devices (set before JAX is imported), LLVM's cheapest optimisation level, a
compilation cache shared by the test processes (training runs recompile identical
programs), and tiny random HF checkpoints."""

import os
import tempfile

# Compiling is most of the suite's time: with the CPU backend at -O0 the whole suite ran in
# 605 and 659 s against 775 s at the default (2 cores, 2026-12-06), every test passing at both.
# It changes only the machine code of the CPU backend, not the programs (HLO) that are tested.
# Subprocesses started by tests inherit it. Set the flag yourself to test at another level.
_FLAGS = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _FLAGS:
  _FLAGS += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{_FLAGS} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="derta_jax_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

# Small, but with every feature that differs between LLaMA generations.
HF_CASES = {
    "llama2_mha": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                       rms_norm_eps=1e-5),
    "llama3_gqa": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0),
    "llama3_1_rope_scaling": dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama3_2_tied": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                          rope_theta=500000.0, tie_word_embeddings=True),
}


def make_hf_model(seed: int = 0, **overrides):
  """A random transformers LlamaForCausalLM whose weights give O(1) logits."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  fields = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
  fields.update(overrides)
  torch.manual_seed(seed)
  model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.15)
  return model


def torch_unsafe_probability(model, tok, template, unsafe, safe, prompt, response) -> float:
  """A classifier judge's P(unsafe) from transformers, unbatched: each verdict's tokens
  appended to [BOS] + tokens of the rendered template and scored alone."""
  import torch

  ids = [tok.bos_id, *tok.encode(template.format(prompt=prompt, response=response))]
  totals = []
  for verdict in (unsafe, safe):
    cand = tok.encode(verdict)
    with torch.no_grad():
      logits = model(input_ids=torch.tensor([ids + cand])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    totals.append(sum(logp[len(ids) - 1 + j, c] for j, c in enumerate(cand)))
  return float(torch.softmax(torch.stack(totals), 0)[0])


def llama3_tokenizer_path() -> str:
  """The real LLaMA-3 tokenizer file, shipped by llama-models (requirements-dev.txt)."""
  import importlib.util

  spec = importlib.util.find_spec("llama_models")
  assert spec is not None, "pip install -r requirements-dev.txt (llama-models ships the file)"
  return os.path.join(os.path.dirname(spec.origin), "llama3", "tokenizer.model")


def set_config(config, **overrides):
  """`config` with overrides whose nested keys are joined by "__" (train__num_steps=2)."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture
def hf_checkpoint(tmp_path):
  """Factory: save a random HF LLaMA to a fresh directory; returns (path, torch model)."""
  def make(name="ckpt", max_shard_size=None, **overrides):
    model = make_hf_model(**overrides)
    path = tmp_path / name
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path, model

  return make
