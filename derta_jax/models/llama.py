"""LLaMA-family decoder in Flax NNX, numerically matching Hugging Face transformers.

Shape legend: B batch, T query tokens, S key tokens, D model, N query heads, K kv heads,
G query heads per kv head (N = K * G), H head dim, F MLP hidden, V vocab, L layers,
R LoRA rank (lora_layer.py). `LlamaConfig` and the presets live in llama_config.py and are
re-exported here.

Layers are always stored stacked (a leading "layers" axis on every block parameter), so
a checkpoint is the same whether the forward pass scans over layers or unrolls them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from derta_jax.models import attention, fsdp
from derta_jax.models import lora_layer as lora_lib
from derta_jax.models.llama_config import (
  ATTENTION,
  DTYPES,
  PRESETS,
  REMAT_POLICIES,
  LlamaConfig,
  RopeScaling,
  preset,
  rope_inv_freq,
)

__all__ = ["ATTENTION", "DTYPES", "PRESETS", "REMAT_POLICIES", "Llama", "LlamaConfig",
           "RopeScaling", "abstract_model", "init_model", "positions_from_segments", "preset",
           "rope_inv_freq"]


def _rotate_half(x_BxTxNxH):
  x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def _apply_rope(x_BxTxNxH, cos_BxTxH, sin_BxTxH):
  return x_BxTxNxH * cos_BxTxH[:, :, None] + _rotate_half(x_BxTxNxH) * sin_BxTxH[:, :, None]


def positions_from_segments(segment_ids_BxT):
  """Positions restarting at 0 wherever the segment id changes (packed rows)."""
  t = segment_ids_BxT.shape[1]
  index_BxT = jnp.broadcast_to(jnp.arange(t), segment_ids_BxT.shape)
  starts_BxT = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxT[:, :1], bool),
       segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  start_index_BxT = jax.lax.cummax(jnp.where(starts_BxT, index_BxT, 0), axis=1)
  return index_BxT - start_index_BxT


def _param(rngs, shape, axes, config, init=None):
  if init is None:
    init = nnx.initializers.normal(config.init_std)
  value = init(rngs.params(), shape, config.weight_dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.eps = config.rms_eps
    self.scale = _param(rngs, (config.d_model,), ("norm",), config, nnx.initializers.ones)

  def __call__(self, x_BxTxD):
    # Normalise in fp32 and cast back before the scale, as transformers does.
    x32 = x_BxTxD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x_BxTxD.dtype) * x32.astype(x_BxTxD.dtype)


class Attention(nnx.Module):
  """Grouped-query attention over what `visible` lets each query see.

  `visible` is a bool mask [B, T, S] (causality and segments combined; with a cache, the
  slots each new token sees) except for the kernels (splash, dot_product, cudnn) without a
  cache, which take the segment ids [B, T] and build their causal, per-segment masks.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, n, k, h = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    self.config = config
    self.q = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), config)
    self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), config)
    self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), config)
    self.o = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), config)
    _add_adapters(self, ("q", "k", "v", "o"), config, rngs)

  def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, visible, cache=None, lora_keys_B=None):
    """Without `cache`: the output. With `cache=(k_BxKxSxH, v_BxKxSxH, index)`: the new keys
    and values are written at slots [index, index + T) and the queries attend to all S
    slots under `visible` [B, T, S]; returns (output, (k, v)). `lora_keys_B`: LoRA dropout."""
    cfg = self.config
    dt = cfg.compute_dtype
    q_BxTxNxH = _adapted(self, "q", jnp.einsum("BTD,DNH->BTNH", x_BxTxD, fsdp.gathered(self.q, dt)),
                         x_BxTxD, lora_keys_B)
    k_BxSxKxH = _adapted(self, "k", jnp.einsum("BSD,DKH->BSKH", x_BxTxD, fsdp.gathered(self.k, dt)),
                         x_BxTxD, lora_keys_B)
    v_BxSxKxH = _adapted(self, "v", jnp.einsum("BSD,DKH->BSKH", x_BxTxD, fsdp.gathered(self.v, dt)),
                         x_BxTxD, lora_keys_B)
    q_BxTxNxH = _apply_rope(q_BxTxNxH, cos_BxTxH, sin_BxTxH)
    k_BxSxKxH = _apply_rope(k_BxSxKxH, cos_BxTxH, sin_BxTxH)
    if cache is None and cfg.attention in ("dot_product", "cudnn"):
      kv = None  # `visible` holds the segment ids [B, T] here
      out_BxTxNxH = attention.dot_product(
          q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, visible, cfg.head_dim**-0.5,
          implementation="cudnn" if cfg.attention == "cudnn" else None)
    else:
      out_BxTxNxH, kv = self._head_major(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, visible, cache)
    out_BxTxD = _adapted(self, "o", jnp.einsum("BTNH,NHD->BTD", out_BxTxNxH,
                                               fsdp.gathered(self.o, dt)), out_BxTxNxH, lora_keys_B)
    return out_BxTxD if cache is None else (out_BxTxD, kv)

  def _head_major(self, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, visible, cache):
    """(output [B, T, N, H], cache's (k, v) or None) of the einsum and splash paths."""
    cfg = self.config
    dt = cfg.compute_dtype
    b, t, _, _ = q_BxTxNxH.shape
    g = cfg.n_heads // cfg.n_kv_heads
    # Head-major layouts make both attention matmuls plain batched GEMMs (faster on CPU).
    q_BxKxGxTxH = q_BxTxNxH.reshape(b, t, cfg.n_kv_heads, g, cfg.head_dim).transpose(
        0, 2, 3, 1, 4)
    k_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3)
    v_BxKxSxH = v_BxSxKxH.transpose(0, 2, 1, 3)
    scale = cfg.head_dim**-0.5
    if cache is not None:
      k_cache, v_cache, index = cache
      k_BxKxSxH = jax.lax.dynamic_update_slice_in_dim(k_cache, k_BxKxSxH.astype(k_cache.dtype),
                                                      index, axis=2)
      v_BxKxSxH = jax.lax.dynamic_update_slice_in_dim(v_cache, v_BxKxSxH.astype(v_cache.dtype),
                                                      index, axis=2)
      out_BxKxGxTxH = attention.attend(q_BxKxGxTxH, k_BxKxSxH.astype(dt), v_BxKxSxH.astype(dt),
                              visible, scale)
    elif cfg.attention != "xla":  # `visible` holds the segment ids [B, T] here
      out_BxKxGxTxH = attention.splash(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, visible, scale,
                              interpret=cfg.attention == "splash_interpret")
    else:
      # Causal: query block [i, j) needs keys [0, j) only, so blocks skip the upper triangle.
      block = cfg.attn_q_block or t
      out_BxKxGxTxH = jnp.concatenate([
          attention.attend(q_BxKxGxTxH[:, :, :, i:i + block], k_BxKxSxH[:, :, :i + block],
                  v_BxKxSxH[:, :, :i + block], visible[:, i:i + block, :i + block], scale)
          for i in range(0, t, block)], axis=3)
    out_BxTxNxH = out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.n_heads,
                                                                 cfg.head_dim)
    return out_BxTxNxH, None if cache is None else (k_BxKxSxH, v_BxKxSxH)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = config.d_model, config.d_ff
    self.dtype = config.compute_dtype
    self.gate = _param(rngs, (d, f), ("embed", "mlp"), config)
    self.up = _param(rngs, (d, f), ("embed", "mlp"), config)
    self.down = _param(rngs, (f, d), ("mlp", "embed"), config)
    _add_adapters(self, ("gate", "up", "down"), config, rngs)

  def __call__(self, x_BxTxD, lora_keys_B=None):
    dt = self.dtype
    gate_BxTxF = _adapted(self, "gate", jnp.einsum("BTD,DF->BTF", x_BxTxD,
                                                   fsdp.gathered(self.gate, dt)),
                          x_BxTxD, lora_keys_B)
    up_BxTxF = _adapted(self, "up", jnp.einsum("BTD,DF->BTF", x_BxTxD, fsdp.gathered(self.up, dt)),
                        x_BxTxD, lora_keys_B)
    hidden_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
    return _adapted(self, "down", jnp.einsum("BTF,FD->BTD", hidden_BxTxF,
                                             fsdp.gathered(self.down, dt)),
                    hidden_BxTxF, lora_keys_B)


def _add_adapters(module: nnx.Module, names, config: LlamaConfig, rngs: nnx.Rngs) -> None:
  """A LoRA adapter `<name>_lora` for each of `names` that config.lora targets."""
  for name in names:
    if config.lora is not None and name in config.lora.targets:
      setattr(module, f"{name}_lora", lora_lib.Adapter(name, config, rngs=rngs))


def _adapted(module: nnx.Module, name: str, y, x, lora_keys_B):
  """`y` plus the LoRA update of projection `name` of input `x`; `y` itself without one."""
  adapter = getattr(module, f"{name}_lora", None)
  if adapter is None:
    return y
  return y + adapter(x, lora_keys_B, lambda var: fsdp.gathered(var, y.dtype))


class Block(nnx.Module):
  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, visible, cache=None, lora_keys_B=None):
    """The block's output, or (output, (k, v)) with a KV cache (see Attention)."""
    attn = self.attn(self.attn_norm(x_BxTxD), cos_BxTxH, sin_BxTxH, visible, cache,
                     lora_keys_B)
    attn_BxTxD, kv = attn if cache is not None else (attn, None)
    x_BxTxD = x_BxTxD + attn_BxTxD
    x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD), lora_keys_B)
    return x_BxTxD if cache is None else (x_BxTxD, kv)


def _stacked_blocks(config: LlamaConfig, rngs: nnx.Rngs) -> Block:
  @nnx.split_rngs(splits=config.n_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return Block(config, rngs=rngs)

  return make(rngs)


class Llama(nnx.Module):
  """`model(input_ids_BxT, positions_BxT=None, segment_ids_BxT=None) -> logits_BxTxV` (fp32).

  `segment_ids_BxT`: tokens attend only within their own segment (packing; give padding
  its own id, e.g. 0). Positions default to 0.. per segment.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = _param(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"), config)
    self.layers = _stacked_blocks(config, rngs)
    self.final_norm = RMSNorm(config, rngs=rngs)
    if not config.tie_embeddings:
      self.lm_head = _param(rngs, (config.d_model, config.vocab_size), ("embed", "vocab"),
                            config)

  def hidden_states(self, input_ids_BxT, positions_BxT=None, segment_ids_BxT=None,
                    lora_keys_B=None, *, layer_outputs: bool = False):
    """Final-norm hidden states [B, T, D] in the compute dtype; with `layer_outputs`, also
    every block's output (the residual stream after block l at [l]) as [L, B, T, D].

    `lora_keys_B`: PRNG keys, one per row, that switch LoRA dropout on (training only).
    """
    cfg = self.config
    dt = cfg.compute_dtype
    b, t = input_ids_BxT.shape
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((b, t), jnp.int32)
    if positions_BxT is None:
      positions_BxT = positions_from_segments(segment_ids_BxT)
    cos_BxTxH, sin_BxTxH = self._rope(positions_BxT)
    if cfg.attention == "xla":
      causal_TxS = jnp.tril(jnp.ones((t, t), bool))
      visible = causal_TxS & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
    else:  # the kernel builds the mask itself from the segment ids
      visible = segment_ids_BxT

    x_BxTxD = jnp.take(self.embed[...], input_ids_BxT, axis=0).astype(dt)
    graphdef, layer_state = nnx.split(self.layers)

    # With dropout, each layer also takes the row keys and its index (from which its masks
    # are drawn); without, the program is the one of a model that has no adapters.
    dropout = lora_keys_B is not None and cfg.lora is not None and cfg.lora.dropout > 0

    def layer(x_BxTxD, state, cos_BxTxH, sin_BxTxH, visible, *keys_i):
      keys_B = lora_lib.layer_keys(*keys_i) if keys_i else None
      return nnx.merge(graphdef, state)(x_BxTxD, cos_BxTxH, sin_BxTxH, visible,
                                        lora_keys_B=keys_B)

    P = jax.sharding.PartitionSpec
    layer = fsdp.layers(layer, layer_state, b, (P(fsdp.BATCH_AXES), P()) if dropout else (),
                         check_vma=cfg.attention in ("xla", "dot_product"))

    def block(x_BxTxD, xs):
      state, keys_i = (xs[0], (lora_keys_B, xs[1])) if dropout else (xs, ())
      x_BxTxD = layer(x_BxTxD, state, cos_BxTxH, sin_BxTxH, visible, *keys_i)
      return x_BxTxD, x_BxTxD if layer_outputs else None

    if cfg.remat != "none":
      block = jax.checkpoint(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    xs = (layer_state, jnp.arange(cfg.n_layers)) if dropout else layer_state
    if cfg.scan_layers:
      x_BxTxD, outputs = jax.lax.scan(block, x_BxTxD, xs)
    else:
      outputs = []
      for i in range(cfg.n_layers):
        x_BxTxD, out = block(x_BxTxD, jax.tree.map(lambda a, i=i: a[i], xs))
        outputs.append(out)
      outputs = jnp.stack(outputs) if layer_outputs else None
    if layer_outputs:
      return self.final_norm(x_BxTxD), outputs
    return self.final_norm(x_BxTxD)

  def _rope(self, positions_BxT):
    cfg = self.config
    freqs_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * rope_inv_freq(cfg)
    angles_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
    dt = cfg.compute_dtype
    return jnp.cos(angles_BxTxH).astype(dt), jnp.sin(angles_BxTxH).astype(dt)

  def init_cache(self, batch: int, slots: int, dtype=None):
    """An empty KV cache: k and v of shape [L, B, K, S, H] (compute dtype by default)."""
    cfg = self.config
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, slots, cfg.head_dim)
    zeros = jnp.zeros(shape, dtype or cfg.compute_dtype)
    return {"k": zeros, "v": zeros}

  def decode(self, input_ids_BxT, positions_BxT, mask_BxTxS, cache, index):
    """Tokens at cache slots [index, index + T) -> (final-norm hidden [B, T, D], cache).

    `mask_BxTxS` says which of the cache's S slots each new token attends to (its own
    slot included); the caller keeps it causal and hides padding.
    """
    cfg = self.config
    cos_BxTxH, sin_BxTxH = self._rope(positions_BxT)
    x_BxTxD = jnp.take(self.embed[...], input_ids_BxT, axis=0).astype(cfg.compute_dtype)
    graphdef, layer_state = nnx.split(self.layers)

    def block(carry, state_i):
      x_BxTxD, k_LxBxKxSxH, v_LxBxKxSxH = carry
      state, i = state_i
      x_BxTxD, (k_BxKxSxH, v_BxKxSxH) = nnx.merge(graphdef, state)(
          x_BxTxD, cos_BxTxH, sin_BxTxH, mask_BxTxS,
          (k_LxBxKxSxH[i], v_LxBxKxSxH[i], index))
      # Written back in place into the carried cache: no per-step copy of the whole cache.
      return (x_BxTxD, k_LxBxKxSxH.at[i].set(k_BxKxSxH),
              v_LxBxKxSxH.at[i].set(v_BxKxSxH)), None

    carry = (x_BxTxD, cache["k"], cache["v"])
    layers = jnp.arange(cfg.n_layers)
    if cfg.scan_layers:
      carry, _ = jax.lax.scan(block, carry, (layer_state, layers))
    else:
      for i in range(cfg.n_layers):
        carry, _ = block(carry, (jax.tree.map(lambda a, i=i: a[i], layer_state), i))
    x_BxTxD, k, v = carry
    return self.final_norm(x_BxTxD), {"k": k, "v": v}

  def unembed_DxV(self):
    """The output projection [D, V] as stored (the embedding transposed when tied)."""
    if self.config.tie_embeddings:
      return self.embed[...].T
    return self.lm_head[...]

  def __call__(self, input_ids_BxT, positions_BxT=None, segment_ids_BxT=None):
    hidden_BxTxD = self.hidden_states(input_ids_BxT, positions_BxT, segment_ids_BxT)
    unembed_DxV = self.unembed_DxV().astype(self.config.compute_dtype)
    return jnp.einsum("BTD,DV->BTV", hidden_BxTxD, unembed_DxV,
                      preferred_element_type=jnp.float32)


def init_model(config: LlamaConfig, seed: int = 0) -> Llama:
  """Random init (normal(init_std) matrices, unit norms), compiled as one program."""
  return nnx.jit(lambda: Llama(config, rngs=nnx.Rngs(seed)))()


def abstract_model(config: LlamaConfig) -> Llama:
  """The model with `ShapeDtypeStruct` leaves: shapes and axes without memory."""
  return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
