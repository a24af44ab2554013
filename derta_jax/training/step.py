"""The DeRTa train step: pure, jitted once with shardings and a donated state.

State: {"step": int32, "params": fp32 master params (nnx.State), "opt_state": optax state}.
The model runs in its compute dtype; the loss is `derta_loss_from_hidden` (no [B, T, V]
logits), normalised by the token counts of the whole global batch, so gradient
accumulation over micro-batches gives the full-batch gradient.

Frozen weights are one separate argument of the step, a dict, sharded, never donated and
never checkpointed (a resumed run rebuilds them from the config):
  "base"       with LoRA (config.lora.rank > 0) "params" holds the adapters only, and this
               the base weights (in lora.base_dtype); a checkpoint is the adapters plus the
               config, whose init.hf_path names the base.
  "reference"  objectives that read a reference model pi_ref (DPO, Qi et al., NPO / DOOR,
               circuit breakers) without LoRA: the params at the start of fine-tuning in the
               compute dtype. With LoRA the reference is the base with the adapters off (no
               second copy of the weights).
  "weighting"  W-DOOR's weighting model (loss.wdoor_path), like "reference".
The reference's log-probs or hidden states are computed in the same jitted step, without
gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from derta_jax import losses, optim, sharding
from derta_jax.losses import objectives
from derta_jax.models import llama, lora


def state_shardings(params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh,
                    rules=sharding.DEFAULT_RULES):
  """Shardings of the whole train state: params from their logical axes, each optimizer
  leaf like the parameter whose tree path ends its own (Adam's mu and nu), the rest
  (step counts) replicated."""
  p_shardings = sharding.param_shardings(params, mesh, rules)
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


def split_model(model: llama.Llama):
  """(graphdef, trained params, frozen base or None): with LoRA only the adapters train."""
  if model.config.lora is None:
    return (*nnx.split(model, nnx.Param), None)
  return nnx.split(model, lora.LoraParam, nnx.Param)


def abstract_state(config: llama.LlamaConfig, tx: optax.GradientTransformation,
                   mesh: Mesh | None = None):
  """(graphdef, train state of jax.ShapeDtypeStructs, shardings or None): nothing allocated."""
  graphdef, params, _ = split_model(llama.abstract_model(config))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
  state = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
               opt_state=jax.eval_shape(tx.init, params))
  if mesh is None:
    return graphdef, state, None
  shardings = state_shardings(split_model(llama.abstract_model(config))[1], tx, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                       shardings)
  return graphdef, state, shardings


def abstract_base(config: llama.LlamaConfig, mesh: Mesh | None = None):
  """(frozen base of jax.ShapeDtypeStructs in config.param_dtype, shardings or None) of a
  LoRA model; (None, None) without LoRA."""
  if config.lora is None:
    return None, None
  base = split_model(llama.abstract_model(config))[2]
  if mesh is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base), None
  shardings = sharding.param_shardings(base, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), base,
                      shardings), shardings


def _frozen_model(graphdef, params, frozen, name: str):
  """A frozen model of the step: frozen[name] ("reference", "weighting"); for a LoRA run
  (frozen["base"]) those weights or the base with the adapters switched off (zero adapters
  add exactly 0, and no dropout keys are passed)."""
  if "base" not in frozen:
    if name not in frozen:
      raise ValueError(f"this objective needs a {name} model: the step got no frozen "
                       f"{name!r} weights and no LoRA base")
    return nnx.merge(graphdef, frozen[name])
  off = jax.tree.map(jnp.zeros_like, params)
  return nnx.merge(graphdef, off, frozen.get(name, frozen["base"]))


def _rival_loss(model, graphdef, params, batch, loss_config, *, counts, frozen, step):
  """(loss, metrics) of a rival objective: the policy's and the reference's per-position
  log-probs (or per-layer hidden states) in one program, the reference's without gradient."""
  layers = loss_config.objective in objectives.NEEDS_HIDDEN_LAYERS
  args = (batch["input_ids"], batch.get("positions"), batch.get("segment_ids"))
  out = model.hidden_states(*args, batch.get("lora_keys"), layer_outputs=layers)
  ref_model = _frozen_model(graphdef, params, frozen, "reference")
  ref_out = jax.lax.stop_gradient(ref_model.hidden_states(*args, layer_outputs=layers))
  if layers:
    return objectives.rival_loss(loss_config, batch=batch, counts=counts,
                                 hidden_LxBxTxD=out[1], ref_hidden_LxBxTxD=ref_out[1],
                                 step=step)

  def logprobs(m, hidden_BxTxD):
    return losses.token_logprobs_from_hidden(
        hidden_BxTxD=hidden_BxTxD, unembed_DxV=m.unembed_DxV().astype(m.config.compute_dtype),
        targets_BxT=batch["targets"], chunk_size=loss_config.chunk_size)

  ref_logp_BxT = jax.lax.stop_gradient(logprobs(ref_model, ref_out))
  weights_BxT = None
  if "weighting" in frozen:  # W-DOOR: token weights from a weighting (DPO-trained) model
    weighting = _frozen_model(graphdef, params, frozen, "weighting")
    weighting_logp_BxT = jax.lax.stop_gradient(
        logprobs(weighting, weighting.hidden_states(*args)))
    weights_BxT = losses.wdoor_weights(weighting_logp_BxT=weighting_logp_BxT,
                                       ref_logp_BxT=ref_logp_BxT, tau=loss_config.wdoor_tau)
  return objectives.rival_loss(
      loss_config, batch=batch, counts=counts, logp_BxT=logprobs(model, out),
      ref_logp_BxT=ref_logp_BxT, token_weights_BxT=weights_BxT, step=step)


def loss_fn(graphdef, params, batch, loss_config: losses.LossConfig, *, counts, frozen=None,
            step=0):
  """(loss, metrics) of one (micro-)batch; `counts` are the global batch's normalisers;
  `frozen`: the step's frozen weights ("base" of a LoRA run, "reference", "weighting")."""
  frozen = frozen or {}
  base = frozen.get("base")
  model = nnx.merge(graphdef, params) if base is None else nnx.merge(graphdef, params, base)
  if loss_config.objective != "derta":
    return _rival_loss(model, graphdef, params, batch, loss_config, counts=counts,
                       frozen=frozen, step=step)
  hidden_BxTxD = model.hidden_states(batch["input_ids"], batch.get("positions"),
                                     batch.get("segment_ids"), batch.get("lora_keys"))
  unembed_DxV = model.unembed_DxV().astype(model.config.compute_dtype)
  return losses.derta_loss_from_hidden(
      hidden_BxTxD=hidden_BxTxD, unembed_DxV=unembed_DxV, batch=batch,
      refusal_ids=loss_config.refusal_ids, rto_weight=loss_config.rto_weight,
      normalize=loss_config.normalize, z_loss=loss_config.z_loss, counts=counts,
      chunk_size=loss_config.chunk_size)


def _step_parts(graphdef, loss_config: losses.LossConfig, micro_batches: int):
  """grads(state, batch, frozen) -> (loss, metrics, grads): what a step computes before its
  update, shared by the train step and the check step."""

  def grads(state, batch, frozen):
    batch = dict(batch)
    if "base" in frozen:  # LoRA dropout keys, one a row: micro-batches take their rows' keys
      batch["lora_keys"] = lora.row_keys(seed=loss_config.seed, step=state["step"],
                                         rows=batch["input_ids"].shape[0])
    if loss_config.objective == "derta":
      if loss_config.rto_keep_rate < 1.0:
        batch["rto_mask"] = losses.rto_keep_mask(
            rto_mask_BxT=batch["rto_mask"], keep_rate=loss_config.rto_keep_rate,
            seed=loss_config.seed, step=state["step"],
            segment_ids_BxT=batch.get("segment_ids"))
      counts = (jnp.sum(batch["mle_mask"]), jnp.sum(batch["rto_mask"]))
    else:
      counts = objectives.global_counts(loss_config.objective, batch)

    def grad_fn(micro):
      return jax.value_and_grad(
          lambda p: loss_fn(graphdef, p, micro, loss_config, counts=counts, frozen=frozen,
                            step=state["step"]),
          has_aux=True)(state["params"])

    (loss, metrics), grads = optim.accumulate_gradients(grad_fn, batch,
                                                        micro_batches=micro_batches)
    if micro_batches > 1:  # per-micro-batch means and counts were summed
      metrics = {k: v / micro_batches for k, v in metrics.items()}
      if loss_config.objective == "derta":
        metrics.update(mle_tokens=counts[0].astype(jnp.float32),
                       rto_tokens=counts[1].astype(jnp.float32))
      else:
        metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in counts.items()})
    return loss, dict(metrics, loss=loss, grad_norm=optax.global_norm(grads)), grads

  return grads


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable,
                    loss_config: losses.LossConfig, *, micro_batches: int = 1):
  """train_step(state, batch[, frozen]) -> (state, metrics), not yet jitted; `frozen`: a dict
  of frozen weights, read and never updated: "base" (a LoRA model's), "reference" (the
  weights at the start of fine-tuning, for objectives that need pi_ref without LoRA),
  "weighting" (W-DOOR's weighting model)."""
  grads_of = _step_parts(graphdef, loss_config, micro_batches)

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array], frozen=None):
    _, metrics, grads = grads_of(state, batch, frozen or {})
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, lr=schedule(state["step"]))
    return dict(step=state["step"] + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_check_step(graphdef, schedule: Callable, loss_config: losses.LossConfig, *,
                    micro_batches: int = 1):
  """check_step(state, batch[, frozen]) -> metrics: what train_step would report for this
  state and batch (loss, gradient norm, ...), without updating anything. The loop runs it on a
  state before saving it, so a checkpoint holds only params whose own loss was seen."""
  grads_of = _step_parts(graphdef, loss_config, micro_batches)

  def check_step(state: dict[str, Any], batch: dict[str, jax.Array], frozen=None):
    return dict(grads_of(state, batch, frozen or {})[1], lr=schedule(state["step"]))

  return check_step


def init_state(model: llama.Llama, tx: optax.GradientTransformation, mesh: Mesh | None = None):
  """(graphdef, state, state shardings or None) from a model; params become fp32 masters
  (with LoRA: the adapters; `frozen_base` gives the rest)."""
  graphdef, trained, _ = split_model(model)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), trained)
  if mesh is None:
    # Committed to one device, like the step's outputs, so the step compiles only once.
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params))
    return graphdef, jax.device_put(state, jax.local_devices()[0]), None
  shardings = state_shardings(trained, tx, mesh)
  params = jax.device_put(params, shardings["params"])
  state = dict(step=jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]), params=params,
               opt_state=jax.jit(tx.init, out_shardings=shardings["opt_state"])(params))
  return graphdef, state, shardings


def place_frozen(weights: nnx.State, mesh: Mesh | None = None):
  """(weights, shardings or None) placed as the step reads frozen weights: sharded like the
  parameters they are (by their logical axes), or committed to one device."""
  if mesh is None:
    return jax.device_put(weights, jax.local_devices()[0]), None
  shardings = sharding.param_shardings(weights, mesh)
  return jax.device_put(weights, shardings), shardings


def frozen_base(model: llama.Llama, mesh: Mesh | None = None):
  """(base, shardings or None) of a LoRA model, placed as the step takes it; (None, None)
  without LoRA."""
  base = split_model(model)[2]
  if base is None:
    return None, None
  return place_frozen(base, mesh)


def reference_weights(model: llama.Llama, mesh: Mesh | None = None, dtype=None):
  """(weights, shardings or None): a full fine-tune's reference model, its trained params at
  the start of fine-tuning cast to `dtype` (default: the compute dtype), never updated."""
  dtype = jnp.dtype(dtype or model.config.compute_dtype)
  params = split_model(model)[1]
  # A copy even in the params' own dtype: the train state's params are donated to the step.
  return place_frozen(jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), params),
                      mesh)


def abstract_reference(config: llama.LlamaConfig, mesh: Mesh | None = None, dtype=None):
  """`reference_weights` as jax.ShapeDtypeStructs (for ahead-of-time compilation)."""
  dtype = jnp.dtype(dtype or config.compute_dtype)
  params = split_model(llama.abstract_model(config))[1]
  if mesh is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params), None
  shardings = sharding.param_shardings(params, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s), params,
                      shardings), shardings


def jit_train_step(train_step, state_shardings, mesh: Mesh | None, frozen_shardings=None,
                   tpu_compiler_options: str = "overlap", *, check: bool = False):
  """jit with in/out shardings (batch rows over data x fsdp) and the state donated; the
  frozen weights (a dict, `frozen_shardings` its shardings) are read, never donated. `check`:
  the function is a check step (metrics only; the state is read, not donated)."""
  donate = () if check else (0,)
  if mesh is None:
    return jax.jit(train_step, donate_argnums=donate)
  rows = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  frozen = (frozen_shardings,) if frozen_shardings else ()
  jitted = jax.jit(train_step, in_shardings=(state_shardings, rows, *frozen),
                   out_shardings=replicated if check else (state_shardings, replicated),
                   donate_argnums=donate,
                   compiler_options=sharding.compiler_options(mesh, tpu_compiler_options))
  return _MeshStep(jitted, mesh)


class _MeshStep:
  """The jitted step, traced and run under `jax.set_mesh(mesh)` so the model can pin its
  activations to batch-row sharding; `.lower(...)` as for any jitted function (AOT)."""

  def __init__(self, jitted, mesh: Mesh):
    self._jitted, self._mesh = jitted, mesh

  def __call__(self, *args):
    with jax.set_mesh(self._mesh):
      return self._jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self._mesh):
      return self._jitted.lower(*args)
