"""The DeRTa train step: pure, jitted once with shardings and a donated state.

State: {"step": int32, "params": fp32 master params (nnx.State), "opt_state": optax state}.
The model runs in its compute dtype; the loss is `derta_loss_from_hidden` (no [B, T, V]
logits), normalised by the token counts of the whole global batch, so gradient
accumulation over micro-batches gives the full-batch gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from derta_jax import losses, optim, sharding
from derta_jax.models import llama


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What `derta_loss_from_hidden` needs besides arrays."""

  refusal_ids: tuple[int, ...]
  rto_weight: float = 1.0
  normalize: str = "tokens"
  z_loss: float = 0.0
  chunk_size: int = 512
  rto_keep_rate: float = 1.0
  seed: int = 0


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_shardings(params: nnx.State, mesh: Mesh, rules=sharding.DEFAULT_RULES):
  """NamedShardings of the params from their logical axes, in the params' tree structure."""
  def one(path, var):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    return var.replace(sharding.param_sharding(name, var.shape, var.get_metadata()["out_sharding"],
                                               mesh, rules))

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_var)


def state_shardings(params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh,
                    rules=sharding.DEFAULT_RULES):
  """Shardings of the whole train state: params from their logical axes, each optimizer
  leaf like the parameter whose tree path ends its own (Adam's mu and nu), the rest
  (step counts) replicated."""
  p_shardings = param_shardings(params, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  by_path = dict(jax.tree_util.tree_flatten_with_path(p_shardings)[0])
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)

  def pick(path, leaf):
    del leaf
    for i in range(len(path)):
      if path[i:] in by_path:
        return by_path[path[i:]]
    return replicated

  opt = jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, abstract_params))
  return dict(step=replicated, params=p_shardings, opt_state=opt)


def abstract_state(config: llama.LlamaConfig, tx: optax.GradientTransformation,
                   mesh: Mesh | None = None):
  """(graphdef, train state of jax.ShapeDtypeStructs, shardings or None): nothing allocated."""
  graphdef, params = nnx.split(llama.abstract_model(config), nnx.Param)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
  state = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
               opt_state=jax.eval_shape(tx.init, params))
  if mesh is None:
    return graphdef, state, None
  shardings = state_shardings(nnx.split(llama.abstract_model(config), nnx.Param)[1], tx, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                       shardings)
  return graphdef, state, shardings


def loss_fn(graphdef, params, batch, loss_config: LossConfig, *, counts):
  """(loss, metrics) of one (micro-)batch; `counts` are the global batch's token counts."""
  model = nnx.merge(graphdef, params)
  hidden_BxTxD = model.hidden_states(batch["input_ids"], batch.get("positions"),
                                     batch.get("segment_ids"))
  unembed_DxV = model.unembed_DxV().astype(model.config.compute_dtype)
  return losses.derta_loss_from_hidden(
      hidden_BxTxD=hidden_BxTxD, unembed_DxV=unembed_DxV, batch=batch,
      refusal_ids=loss_config.refusal_ids, rto_weight=loss_config.rto_weight,
      normalize=loss_config.normalize, z_loss=loss_config.z_loss, counts=counts,
      chunk_size=loss_config.chunk_size)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable,
                    loss_config: LossConfig, *, micro_batches: int = 1):
  """train_step(state, batch) -> (state, metrics), not yet jitted."""

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
    batch = dict(batch)
    if loss_config.rto_keep_rate < 1.0:
      batch["rto_mask"] = losses.rto_keep_mask(
          rto_mask_BxT=batch["rto_mask"], keep_rate=loss_config.rto_keep_rate,
          seed=loss_config.seed, step=state["step"], segment_ids_BxT=batch.get("segment_ids"))
    counts = (jnp.sum(batch["mle_mask"]), jnp.sum(batch["rto_mask"]))

    def grad_fn(micro):
      return jax.value_and_grad(
          lambda p: loss_fn(graphdef, p, micro, loss_config, counts=counts), has_aux=True)(
              state["params"])

    (loss, metrics), grads = optim.accumulate_gradients(grad_fn, batch,
                                                        micro_batches=micro_batches)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if micro_batches > 1:  # per-micro-batch means and counts were summed
      metrics = {k: v / micro_batches for k, v in metrics.items()}
      metrics.update(mle_tokens=counts[0].astype(jnp.float32),
                     rto_tokens=counts[1].astype(jnp.float32))
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   lr=schedule(state["step"]))
    return dict(step=state["step"] + 1, params=params, opt_state=opt_state), metrics

  return train_step


def init_state(model: llama.Llama, tx: optax.GradientTransformation, mesh: Mesh | None = None):
  """(graphdef, state, state shardings or None) from a model; params become fp32 masters."""
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  if mesh is None:
    return graphdef, dict(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=jax.jit(tx.init)(params)), None
  shardings = state_shardings(nnx.state(model, nnx.Param), tx, mesh)
  params = jax.device_put(params, shardings["params"])
  state = dict(step=jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]), params=params,
               opt_state=jax.jit(tx.init, out_shardings=shardings["opt_state"])(params))
  return graphdef, state, shardings


def jit_train_step(train_step, state_shardings, mesh: Mesh | None):
  """jit with in/out shardings (batch rows over data x fsdp) and the state donated."""
  if mesh is None:
    return jax.jit(train_step, donate_argnums=0)
  rows = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(train_step, in_shardings=(state_shardings, rows),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
