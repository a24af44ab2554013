"""The DeRTa train step: pure, jitted once with shardings and a donated state.

State: {"step": int32, "params": fp32 master params (nnx.State), "opt_state": optax state}.
The model runs in its compute dtype; the loss is `derta_loss_from_hidden` (no [B, T, V]
logits), normalised by the token counts of the whole global batch, so gradient
accumulation over micro-batches gives the full-batch gradient.

With LoRA (config.lora.rank > 0) "params" holds the adapters only, and the frozen base
weights (in lora.base_dtype) are a separate argument of the step, sharded, never donated
and never checkpointed: a checkpoint is the adapters plus the config, whose init.hf_path
names the base.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from derta_jax import data, lora_train, losses, optim, sharding
from derta_jax import metrics as metrics_lib
from derta_jax.checkpoints import hf, orbax, peft
from derta_jax.data import pipeline, synthetic
from derta_jax.models import llama, lora


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
  shardings = param_shardings(base, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), base,
                      shardings), shardings


def loss_fn(graphdef, params, batch, loss_config: LossConfig, *, counts, base=None):
  """(loss, metrics) of one (micro-)batch; `counts` are the global batch's token counts."""
  model = nnx.merge(graphdef, params) if base is None else nnx.merge(graphdef, params, base)
  hidden_BxTxD = model.hidden_states(batch["input_ids"], batch.get("positions"),
                                     batch.get("segment_ids"), batch.get("lora_keys"))
  unembed_DxV = model.unembed_DxV().astype(model.config.compute_dtype)
  return losses.derta_loss_from_hidden(
      hidden_BxTxD=hidden_BxTxD, unembed_DxV=unembed_DxV, batch=batch,
      refusal_ids=loss_config.refusal_ids, rto_weight=loss_config.rto_weight,
      normalize=loss_config.normalize, z_loss=loss_config.z_loss, counts=counts,
      chunk_size=loss_config.chunk_size)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable,
                    loss_config: LossConfig, *, micro_batches: int = 1):
  """train_step(state, batch[, base]) -> (state, metrics), not yet jitted; `base`: the frozen
  weights of a LoRA model."""

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array], base=None):
    batch = dict(batch)
    if base is not None:  # LoRA dropout keys, one a row: micro-batches take their rows' keys
      batch["lora_keys"] = lora.row_keys(seed=loss_config.seed, step=state["step"],
                                         rows=batch["input_ids"].shape[0])
    if loss_config.rto_keep_rate < 1.0:
      batch["rto_mask"] = losses.rto_keep_mask(
          rto_mask_BxT=batch["rto_mask"], keep_rate=loss_config.rto_keep_rate,
          seed=loss_config.seed, step=state["step"], segment_ids_BxT=batch.get("segment_ids"))
    counts = (jnp.sum(batch["mle_mask"]), jnp.sum(batch["rto_mask"]))

    def grad_fn(micro):
      return jax.value_and_grad(
          lambda p: loss_fn(graphdef, p, micro, loss_config, counts=counts, base=base),
          has_aux=True)(state["params"])

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


def frozen_base(model: llama.Llama, mesh: Mesh | None = None):
  """(base, shardings or None) of a LoRA model, placed as the step takes it; (None, None)
  without LoRA."""
  base = split_model(model)[2]
  if base is None:
    return None, None
  if mesh is None:
    return jax.device_put(base, jax.local_devices()[0]), None
  shardings = param_shardings(base, mesh)
  return jax.device_put(base, shardings), shardings


def jit_train_step(train_step, state_shardings, mesh: Mesh | None, base_shardings=None,
                   tpu_compiler_options: str = "overlap"):
  """jit with in/out shardings (batch rows over data x fsdp) and the state donated; the
  frozen base of a LoRA step (`base_shardings`) is read, never donated."""
  if mesh is None:
    return jax.jit(train_step, donate_argnums=0)
  rows = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  base = () if base_shardings is None else (base_shardings,)
  jitted = jax.jit(train_step, in_shardings=(state_shardings, rows, *base),
                   out_shardings=(state_shardings, replicated), donate_argnums=0,
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


# ----------------------------------------------------------------------------------------
# The loop.


def build_data(config, workdir: Path):
  """(tokenizer, recipe(epoch) -> examples, refusal ids) from config.data and config.loss."""
  d = config.data
  if d.source == "synthetic":
    helpful, triples = synthetic.make_sources(seed=config.seed, n_helpful=d.synthetic_helpful,
                                              n_triples=d.synthetic_triples)
    tokenizer_path = d.tokenizer_path or synthetic.write_tokenizer(workdir / "tokenizer")
  elif d.source == "recipe":
    helpful = data.load_helpful(d.helpful_path) if d.helpful_path else []
    triples = data.load_triples(d.triples_path)
    tokenizer_path = d.tokenizer_path or config.init.hf_path
  elif d.source == "upstream":
    examples = [ex for path in d.upstream_path.split(",") for ex in data.load_upstream(path)]
    tokenizer_path = d.tokenizer_path or config.init.hf_path
  else:
    raise ValueError(f"data.source={d.source!r}; choose 'synthetic', 'recipe' or 'upstream'")
  if not tokenizer_path:
    raise ValueError("data.tokenizer_path is unset and so is init.hf_path: no tokenizer")
  tokenizer = data.load_tokenizer(tokenizer_path)
  ids = (tuple(config.loss.refusal_ids) if config.loss.refusal_ids else
         data.refusal_ids(tokenizer, d.refusal_text, policy=d.refusal_policy))
  if d.source == "upstream":
    return tokenizer, (lambda epoch: examples), ids
  counts = {k: v for k, v in (("rto", d.n_rto), ("prefix", d.n_prefix),
                              ("vanilla", d.n_vanilla)) if v >= 0 and k in
            dict(data.RECIPES.get(d.recipe, ()))}

  def recipe(epoch):
    return data.build_recipe(d.recipe, triples=triples, helpful=helpful, seed=config.seed,
                             epoch=epoch, counts=counts, template=d.template,
                             eos_text=d.eos_text or tokenizer.decode([tokenizer.eos_id]),
                             prefix_mode=d.prefix_mode, static=d.static_prefix)

  return tokenizer, recipe, ids


def _finite_or_raise(step: int, metrics: dict, ckpt: orbax.Checkpointer) -> None:
  if not math.isfinite(metrics["loss"]):
    raise FloatingPointError(
        f"loss is {metrics['loss']} at step {step}; stopped without saving. The last good "
        f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")


def check_config(config) -> None:
  """Value checks of train/loss keys that would otherwise fail mid-run or inside jit."""
  t, lo = config.train, config.loss
  problems = []
  if lo.normalize not in losses.NORMALIZE:
    problems.append(f"loss.normalize={lo.normalize!r}; choose one of {losses.NORMALIZE}")
  if not 0.0 < lo.rto_keep_rate <= 1.0:
    problems.append(f"loss.rto_keep_rate={lo.rto_keep_rate} must be in (0, 1]")
  if lo.chunk_size < 1:
    problems.append(f"loss.chunk_size={lo.chunk_size} must be >= 1")
  if t.micro_batches < 1 or t.global_batch % t.micro_batches:
    problems.append(f"train.micro_batches ({t.micro_batches}) must divide train.global_batch "
                    f"({t.global_batch})")
  if t.num_steps < 0 or (t.num_steps == 0 and t.epochs <= 0):
    problems.append(f"train.num_steps={t.num_steps}, train.epochs={t.epochs}: set a positive "
                    "num_steps, or num_steps=0 and epochs > 0")
  if t.log_every < 1 or config.ckpt.every_steps < 1:
    problems.append(f"train.log_every ({t.log_every}) and ckpt.every_steps "
                    f"({config.ckpt.every_steps}) must be >= 1")
  if t.tpu_compiler_options not in sharding.TPU_COMPILER_OPTIONS:
    problems.append(f"train.tpu_compiler_options={t.tpu_compiler_options!r}; choose one of "
                    f"{sorted(sharding.TPU_COMPILER_OPTIONS)}")
  if config.model.attention == "splash" and jax.default_backend() != "tpu":
    problems.append(f"model.attention='splash' runs on TPU only (this is {jax.default_backend()}"
                    "); use 'xla' (mode=compile checks a TPU step from any machine)")
  problems += lora_train.config_problems(config.lora)
  if problems:
    raise ValueError("; ".join(problems))


def run(config, workdir: Path) -> dict:
  """Train per config; resume from <workdir>/checkpoints; export <workdir>/hf at the end."""
  from derta_jax import main as derta_main

  check_config(config)
  sharding.initialize_distributed()
  t = config.train
  mesh = derta_main.config_mesh(config)
  model_config = derta_main.resolved_model_config(config)
  sharding.validate(mesh, global_batch_size=t.global_batch, model_config=model_config)
  tokenizer, recipe, refusal = build_data(config, workdir)
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                     f"vocab_size {model_config.vocab_size}")
  pipe = pipeline.Pipeline(recipe, tokenizer, seq_len=t.seq_len, global_batch=t.global_batch,
                           seed=config.seed, refusal_ids=refusal, pack=config.data.pack)
  num_steps = t.num_steps if t.num_steps > 0 else int(t.epochs * pipe.steps_in_epoch(0))
  o = config.optim
  tx, schedule = optim.make_optimizer(
      lr=o.lr, num_steps=num_steps, schedule=o.schedule, warmup_ratio=o.warmup_ratio,
      b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm)
  loss_config = LossConfig(refusal_ids=tuple(refusal), rto_weight=config.loss.rto_weight,
                           normalize=config.loss.normalize, z_loss=config.loss.z_loss,
                           chunk_size=config.loss.chunk_size,
                           rto_keep_rate=config.loss.rto_keep_rate, seed=config.seed)

  ckpt = orbax.Checkpointer(workdir, every_steps=config.ckpt.every_steps,
                            max_to_keep=config.ckpt.max_to_keep or None)
  base = base_shardings = None
  if config.lora.rank:  # the base is rebuilt on resume too: checkpoints hold adapters only
    model = lora.attach(lora_train.frozen_base_model(config, mesh),
                        lora.from_config(config.lora), seed=config.seed, mesh=mesh)
    base, base_shardings = frozen_base(model, mesh)
    model_config = model.config
  if ckpt.latest_step() is not None:
    if base is not None:
      lora_train.check_same_base(ckpt.restore_config(), config, ckpt.directory)
    graphdef, abstract, shardings = abstract_state(model_config, tx, mesh)
    state, start = ckpt.restore(abstract)
    logging.info("resumed from step %d in %s", start, ckpt.directory)
  else:
    if base is None:
      model = derta_main.build_model(config, mesh)
    graphdef, state, shardings = init_state(model, tx, mesh)
    if config.init.orbax_path and base is None:
      state["params"] = orbax.load_params(config.init.orbax_path, jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
          state["params"]))
    start = 0
  step_fn = jit_train_step(make_train_step(graphdef, tx, schedule, loss_config,
                                           micro_batches=t.micro_batches), shardings, mesh,
                           base_shardings, t.tpu_compiler_options)
  model = None  # its adapters may be the state's buffers, which the step donates
  frozen = () if base is None else (base,)
  logger = metrics_lib.MetricsLogger(workdir, total_steps=num_steps, start_step=start,
                                     enabled=jax.process_index() == 0)
  ckpt.install_signal_handler()
  pending, last = None, {}
  clock = time.perf_counter()

  def fetch(entry):
    nonlocal clock
    step, metrics_dev, tokens = entry
    metrics = {k: float(v) for k, v in jax.device_get(metrics_dev).items()}
    now = time.perf_counter()
    metrics["tokens_per_s"] = tokens / max(now - clock, 1e-9)
    clock = now
    _finite_or_raise(step, metrics, ckpt)
    logger.log(step, metrics, write=step % t.log_every == 0 or step == num_steps)
    return metrics

  try:
    for step in range(start, num_steps):
      local = pipe.batch(step)
      tokens = int((local["segment_ids"] > 0).sum()) * jax.process_count()
      state, metrics_dev = step_fn(state, sharding.global_batch(local, mesh), *frozen)
      if pending is not None:  # the previous step's metrics, read while this one runs
        last = fetch(pending)
      pending = (step + 1, metrics_dev, tokens)
      stop = ckpt.should_stop(step + 1)
      if stop or (step + 1) % config.ckpt.every_steps == 0 or step + 1 == num_steps:
        last, pending = fetch(pending), None  # never save a state whose loss is not finite
        ckpt.save(step + 1, state, config=config.to_dict(), force=True)
      if stop:
        logging.warning("stop requested: saved step %d", step + 1)
        break
    if pending is not None:
      last = fetch(pending)
    ckpt.wait()
  finally:
    logger.close()
    ckpt.close()
  summary = dict(mode="train", steps=int(jax.device_get(state["step"])), num_steps=num_steps,
                 **{k: last[k] for k in ("loss", "mle_loss", "rto_loss") if k in last})
  if int(summary["steps"]) == num_steps:
    model = nnx.merge(graphdef, state["params"], *frozen)
    summary.update(export(model, config, workdir))
  return summary


def export(model: llama.Llama, config, workdir: Path) -> dict:
  """<workdir>/hf; with LoRA the merged weights there and the adapters in <workdir>/peft."""
  dtype = config.export.dtype or None
  out = {}
  if model.config.lora is not None:
    peft.save_peft(model, workdir / "peft", base_name_or_path=config.init.hf_path)
    out["peft_dir"] = str(workdir / "peft")
    model = lora.merge(model, dtype)
  hf.save_hf(model, workdir / "hf", dtype=dtype,
             max_shard_bytes=int(config.export.max_shard_mb * 2**20))
  return dict(out, hf_dir=str(workdir / "hf"))
