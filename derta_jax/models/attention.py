"""Attention kernels: masked einsums (any backend), the Pallas TPU splash kernel and
`jax.nn.dot_product_attention` (cuDNN flash attention on NVIDIA GPUs, or XLA).

Shapes as in llama.py: B batch, N query heads, K kv heads, G query heads per kv head,
T queries, S keys, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from derta_jax import sharding


def attend(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale):
  scores_BxKxGxTxS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BxKxGxTxH, k_BxKxSxH,
                                preferred_element_type=jnp.float32)
  scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS * scale,
                               jnp.finfo(jnp.float32).min)
  # Softmax in fp32 (as transformers does); every row sees at least its own token.
  exp_BxKxGxTxS = jnp.exp(scores_BxKxGxTxS - scores_BxKxGxTxS.max(-1, keepdims=True))
  probs_BxKxGxTxS = exp_BxKxGxTxS / exp_BxKxGxTxS.sum(-1, keepdims=True)
  return jnp.einsum("BKGTS,BKSH->BKGTH", probs_BxKxGxTxS.astype(v_BxKxSxH.dtype), v_BxKxSxH)


def splash(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT, scale, *, interpret: bool):
  """Causal, segment-masked attention with the Pallas splash kernel (one MQA kernel per
  kv head and row). Under a mesh it runs per device: the kernel cannot be partitioned."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  _, _, g, t, _ = q_BxKxGxTxH.shape
  block = min(512, t)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([sm.CausalMask((t, t))] * g),
                                            block_sizes=sizes, interpret=interpret)

  def one(q_GxTxH, k_TxH, v_TxH, segment_ids_T):
    return kernel(q_GxTxH, k_TxH, v_TxH,
                  segment_ids=sk.SegmentIds(q=segment_ids_T, kv=segment_ids_T))

  run = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and set(mesh.axis_names) - set(mesh.manual_axes):
    P = jax.sharding.PartitionSpec
    auto = set(mesh.axis_names) - set(mesh.manual_axes)
    rows = tuple(a for a in sharding.BATCH_AXES if a in auto) or None
    heads = P(rows, "tensor" if "tensor" in auto else None)
    run = jax.shard_map(run, mesh=mesh, axis_names=auto, check_vma=False,
                        in_specs=(heads, heads, heads, P(rows)), out_specs=heads)
  q_BxKxGxTxH = (q_BxKxGxTxH * scale).astype(q_BxKxGxTxH.dtype)
  return run(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT)


def dot_product(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, scale, *,
                implementation: str | None):
  """Causal, segment-masked grouped-query attention through `jax.nn.dot_product_attention`.

  `implementation`: "cudnn" (cuDNN flash attention; NVIDIA GPU, bf16 or fp16) or None (XLA,
  any backend: the same layout and masks, so CPU tests cover the cuDNN call's inputs).
  Query head n reads kv head n // G, as in the einsum path.
  """
  if implementation == "cudnn":
    backend = jax.default_backend()
    if backend != "gpu":
      raise ValueError(f"model.attention='cudnn' runs on NVIDIA GPUs only (this is {backend}); "
                       "use 'dot_product' (the same call through XLA) or 'xla'")
    if q_BxTxNxH.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"model.attention='cudnn' computes in bfloat16 or float16, not "
                       f"{q_BxTxNxH.dtype}; set model.dtype='bfloat16'")
  # Causality comes from is_causal (cuDNN then skips the masked blocks); the mask only
  # separates packed segments, padding (id 0) being one more segment.
  same_segment_Bx1xTxS = (segment_ids_BxT[:, None, :, None]
                          == segment_ids_BxT[:, None, None, :])
  return jax.nn.dot_product_attention(
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=same_segment_Bx1xTxS, scale=scale,
      is_causal=True, implementation=implementation)
