"""Train-state checkpoints with Orbax: `<workdir>/checkpoints/<step>/{state,config}`.

A checkpoint is complete or absent: Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames
it, and tmp directories left by a killed run are never listed as steps. Saves are async:
`save` returns once the arrays are copied off the devices, so the caller may donate them.

Usage in a training loop (SIGTERM / preemption saves the current step, then stops):

  with Checkpointer(workdir, every_steps=1000) as ckpt:
    ckpt.install_signal_handler()
    ...
    stop = ckpt.should_stop(step)
    ckpt.save(step, state, config=config.to_dict())
    if stop:
      break
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import flags, logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from derta_jax.checkpoints import finite

STATE, CONFIG = "state", "config"
_METADATA_FILE = "_METADATA"  # Orbax writes it into every finished pytree item directory
_BARRIER_FLAG = "experimental_orbax_use_distributed_barrier"


def _coordination_service_barriers() -> None:
  """Orbax's barriers wait on JAX's coordination service (with a timeout) instead of a psum
  over every device. Orbax warns that its psum barrier must not run concurrently with other
  collectives: with saves overlapping the train step's collectives it can interleave
  differently on two hosts and hang both."""
  if not flags.FLAGS.is_parsed():  # run.py parses them; a library caller may not have
    flags.FLAGS.mark_as_parsed()
  flags.FLAGS[_BARRIER_FLAG].value = True


class Checkpointer:
  """Saves every `every_steps` steps, keeps the newest `max_to_keep`, restores onto any mesh."""

  def __init__(self, workdir: str | os.PathLike, *, every_steps: int,
               max_to_keep: int | None = None, async_save: bool = True):
    if not isinstance(every_steps, int) or every_steps < 1:
      raise ValueError(f"Checkpointer: every_steps={every_steps!r} must be a positive int")
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f"Checkpointer: max_to_keep={max_to_keep!r} must be a positive int or "
                       "None (keep all)")
    self.directory = _absolute(workdir) / "checkpoints"
    self.every_steps = every_steps
    if jax.process_count() > 1:
      _coordination_service_barriers()
    options = ocp.CheckpointManagerOptions(
        # No InitialSavePolicy: the first save follows the interval like every other.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(every_steps),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(max_to_keep),
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       CONFIG: ocp.JsonCheckpointHandler()})
    self._stop_requested = False
    self._previous_handler = None
    self._handler_installed = False
    self._closed = False

  def save(self, step: int, state: Any, *, config: Mapping[str, Any],
           force: bool = False) -> bool:
    """Saves when `step % every_steps == 0`, `force`, or a SIGTERM / preemption was seen.

    Returns whether a checkpoint was written; an existing step is never overwritten.
    """
    try:
      json.dumps(config)
    except (TypeError, ValueError) as e:
      raise ValueError(f"Checkpointer.save: config is not JSON-serialisable ({e}); pass a "
                       "plain dict such as ml_collections' config.to_dict()") from None
    if step in self._manager.all_steps():
      return False
    if self._stop_requested and not force and step % self.every_steps:
      logging.info("Checkpointer: saving step %d off-interval after a stop request", step)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 CONFIG: ocp.args.JsonSave(dict(config))})
    return self._manager.save(step, args=args, force=force or self._stop_requested)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, abstract_state: Any, *, step: int | None = None) -> tuple[Any, int]:
    """(state, step) of `step` (default: the latest), placed on `abstract_state`'s shardings.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (or arrays) of the saved
    structure; leaves without a sharding go to the first local device, and a dtype that
    differs from the stored one casts. A float leaf holding NaN or Inf raises ValueError.
    """
    step = self._existing_step(step)
    abstract = _with_shardings(abstract_state)
    item_dir = self.directory / str(step) / STATE
    _check_tree(item_dir, abstract, self._manager.item_metadata(step)[STATE].tree)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract)})
    try:
      restored = self._manager.restore(step, args=args)
    except ValueError as e:
      raise ValueError(f"{item_dir}: restore failed: {e}") from e
    _check_finite(item_dir, restored[STATE])
    return restored[STATE], step

  def restore_config(self, step: int | None = None) -> dict:
    step = self._existing_step(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{CONFIG: ocp.args.JsonRestore()}))
    return restored[CONFIG]

  def _existing_step(self, step: int | None) -> int:
    self.wait()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available steps: {steps}")
    return step

  def install_signal_handler(self) -> None:
    """On SIGTERM, request a stop: `should_stop()` turns True and the next `save()` saves.

    Multi-process runs leave SIGTERM to JAX's preemption service, which agrees on one step
    for all hosts (see `should_stop`); a per-host flag would make hosts disagree on whether
    to join the collective save, and hang.
    """
    if jax.process_count() > 1:
      logging.info("Checkpointer: %d processes; SIGTERM is left to JAX's preemption sync",
                    jax.process_count())
      return
    if not self._handler_installed:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._handler_installed = True

  def _on_sigterm(self, signum, frame):
    del signum, frame
    # Only set a flag: a signal handler runs between bytecodes, where I/O could deadlock.
    self._stop_requested = True

  def should_stop(self, step: int | None = None) -> bool:
    """True once SIGTERM arrived, or all hosts reached JAX's preemption sync point at `step`.

    Multi-process runs must call this at every step with the same `step` on every host.
    """
    if not self._stop_requested and step is not None and jax.process_count() > 1:
      try:
        self._stop_requested = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax_enable_preemption_service is off: no preemption notices
        pass
    return self._stop_requested

  def wait(self) -> None:
    """Blocks until in-flight async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and restores the previous SIGTERM handler."""
    if self._closed:
      return
    self._closed = True
    try:
      self._manager.close()
    finally:
      if self._handler_installed:
        # None means the old handler was not set from Python; the default is all we can restore.
        previous = self._previous_handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        self._handler_installed = False

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def load_params(path: str | os.PathLike, abstract_params: Any) -> Any:
  """Params from an Orbax directory, placed on `abstract_params`' shardings.

  `path` is a Checkpointer step directory (`<workdir>/checkpoints/<step>`) or a directory
  holding a StandardSave of a pytree. When the stored tree has a top-level "params" entry
  (a train state) and `abstract_params` does not, only that subtree is read. A leaf
  holding NaN or Inf raises ValueError.
  """
  directory = _absolute(path)
  if not directory.exists():
    raise FileNotFoundError(f"load_params: {directory} does not exist")
  if not directory.is_dir():
    raise NotADirectoryError(f"load_params: {directory} is a file; pass an Orbax checkpoint "
                             "directory")
  if (directory / STATE / _METADATA_FILE).exists():
    item_dir = directory / STATE
  elif (directory / _METADATA_FILE).exists():
    item_dir = directory
  else:
    found = sorted(p.name for p in directory.iterdir())[:10]
    raise ValueError(f"load_params: {directory} holds no Orbax checkpoint (found {found}); pass "
                     "a step directory <workdir>/checkpoints/<step> or a directory written by "
                     "orbax StandardSave")
  abstract = _with_shardings(abstract_params)
  stored = _stored_tree(item_dir)
  subtree = (isinstance(stored, Mapping) and "params" in stored
             and not (isinstance(abstract, Mapping) and "params" in abstract))
  _check_tree(item_dir, abstract, stored["params"] if subtree else stored,
              prefix="params/" if subtree else "")
  item = {"params": abstract} if subtree else abstract
  args = ocp.args.PyTreeRestore(item=item,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                partial_restore=subtree)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    try:
      restored = checkpointer.restore(item_dir, args=args)
    except ValueError as e:
      raise ValueError(f"{item_dir}: restore failed: {e}") from e
  _check_finite(item_dir, restored)
  return restored["params"] if subtree else restored


def _with_shardings(tree: Any) -> Any:
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or default)

  return jax.tree.map(leaf, tree)


def _stored_tree(item_dir: epath.Path) -> Any:
  """The saved pytree's structure with array metadata (shape, dtype) as leaves."""
  # The handler, unlike ocp.Checkpointer, does not expect step-level metadata in `item_dir`.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(item_dir).tree
  finally:
    handler.close()


def _absolute(path: str | os.PathLike) -> epath.Path:
  # epath keeps gs:// and other remote paths intact; only local relative paths change.
  path = epath.Path(path)
  return path if path.is_absolute() else path.absolute()


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
  # Orbax stores attribute and sequence keys (nnx Variables' `.value`, optax NamedTuples)
  # as dict keys, so paths compare by name alone.
  return {prefix + "/".join(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
  return {k: tuple(getattr(leaf, "shape", ())) for k, leaf in _leaves(tree, prefix).items()}


def _check_finite(item_dir: epath.Path, restored: Any) -> None:
  """Raises ValueError naming every restored float leaf that holds NaN or Inf."""
  bad = finite.nonfinite_leaves(_leaves(restored))
  if bad:
    raise ValueError(f"{item_dir}: {finite.describe(bad)}; the run had likely diverged "
                     "before this save: use an earlier step")


def _check_tree(item_dir: epath.Path, abstract: Any, stored: Any, prefix: str = "") -> None:
  """Raises ValueError naming every key and shape where `abstract` differs from `stored`."""
  want, have = _shapes(abstract, prefix), _shapes(stored, prefix)
  problems = []
  missing = sorted(want.keys() - have.keys())
  if missing:
    problems.append(f"{len(missing)} key(s) requested but not in the checkpoint: "
                    + ", ".join(f"{k} {want[k]}" for k in missing[:8]))
  extra = sorted(have.keys() - want.keys())
  if extra:
    problems.append(f"{len(extra)} key(s) in the checkpoint but not requested: "
                    + ", ".join(f"{k} {have[k]}" for k in extra[:8]))
  shapes = [k for k in sorted(want.keys() & have.keys()) if want[k] != have[k]]
  if shapes:
    problems.append(f"{len(shapes)} shape mismatch(es): " + ", ".join(
        f"{k} stored {have[k]} requested {want[k]}" for k in shapes[:8]))
  if problems:
    raise ValueError(f"{item_dir}: the abstract tree does not match the checkpoint; "
                     + "; ".join(problems))
