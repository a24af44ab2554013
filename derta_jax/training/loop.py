"""The training loop: set up from the config, restore or initialise, step, checkpoint, export.

Resumes from <workdir>/checkpoints; metrics are read one step late, so the device never
waits for the host; a state is saved only after the step that produced it reported a
finite loss; <workdir>/hf (and <workdir>/peft with LoRA) is written when the last step is
done.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import jax
import optax
from absl import logging
from flax import nnx

from derta_jax import config_build, losses, sharding
from derta_jax.checkpoints import orbax
from derta_jax.data import pipeline
from derta_jax.models import lora
from derta_jax.training import export, metrics, step


@dataclasses.dataclass
class Setup:
  """What a run needs before its state exists."""

  mesh: Any
  pipe: pipeline.Pipeline
  num_steps: int
  tx: optax.GradientTransformation
  schedule: Any
  loss_config: losses.LossConfig
  ckpt: orbax.Checkpointer
  lora_model: Any = None  # with LoRA: the base plus fresh adapters
  base: Any = None  # with LoRA: the frozen base weights the step reads, and their shardings
  base_shardings: Any = None


def setup(config, workdir: Path) -> Setup:
  """Checks, mesh, data pipeline, optimizer, loss config, checkpointer, LoRA base."""
  config_build.check_train_config(config)
  sharding.initialize_distributed()
  t = config.train
  mesh = config_build.mesh(config)
  model_config = config_build.resolved_model_config(config)
  sharding.validate(mesh, global_batch_size=t.global_batch, model_config=model_config)
  tokenizer, recipe, refusal = config_build.training_data(config, workdir)
  config_build.check_vocab(tokenizer, model_config.vocab_size, "of the training data")
  pipe = pipeline.Pipeline(recipe, tokenizer, seq_len=t.seq_len, global_batch=t.global_batch,
                           seed=config.seed, refusal_ids=refusal, pack=config.data.pack)
  num_steps = t.num_steps if t.num_steps > 0 else int(t.epochs * pipe.steps_in_epoch(0))
  tx, schedule = config_build.optimizer(config, num_steps)
  ckpt = orbax.Checkpointer(workdir, every_steps=config.ckpt.every_steps,
                            max_to_keep=config.ckpt.max_to_keep or None)
  run = Setup(mesh, pipe, num_steps, tx, schedule, config_build.loss_config(config, refusal),
              ckpt)
  if config.lora.rank:  # the base is rebuilt on resume too: checkpoints hold adapters only
    run.lora_model = lora.attach(config_build.frozen_base_model(config, mesh),
                                 lora.from_config(config.lora), seed=config.seed, mesh=mesh)
    run.base, run.base_shardings = step.frozen_base(run.lora_model, mesh)
  return run


def restore_or_init(config, run: Setup):
  """(graphdef, state, state shardings, first step): the latest checkpoint, else init.hf_path,
  init.orbax_path or a random init."""
  ckpt, mesh = run.ckpt, run.mesh
  if ckpt.latest_step() is not None:
    if run.base is not None:
      config_build.check_same_base(ckpt.restore_config(), config, ckpt.directory)
      model_config = run.lora_model.config
    else:
      model_config = config_build.resolved_model_config(config)
    graphdef, abstract, shardings = step.abstract_state(model_config, run.tx, mesh)
    state, start = ckpt.restore(abstract)
    logging.info("resumed from step %d in %s", start, ckpt.directory)
    return graphdef, state, shardings, start
  model = run.lora_model or config_build.build_model(config, mesh)
  graphdef, state, shardings = step.init_state(model, run.tx, mesh)
  if config.init.orbax_path and run.base is None:
    state["params"] = orbax.load_params(config.init.orbax_path, state["params"])
  return graphdef, state, shardings, 0


class MetricsReader:
  """Brings a step's metrics to the host, adds tokens/s, stops on a non-finite loss, logs."""

  def __init__(self, logger: metrics.MetricsLogger, ckpt: orbax.Checkpointer, *,
               log_every: int, num_steps: int):
    self._logger, self._ckpt = logger, ckpt
    self._log_every, self._num_steps = log_every, num_steps
    self._clock = time.perf_counter()

  def read(self, step_done: int, metrics_dev, tokens: int) -> dict[str, float]:
    values = {k: float(v) for k, v in jax.device_get(metrics_dev).items()}
    now = time.perf_counter()
    values["tokens_per_s"] = tokens / max(now - self._clock, 1e-9)
    self._clock = now
    if not math.isfinite(values["loss"]):
      raise FloatingPointError(
          f"loss is {values['loss']} at step {step_done}; stopped without saving. The last good "
          f"checkpoint is step {self._ckpt.latest_step()} in {self._ckpt.directory}")
    self._logger.log(step_done, values, write=step_done % self._log_every == 0
                     or step_done == self._num_steps)
    return values


def train_steps(config, run: Setup, step_fn, state, start: int, reader: MetricsReader):
  """Steps start..num_steps (or until a stop signal); (state, the last metrics read)."""
  frozen = () if run.base is None else (run.base,)
  pending, last = None, {}
  for i in range(start, run.num_steps):
    local = run.pipe.batch(i)
    tokens = int((local["segment_ids"] > 0).sum()) * jax.process_count()
    state, metrics_dev = step_fn(state, sharding.global_batch(local, run.mesh), *frozen)
    if pending is not None:  # the previous step's metrics, read while this one runs
      last = reader.read(*pending)
    pending = (i + 1, metrics_dev, tokens)
    stop = run.ckpt.should_stop(i + 1)
    if stop or (i + 1) % config.ckpt.every_steps == 0 or i + 1 == run.num_steps:
      last, pending = reader.read(*pending), None  # never save a state whose loss is not finite
      run.ckpt.save(i + 1, state, config=config.to_dict(), force=True)
    if stop:
      logging.warning("stop requested: saved step %d", i + 1)
      break
  if pending is not None:
    last = reader.read(*pending)
  run.ckpt.wait()
  return state, last


def run(config, workdir: Path) -> dict:
  """Train per config; resume from <workdir>/checkpoints; export <workdir>/hf at the end."""
  r = setup(config, workdir)
  graphdef, state, shardings, start = restore_or_init(config, r)
  t = config.train
  step_fn = step.jit_train_step(
      step.make_train_step(graphdef, r.tx, r.schedule, r.loss_config,
                           micro_batches=t.micro_batches),
      shardings, r.mesh, r.base_shardings, t.tpu_compiler_options)
  r.lora_model = None  # its adapters may be the state's buffers, which the step donates
  logger = metrics.MetricsLogger(workdir, total_steps=r.num_steps, start_step=start,
                                 enabled=jax.process_index() == 0)
  r.ckpt.install_signal_handler()
  try:
    state, last = train_steps(config, r, step_fn, state, start, MetricsReader(
        logger, r.ckpt, log_every=t.log_every, num_steps=r.num_steps))
  finally:
    logger.close()
    r.ckpt.close()
  summary = dict(mode="train", steps=int(jax.device_get(state["step"])), num_steps=r.num_steps,
                 **{k: last[k] for k in ("loss", "mle_loss", "rto_loss") if k in last})
  if summary["steps"] == r.num_steps:
    frozen = () if r.base is None else (r.base,)
    summary.update(export.write(nnx.merge(graphdef, state["params"], *frozen), config, workdir))
  return summary
