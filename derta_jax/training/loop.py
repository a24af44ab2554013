"""The training loop: set up from the config, restore or initialise, step, checkpoint, export.

Resumes from <workdir>/checkpoints after checking that the config may continue the stored
one (derta_jax/resume.py). Metrics are read one step late, so the device never waits for
the host, and every step's metrics go through the divergence guard (training/guard.py).
A state is saved only after its own loss and gradients (the next step's, computed by the
check step without updating) passed the guard, so "the last good checkpoint" of a stopped
run is good. <workdir>/hf (and <workdir>/peft with LoRA) is written when the last step is
done and checked.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import optax
from absl import logging
from flax import nnx

from derta_jax import config_build, data_build, losses, resume, sharding
from derta_jax.checkpoints import orbax
from derta_jax.data import pipeline
from derta_jax.losses import objectives
from derta_jax.models import lora
from derta_jax.training import export, guard, metrics, step


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
  guard: guard.Guard
  saved_config: dict  # what every checkpoint stores: the config and the tokenizer record
  cuts: dict  # epoch 0's counts of examples cut to fit train.seq_len
  lora_model: Any = None  # with LoRA: the base plus fresh adapters
  # The frozen weights the step reads (step.make_train_step: "base", "reference",
  # "weighting") and their shardings (None without a mesh).
  frozen: dict = dataclasses.field(default_factory=dict)
  frozen_shardings: dict | None = None

  @property
  def base(self):
    """With LoRA: the frozen base weights."""
    return self.frozen.get("base")

  def add_frozen(self, name: str, placed) -> None:
    weights, shardings = placed
    self.frozen[name] = weights
    if shardings is not None:
      self.frozen_shardings = dict(self.frozen_shardings or {}, **{name: shardings})


def check_truncation(config, pipe: pipeline.Pipeline) -> dict[str, int]:
  """Epoch 0's counts of examples cut to fit train.seq_len; ValueError when more than
  data.max_truncated_fraction of them are."""
  stats = dataclasses.asdict(pipe.epoch(0).stats)
  counts = {k: stats[k] for k in ("examples", "cut", "harmful_prefix_shortened",
                                  "response_truncated", "prompt_truncated")}
  if counts["cut"]:
    logging.warning("data: %d of %d examples are longer than train.seq_len=%d and are cut: "
                    "%s", counts["cut"], counts["examples"], config.train.seq_len, counts)
  if counts["cut"] > config.data.max_truncated_fraction * counts["examples"]:
    raise ValueError(
        f"data: {counts['cut']} of {counts['examples']} examples are longer than "
        f"train.seq_len={config.train.seq_len} and would be cut ({counts}), more than "
        f"data.max_truncated_fraction={config.data.max_truncated_fraction}; raise "
        "train.seq_len, or data.max_truncated_fraction to train on them cut")
  return counts


def _check_resume(config, ckpt: orbax.Checkpointer) -> dict | None:
  """The latest checkpoint's stored config, once checked against `config`; None without one."""
  latest = ckpt.latest_step()
  if latest is None:
    return None
  stored = ckpt.restore_config()
  resume.check_resume(stored, config, where=f"{ckpt.directory / str(latest)}")
  return stored


def _data(config, workdir: Path, stored: dict | None, vocab_size: int):
  """(pipeline, refusal ids, tokenizer record) of the config's data, checked against a
  resumed run's."""
  t = config.train
  tokenizer, recipe, refusal = data_build.training_data(config, workdir)
  data_build.check_vocab(tokenizer, vocab_size, tokenizer.path)
  if stored is not None:
    resume.check_tokenizer(stored, tokenizer, tokenizer.path, where=f"resuming {workdir}")
  pipe = pipeline.Pipeline(recipe, tokenizer, seq_len=t.seq_len, global_batch=t.global_batch,
                           seed=config.seed, refusal_ids=refusal, pack=config.data.pack)
  return pipe, refusal, resume.tokenizer_record(tokenizer, tokenizer.path)


def setup(config, workdir: Path) -> Setup:
  """Checks (config, resume, data), mesh, pipeline, optimizer, loss, checkpointer, LoRA base."""
  config_build.check_train_config(config)
  sharding.initialize_distributed()  # before anything touches a device (the checkpointer does)
  t = config.train
  ckpt = orbax.Checkpointer(workdir, every_steps=config.ckpt.every_steps,
                            max_to_keep=config.ckpt.max_to_keep or None)
  try:
    stored = _check_resume(config, ckpt)  # before anything reads the config's other keys
    model_config = config_build.resolved_model_config(config)
    run_guard = guard.Guard.from_config(t.divergence, model_config.vocab_size)
    mesh = config_build.mesh(config)
    sharding.validate(mesh, global_batch_size=t.global_batch, model_config=model_config)
    pipe, refusal, record = _data(config, workdir, stored, model_config.vocab_size)
    cuts = check_truncation(config, pipe)
    num_steps = t.num_steps if t.num_steps > 0 else int(t.epochs * pipe.steps_in_epoch(0))
    if stored is not None and num_steps < ckpt.latest_step():
      raise ValueError(f"train.num_steps={t.num_steps}, train.epochs={t.epochs}: the run "
                       f"has {num_steps} steps, fewer than the {ckpt.latest_step()} its latest "
                       f"checkpoint in {ckpt.directory} holds; raise them, or use a fresh "
                       "workdir")
  except BaseException:
    ckpt.close()
    raise
  tx, schedule = config_build.optimizer(config, num_steps)
  loss_config = config_build.loss_config(config, refusal, num_steps)
  run = Setup(mesh, pipe, num_steps, tx, schedule, loss_config, ckpt, run_guard,
              dict(config.to_dict(), **{resume.TOKENIZER: record}), cuts)
  if config.lora.rank:  # the base is rebuilt on resume too: checkpoints hold adapters only
    run.lora_model = lora.attach(config_build.frozen_base_model(config, mesh),
                                 lora.from_config(config.lora), seed=config.seed, mesh=mesh)
    run.add_frozen("base", step.frozen_base(run.lora_model, mesh))
  if config.loss.wdoor_path:  # W-DOOR's weighting model, read like the reference
    run.add_frozen("weighting", step.reference_weights(
        config_build.weighting_model(config, mesh), mesh))
  return run


def _initial_model(config, run: Setup):
  """The model at the start of fine-tuning: the LoRA base plus fresh adapters, or init.hf_path,
  or model.preset's random init, with init.orbax_path's params if set."""
  if run.lora_model is not None:
    return run.lora_model
  model = config_build.build_model(config, run.mesh)
  if config.init.orbax_path:
    graphdef, params = nnx.split(model, nnx.Param)
    model = nnx.merge(graphdef, orbax.load_params(config.init.orbax_path, params))
  return model


def _needs_reference(config, run: Setup) -> bool:
  return run.loss_config.objective in objectives.NEEDS_REFERENCE and run.base is None


def restore_or_init(config, run: Setup):
  """(graphdef, state, state shardings, first step): the latest checkpoint, else init.hf_path,
  init.orbax_path or a random init. An objective that reads a reference model without LoRA
  gets the initial params as run.frozen["reference"], rebuilt the same way on resume."""
  ckpt, mesh = run.ckpt, run.mesh
  if ckpt.latest_step() is not None:
    if _needs_reference(config, run):
      run.add_frozen("reference", step.reference_weights(_initial_model(config, run), mesh))
    model_config = (run.lora_model.config if run.base is not None
                    else config_build.resolved_model_config(config))
    graphdef, abstract, shardings = step.abstract_state(model_config, run.tx, mesh)
    state, start = ckpt.restore(abstract)
    logging.info("resumed from step %d in %s", start, ckpt.directory)
    return graphdef, state, shardings, start
  model = _initial_model(config, run)
  if _needs_reference(config, run):  # a copy: the state's params are donated to the step
    run.add_frozen("reference", step.reference_weights(model, mesh))
  graphdef, state, shardings = step.init_state(model, run.tx, mesh)
  return graphdef, state, shardings, 0


def _on_host(metrics_dev) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics_dev).items()}


class MetricsReader:
  """Brings a step's metrics to the host, adds tokens/s, asks the guard, logs; a step the
  guard rejects stops the run (guard.DivergenceError) naming the last good checkpoint."""

  def __init__(self, logger: metrics.MetricsLogger, ckpt: orbax.Checkpointer,
               run_guard: guard.Guard, *, log_every: int, num_steps: int):
    self._logger, self._ckpt, self._guard = logger, ckpt, run_guard
    self._log_every, self._num_steps = log_every, num_steps
    self._clock = time.perf_counter()

  def read(self, step_done: int, metrics_dev, tokens: int, cuts: dict) -> dict[str, float]:
    values = _on_host(metrics_dev)
    now = time.perf_counter()
    values["tokens_per_s"] = tokens / max(now - self._clock, 1e-9)
    self._clock = now
    self._stop_if_bad(step_done, values, "")
    self._guard.record(values)
    self._logger.log(step_done, {**values, **cuts}, write=step_done % self._log_every == 0
                     or step_done == self._num_steps)
    return values

  def check_before_save(self, step_saved: int, metrics_dev) -> None:
    """Stops unless the check step's metrics of the state of `step_saved` pass the guard."""
    values = _on_host(metrics_dev)
    self._stop_if_bad(step_saved + 1, values, f" (the loss of the params of step {step_saved}, "
                      "checked before saving them; not saved)")

  def _stop_if_bad(self, step: int, values: dict, note: str) -> None:
    problem = self._guard.problem(values)
    if problem is None:
      return
    self._ckpt.wait()
    last = self._ckpt.latest_step()
    kept = (f"No checkpoint was saved yet (ckpt.every_steps={self._ckpt.every_steps})"
            if last is None else
            f"The last good checkpoint is step {last} in {self._ckpt.directory}; resume it "
            "with e.g. a lower optim.lr and --config.resume.allow_changes=optim.lr")
    raise guard.DivergenceError(f"{problem} at step {step}{note}; stopped without saving. "
                                f"{kept}")


def train_steps(config, run: Setup, step_fn, check_fn, state, start: int,
                reader: MetricsReader):
  """Steps start..num_steps (or until a stop signal); (state, the last metrics read)."""
  frozen = (run.frozen,) if run.frozen else ()
  pending, last, ahead = None, {}, None
  for i in range(start, run.num_steps):
    local = run.pipe.batch(i) if ahead is None else ahead  # the check's batch is this one
    ahead = None
    tokens = int((local["segment_ids"] > 0).sum()) * jax.process_count()
    state, metrics_dev = step_fn(state, sharding.global_batch(local, run.mesh), *frozen)
    if pending is not None:  # the previous step's metrics, read while this one runs
      last = reader.read(*pending)
    pending = (i + 1, metrics_dev, tokens, run.pipe.cuts_at(i))
    stop = run.ckpt.should_stop(i + 1)
    if stop or (i + 1) % config.ckpt.every_steps == 0 or i + 1 == run.num_steps:
      last, pending = reader.read(*pending), None
      # The state's own loss is the next step's: checked on that batch before it is saved.
      ahead = run.pipe.batch(i + 1)
      reader.check_before_save(i + 1, check_fn(state, sharding.global_batch(ahead, run.mesh),
                                               *frozen))
      run.ckpt.save(i + 1, state, config=run.saved_config, force=True)
    if stop:
      logging.warning("stop requested: saved step %d", i + 1)
      break
  if pending is not None:
    last = reader.read(*pending)
  run.ckpt.wait()
  return state, last


def _step_fns(config, r: Setup, graphdef, shardings):
  """(train step, check step), jitted."""
  t = config.train
  fns = (step.make_train_step(graphdef, r.tx, r.schedule, r.loss_config,
                              micro_batches=t.micro_batches),
         step.make_check_step(graphdef, r.schedule, r.loss_config,
                              micro_batches=t.micro_batches))
  return tuple(step.jit_train_step(fn, shardings, r.mesh, r.frozen_shardings,
                                   t.tpu_compiler_options, check=check)
               for fn, check in zip(fns, (False, True), strict=True))


def run(config, workdir: Path) -> dict:
  """Train per config; resume from <workdir>/checkpoints; export <workdir>/hf at the end."""
  r = setup(config, workdir)
  try:
    graphdef, state, shardings, start = restore_or_init(config, r)
    step_fn, check_fn = _step_fns(config, r, graphdef, shardings)
    r.lora_model = None  # its adapters may be the state's buffers, which the step donates
    logger = metrics.MetricsLogger(workdir, total_steps=r.num_steps, start_step=start,
                                   enabled=jax.process_index() == 0)
    r.ckpt.install_signal_handler()
    try:
      state, last = train_steps(config, r, step_fn, check_fn, state, start, MetricsReader(
          logger, r.ckpt, r.guard, log_every=config.train.log_every, num_steps=r.num_steps))
    finally:
      logger.close()
  finally:
    r.ckpt.close()
  summary = dict(mode="train", steps=int(jax.device_get(state["step"])), num_steps=r.num_steps,
                 **{k: last[k] for k in ("loss", "mle_loss", "rto_loss") if k in last},
                 resumed_from=start, data=r.cuts)
  if summary["steps"] == r.num_steps:
    frozen = () if r.base is None else (r.base,)
    summary.update(export.write(nnx.merge(graphdef, state["params"], *frozen), config, workdir,
                                r.pipe.tokenizer))
  return summary
