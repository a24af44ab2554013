"""The model: presets and HF configs, scan/unroll/remat/jit agreement, packing, axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from derta_jax import sharding
from derta_jax.models import hf_config, llama

# Published parameter counts (Meta model cards / HF safetensors metadata).
PUBLISHED_PARAMS = {
    "llama2_7b": 6_738_415_616,
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", sorted(llama.PRESETS))
def test_preset_matches_transformers_architecture(name):
  cfg = llama.PRESETS[name]
  assert hf_config.from_hf_config(hf_config.to_hf_config(cfg)) == cfg
  with torch.device("meta"):
    ref = LlamaForCausalLM(HFLlamaConfig(**hf_config.to_hf_config(cfg)))
  assert cfg.num_params() == sum(p.numel() for p in ref.parameters())
  if name in PUBLISHED_PARAMS:
    assert cfg.num_params() == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", ["llama3_8b", "llama3_1_8b", "llama3_2_1b"])
def test_rope_frequencies_match_transformers(name):
  cfg = llama.PRESETS[name]
  hf_cfg = HFLlamaConfig(**hf_config.to_hf_config(cfg))
  rope_type = hf_cfg.rope_parameters["rope_type"]
  want, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu") if rope_type != "default" else (
      1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)), 1)
  np.testing.assert_allclose(llama.rope_inv_freq(cfg), want.numpy(), rtol=1e-6)
  if cfg.rope_scaling is not None:  # all three regimes of the llama3 rule are exercised
    base = llama.rope_inv_freq(cfg.replace(rope_scaling=None))
    ratio = base / llama.rope_inv_freq(cfg)
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, cfg.rope_scaling.factor).any()
    assert ((ratio > 1.01) & (ratio < cfg.rope_scaling.factor - 0.01)).any()


def _tiny(**overrides):
  return llama.preset("tiny", n_layers=3, **overrides)


def _tokens(cfg, b=2, t=12, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


def _with_config(model, **overrides):
  """The same parameters under another config (scan vs unroll, remat, dtype)."""
  other = llama.abstract_model(model.config.replace(**overrides))
  return nnx.merge(nnx.graphdef(other), nnx.state(model))


@nnx.jit
def _fwd(model, ids, positions=None, segments=None):
  return model(ids, positions_BxT=positions, segment_ids_BxT=segments)


@nnx.jit
def _loss_and_grads(model, ids):
  def loss(m):
    return jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])

  return nnx.value_and_grad(loss)(model)


@pytest.mark.parametrize("overrides", [dict(scan_layers=False), dict(remat="full"),
                                       dict(remat="dots"), dict(remat="dots_no_batch"),
                                       dict(scan_layers=False, remat="full"),
                                       dict(attn_q_block=5), dict(attn_q_block=0)])
def test_layer_stacking_and_remat_agree(overrides):
  model = llama.init_model(_tiny(), seed=3)
  other = _with_config(model, **overrides)
  ids = _tokens(model.config)
  np.testing.assert_allclose(_fwd(other, ids), _fwd(model, ids), atol=1e-6, rtol=1e-6)
  (l1, g1), (l2, g2) = _loss_and_grads(model, ids), _loss_and_grads(other, ids)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_jit_matches_eager():
  model = llama.init_model(_tiny(tie_embeddings=True), seed=4)
  ids = _tokens(model.config)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, ids), model(ids), atol=1e-6)


def test_packed_row_equals_separate_rows():
  model = llama.init_model(_tiny(), seed=5)
  a, b = _tokens(model.config, 1, 7, seed=6), _tokens(model.config, 1, 5, seed=7)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1] * 7 + [2] * 5])
  logits = _fwd(model, packed, segments=segments)
  np.testing.assert_allclose(logits[:, :7], _fwd(model, a), atol=1e-5)
  np.testing.assert_allclose(logits[:, 7:], _fwd(model, b), atol=1e-5)
  positions = llama.positions_from_segments(segments)
  np.testing.assert_array_equal(positions, [list(range(7)) + list(range(5))])
  explicit = _fwd(model, packed, positions, segments)
  np.testing.assert_array_equal(explicit, logits)


def test_explicit_positions_shift_rope():
  """Same tokens at positions offset by a constant: RoPE is relative, logits agree."""
  model = llama.init_model(_tiny(), seed=8)
  ids = _tokens(model.config, 1, 9)
  shifted = _fwd(model, ids, positions=jnp.arange(9)[None] + 37)
  np.testing.assert_allclose(shifted, _fwd(model, ids), atol=1e-4)
  assert not np.allclose(_fwd(model, ids, positions=jnp.arange(9)[None] * 2), _fwd(model, ids),
                         atol=1e-3)


def test_hidden_states_and_unembedding_give_logits():
  for tie in (False, True):
    model = llama.init_model(_tiny(tie_embeddings=tie), seed=9)
    ids = _tokens(model.config)
    hidden = model.hidden_states(ids)
    assert hidden.shape == (2, 12, model.config.d_model)
    assert model.unembed_DxV().shape == (model.config.d_model, model.config.vocab_size)
    np.testing.assert_allclose(hidden @ model.unembed_DxV(), _fwd(model, ids), atol=1e-5)


def test_bfloat16_compute_with_fp32_params():
  model = llama.init_model(_tiny(), seed=10)
  bf16 = _with_config(model, dtype="bfloat16")
  ids = _tokens(model.config)
  assert model.embed[...].dtype == jnp.float32
  assert bf16.hidden_states(ids).dtype == jnp.bfloat16
  logits32, logits16 = _fwd(model, ids), _fwd(bf16, ids)
  assert logits16.dtype == jnp.float32
  # bf16 keeps ~3 significant digits; the argmax of nearly every position survives.
  assert float(jnp.mean(jnp.argmax(logits16, -1) == jnp.argmax(logits32, -1))) >= 0.9
  assert float(jnp.max(jnp.abs(logits16 - logits32))) < 0.05 * float(jnp.abs(logits32).max())


def test_every_parameter_has_logical_axes_with_rules():
  model = llama.abstract_model(llama.PRESETS["llama3_8b"])
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert len(flat) == 12
  for path, var in flat:
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == len(var.shape), path
    assert (path[0] == "layers") == (axes[0] == "layers"), path
    sharding.logical_to_spec(axes)  # raises if an axis has no rule


def test_param_dtype_is_storage_dtype():
  model = llama.init_model(_tiny(param_dtype="bfloat16"))
  assert {v[...].dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))} == {
      jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("overrides, message", [
    (dict(n_heads=4, n_kv_heads=3), r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
    (dict(dtype="float8"), r"dtype='float8'; choose one of"),
    (dict(remat="some"), r"remat='some'; choose one of"),
    (dict(head_dim=15), r"head_dim \(15\) must be even"),
    (dict(attn_q_block=-1), r"attn_q_block must be an int >= 0, got -1"),
    (dict(d_ff=0), r"d_ff must be a positive int, got 0"),
    (dict(attention="flash"), r"attention='flash'; choose one of \('xla', 'splash'"),
    (dict(colour="red"), r"unknown LlamaConfig field\(s\) \['colour'\]"),
])
def test_config_validation(overrides, message):
  with pytest.raises(ValueError, match=message):
    llama.preset("tiny", **overrides)


def test_unknown_preset():
  with pytest.raises(ValueError, match=r"unknown model preset 'llama9'; choose one of"):
    llama.preset("llama9")


def _packed_ids(batch, t):
  ids = jax.random.randint(jax.random.key(0), (batch, t), 0, 256)
  cut = jnp.asarray([[40], [100]])[:batch]
  return ids, 1 + (jnp.arange(t)[None] >= cut).astype(jnp.int32)


def test_splash_kernel_equals_xla_attention():
  """The Pallas splash kernel (interpreted on CPU) against the einsum attention: packed rows,
  forward and gradients, on one device and inside the FSDP shard_map on a 2x2x2 mesh."""
  xla = llama.init_model(llama.preset("tiny"), seed=0)
  splash = llama.init_model(llama.preset("tiny", attention="splash_interpret"), seed=0)
  ids, segments = _packed_ids(2, 128)

  def loss(model):
    return jnp.mean(model.hidden_states(ids, segment_ids_BxT=segments) ** 2)

  np.testing.assert_allclose(splash.hidden_states(ids, segment_ids_BxT=segments),
                             xla.hidden_states(ids, segment_ids_BxT=segments), atol=2e-6)
  ids, segments = jnp.tile(ids, (4, 1)), jnp.tile(segments, (4, 1))
  with jax.set_mesh(sharding.make_mesh(2, 2, 2)):
    got = [nnx.jit(nnx.value_and_grad(loss))(m) for m in (xla, splash)]
  (loss_x, grads_x), (loss_s, grads_s) = got
  assert float(loss_s) == pytest.approx(float(loss_x), rel=1e-6)
  for gx, gs in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_s), strict=True):
    np.testing.assert_allclose(gs, gx, rtol=1e-5, atol=1e-5 * float(jnp.abs(gx).max()))
