"""What `run.py` calls: dispatch on `config.mode`. Nothing imports this module."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging

from derta_jax import lock
from derta_jax.evaluation import run as eval_run
from derta_jax.realmodel import run as realmodel_run
from derta_jax.toyworld import run as toyworld_run
from derta_jax.training import compile as aot
from derta_jax.training import export, loop

MODES = {
    "train": loop.run,  # train per config, resume, export <workdir>/hf
    "export": export.run,  # write the config's model to <workdir>/hf and check the reload
    "compile": aot.compile_report,  # ahead-of-time compile for compile.topology: fit, cost
    "eval": eval_run.run,  # the suites of config.eval on the workdir's latest checkpoint
    "toyworld": toyworld_run.run,  # the toy world: base, recipes, evaluation, report
    "realmodel": realmodel_run.run,  # the same comparison on a real GGUF chat model
}


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Run config.mode in workdir; print its summary (the toy world: its table and files).

  The run holds the workdir's lock (eval its own, so a workdir can be evaluated while it
  trains); a second run of the kind fails at once naming the first.
  """
  if config.mode not in MODES:
    raise ValueError(f"config.mode={config.mode!r}; choose one of {tuple(MODES)}")
  name = ".eval.lock" if config.mode == "eval" else lock.LOCK_NAME
  held = lock.WorkdirLock(workdir, mode=config.mode, enabled=jax.process_index() == 0,
                          name=name)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  logging.info("mode=%s workdir=%s devices=%s", config.mode, workdir, jax.devices())
  with held:
    summary = MODES[config.mode](config, workdir)
  if jax.process_index() == 0 and config.mode not in ("toyworld", "realmodel"):  # own tables
    print(json.dumps(summary, default=lambda x: np.asarray(x).tolist()))
  if config.mode == "compile" and not summary["fits"]:
    raise SystemExit(f"does not fit: {summary['total_bytes']} bytes per device > "
                     f"{summary['hbm_bytes']} of HBM on {summary['topology']}")
  return summary
