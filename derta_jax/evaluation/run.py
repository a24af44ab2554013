"""run.py's eval mode: the model and tokenizer a config names, then `evaluate.run_suites`.

Model, the first that exists: the latest Orbax checkpoint in <workdir>/checkpoints,
init.orbax_path, init.hf_path, and for the toy (data.source "synthetic") a random init of
model.preset. A train checkpoint stores its run's config: its model, init, data, loss and
lora sections and seed replace the eval config's (TRAINED_KEYS), so the model is rebuilt as
trained, prompts use its template (eval.template "") and text goes through its tokenizer;
data.tokenizer_path, when set, still wins (a moved copy), and a tokenizer whose vocabulary
is not the checkpoint's is refused. A model read from init.hf_path itself comes with that
directory's tokenizer unless data.tokenizer_path is set.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections
from etils import epath

from derta_jax import config_build, data, data_build, resume
from derta_jax.evaluation import evaluate, settings

# What a train checkpoint's stored config decides for its evaluation.
TRAINED_KEYS = ("model", "init", "data", "loss", "lora", "seed")


def check_config(config, workdir: Path) -> tuple[settings.Settings, dict[str, str]]:
  """(settings, {suite: file}) from config.eval; ValueError names every bad eval.<key>."""
  problems = []
  try:
    checked = settings.from_config(config)
  except ValueError as err:
    if config.get("eval") is None:
      raise
    problems.append(str(err))
  e = config.eval
  try:
    paths = settings.preset_paths(e.get("preset", ""), e.get("upstream_dir", ""))
  except ValueError as err:
    problems.append(str(err))
    paths = {}
  paths |= {name: e.get(f"{name}_path", "") for name in evaluate.SUITES
            if e.get(f"{name}_path", "")}
  if not paths and not problems:
    problems.append("no eval file is set: give eval.preset='paper' with eval.upstream_dir, or "
                    "one or more of " + ", ".join(f"eval.{name}_path"
                                                  for name in evaluate.SUITES))
  problems += [f"eval.{name}_path={p!r}: no such file" for name, p in paths.items()
               if not epath.Path(p).is_file()]
  if problems:
    raise ValueError("; ".join(problems))
  if not checked.generator:
    checked = dataclasses.replace(checked, generator=f"derta_jax:{workdir.name}")
  return checked, paths


def model_source(config, workdir: Path) -> tuple[str, str]:
  """(kind, path) of the model to evaluate: kind is orbax, hf or random."""
  latest = config_build.latest_checkpoint(workdir)
  if latest is not None:
    return "orbax", str(latest)
  if config.init.orbax_path:
    return "orbax", config.init.orbax_path
  if config.init.hf_path:
    return "hf", config.init.hf_path
  if config.data.source == "synthetic":
    return "random", f"preset {config.model.preset!r}, seed {config.seed}"
  raise ValueError(f"nothing to evaluate: no checkpoint in {workdir / 'checkpoints'}, and "
                   "init.orbax_path and init.hf_path are unset (a random init is evaluated "
                   "only for the toy, data.source='synthetic')")


def as_trained(config, stored: dict):
  """`config` with the TRAINED_KEYS of a checkpoint's stored config (data.tokenizer_path
  stays the eval config's when set)."""
  view = config.copy_and_resolve_references()
  for key in TRAINED_KEYS:
    if key in stored:
      value = stored[key]
      view[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  if config.data.tokenizer_path:
    view.data.tokenizer_path = config.data.tokenizer_path
  return view


def _tokenizer(config, workdir: Path, kind: str, stored: dict | None):
  """(tokenizer, path) of the model to evaluate, checked against the checkpoint's record."""
  tok_path = data_build.tokenizer_path(config, workdir, model_from_hf=kind == "hf")
  try:
    tokenizer = data.load_tokenizer(tok_path)
  except data.DataError as e:
    if stored is None:
      raise
    raise data.DataError(f"{e}; the checkpoint was trained with this tokenizer: point "
                         "--config.data.tokenizer_path at a copy of it") from None
  if stored is not None:
    resume.check_tokenizer(stored, tokenizer, tok_path, where="eval")
  return tokenizer, tok_path


def run(config, workdir: Path) -> dict:
  """Evaluate per config.eval; outputs in <workdir>/eval/."""
  kind, path = model_source(config, workdir)
  stored = config_build.checkpoint_config(path) if kind == "orbax" else None
  if stored is not None:
    config = as_trained(config, stored)
  checked, paths = check_config(config, workdir)
  loaded = evaluate.load_suites(paths, limit=checked.limit)
  tokenizer, tok_path = _tokenizer(config, workdir, kind, stored)
  data_build.check_vocab(tokenizer, config_build.resolved_model_config(config).vocab_size,
                           tok_path)
  refusal = data_build.refusal_ids(config, tokenizer)
  mesh = config_build.mesh(config)
  model = (config_build.checkpoint_model(config, path, mesh) if kind == "orbax"
           else config_build.build_model(config, mesh))
  return evaluate.run_suites(model, tokenizer, loaded, paths=paths, workdir=workdir,
                             settings=checked, judge=config.eval.judge, refusal_ids=refusal,
                             metadata=dict(model=f"{kind}: {path}", tokenizer=str(tok_path),
                                           template=checked.template))
