"""jax.nn.dot_product_attention paths ("dot_product", "cudnn") against the einsum attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from derta_jax import sharding
from derta_jax.models import llama

ON_GPU = jax.default_backend() == "gpu"


def _packed_rows(batch, t):
  """Random ids with two packed segments and trailing padding (id 0) in every other row."""
  ids_BxT = jax.random.randint(jax.random.key(1), (batch, t), 0, 256)
  index_T = jnp.arange(t)
  packed_T = jnp.where(index_T < t // 3, 1, jnp.where(index_T < 3 * t // 4, 2, 0))
  whole_T = jnp.ones((t,), jnp.int32)
  segment_ids_BxT = jnp.stack([packed_T if r % 2 == 0 else whole_T for r in range(batch)])
  return ids_BxT, segment_ids_BxT.astype(jnp.int32)


def _models(attention, **overrides):
  """(einsum model, `attention` model) sharing one random init; queries in blocks of 32."""
  cfg = llama.preset("tiny", attn_q_block=32, **overrides)
  xla = llama.init_model(cfg, seed=0)
  graphdef, _ = nnx.split(llama.abstract_model(cfg.replace(attention=attention)))
  return xla, nnx.merge(graphdef, nnx.state(xla))


def _logits(model, ids_BxT, segment_ids_BxT):
  return nnx.jit(lambda m: m(ids_BxT, segment_ids_BxT=segment_ids_BxT))(model)


def _value_and_grads(model, ids_BxT, segment_ids_BxT):
  def loss(model):
    logits_BxTxV = model(ids_BxT, segment_ids_BxT=segment_ids_BxT)
    return jnp.mean(jax.nn.log_softmax(logits_BxTxV)[..., 0])

  return nnx.jit(nnx.value_and_grad(loss))(model)


def _assert_grads_close(got, want, rtol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * float(jnp.abs(w).max()))


def test_dot_product_equals_xla_attention():
  """Logits and gradients, fp32, packed rows with padding, grouped queries (4 over 2)."""
  xla, dot = _models("dot_product")
  ids_BxT, segment_ids_BxT = _packed_rows(2, 64)
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
    np.testing.assert_allclose(_logits(dot, ids_BxT, segment_ids_BxT),
                               _logits(xla, ids_BxT, segment_ids_BxT), atol=1e-5)
    (loss_x, grads_x), (loss_d, grads_d) = [_value_and_grads(m, ids_BxT, segment_ids_BxT)
                                            for m in (xla, dot)]
  assert float(loss_d) == pytest.approx(float(loss_x), rel=1e-6)
  _assert_grads_close(grads_d, grads_x, 1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs conftest's 8 CPU devices")
def test_dot_product_equals_xla_attention_on_a_2x2x2_mesh():
  """Inside the FSDP shard_map (manual over data x fsdp, "tensor" left automatic)."""
  xla, dot = _models("dot_product")
  ids_BxT, segment_ids_BxT = _packed_rows(4, 64)
  with jax.set_mesh(sharding.make_mesh(2, 2, 2)):
    (loss_x, grads_x), (loss_d, grads_d) = [_value_and_grads(m, ids_BxT, segment_ids_BxT)
                                            for m in (xla, dot)]
  assert float(loss_d) == pytest.approx(float(loss_x), rel=1e-6)
  _assert_grads_close(grads_d, grads_x, 1e-5)


def test_dot_product_computes_in_bfloat16():
  xla, dot = _models("dot_product", dtype="bfloat16")
  ids_BxT, segment_ids_BxT = _packed_rows(2, 64)
  got_BxTxV, want_BxTxV = [_logits(m, ids_BxT, segment_ids_BxT) for m in (dot, xla)]
  assert got_BxTxV.dtype == jnp.float32  # the logits; attention ran in bf16
  np.testing.assert_allclose(got_BxTxV, want_BxTxV, atol=2e-2)


def test_decoding_keeps_the_einsum_attention():
  """With a KV cache "dot_product" models decode exactly like "xla" ones."""
  xla, dot = _models("dot_product")
  ids_BxT = jax.random.randint(jax.random.key(2), (2, 8), 0, 256)
  positions_BxT = jnp.broadcast_to(jnp.arange(8), (2, 8))
  mask_BxTxS = jnp.broadcast_to(jnp.tril(jnp.ones((8, 16), bool)), (2, 8, 16))
  got, want = [m.decode(ids_BxT, positions_BxT, mask_BxTxS, m.init_cache(2, 16), 0)
               for m in (dot, xla)]
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(g, w)


@pytest.mark.skipif(ON_GPU, reason="checks the error off GPUs")
def test_cudnn_off_gpu_names_the_setting():
  _, cudnn = _models("cudnn", dtype="bfloat16")
  ids_BxT, segment_ids_BxT = _packed_rows(2, 32)
  with pytest.raises(ValueError, match=r"model.attention='cudnn' runs on NVIDIA GPUs only "
                                       r"\(this is cpu\); use 'dot_product'"):
    _logits(cudnn, ids_BxT, segment_ids_BxT)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_equals_xla_attention_on_gpu():
  """bf16 logits and gradients of the cuDNN kernel against the einsums, packed rows."""
  xla, cudnn = _models("cudnn", dtype="bfloat16", head_dim=64)  # a head size cuDNN tunes for
  ids_BxT, segment_ids_BxT = _packed_rows(2, 128)
  np.testing.assert_allclose(_logits(cudnn, ids_BxT, segment_ids_BxT),
                             _logits(xla, ids_BxT, segment_ids_BxT), atol=3e-2)
  (loss_x, grads_x), (loss_c, grads_c) = [_value_and_grads(m, ids_BxT, segment_ids_BxT)
                                          for m in (xla, cudnn)]
  assert float(loss_c) == pytest.approx(float(loss_x), rel=1e-2)
  _assert_grads_close(grads_c, grads_x, 5e-2)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_rejects_float32():
  _, cudnn = _models("cudnn", head_dim=64)
  ids_BxT, segment_ids_BxT = _packed_rows(2, 32)
  with pytest.raises(ValueError, match=r"computes in bfloat16 or float16.*model.dtype"):
    _logits(cudnn, ids_BxT, segment_ids_BxT)
