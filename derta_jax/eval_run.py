"""run.py's eval mode: the model and tokenizer a config names, then `evaluate.run_suites`.

Model, the first that exists: the latest Orbax checkpoint in <workdir>/checkpoints,
init.orbax_path, init.hf_path, and for the toy (data.source "synthetic") a random init of
model.preset. Tokenizer: the one training used (as train.build_data picks it:
data.tokenizer_path, the synthetic one in <workdir>/tokenizer when data.source is
"synthetic", else init.hf_path), except that a model read from init.hf_path itself comes
with that directory's tokenizer unless data.tokenizer_path is set.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from etils import epath
from flax import nnx

from derta_jax import data, evaluate, lora_train, train
from derta_jax import main as derta_main
from derta_jax.checkpoints import orbax
from derta_jax.data import synthetic
from derta_jax.models import llama


def check_config(config, workdir: Path) -> tuple[evaluate.Settings, dict[str, str]]:
  """(settings, {suite: file}) from config.eval; ValueError names every bad eval.<key>."""
  e = config.get("eval")
  if e is None:
    raise ValueError("the config has no `eval` section; see configs/toy_cpu.py for its keys")
  defaults = evaluate.Settings()
  values = {f.name: e.get(f.name, getattr(defaults, f.name))
            for f in dataclasses.fields(evaluate.Settings)}
  problems = []
  try:
    settings = evaluate.check_settings(values, e.get("judge", "strict"), prefix="eval.")
  except ValueError as err:
    problems.append(str(err))
  paths = {name: e.get(f"{name}_path", "") for name in evaluate.SUITES}
  paths = {name: p for name, p in paths.items() if p}
  if not paths:
    problems.append("no eval file is set: give one or more of " + ", ".join(
        f"eval.{name}_path" for name in evaluate.SUITES))
  problems += [f"eval.{name}_path={p!r}: no such file" for name, p in paths.items()
               if not epath.Path(p).is_file()]
  if problems:
    raise ValueError("; ".join(problems))
  if not settings.generator:
    settings = dataclasses.replace(settings, generator=f"derta_jax:{workdir.name}")
  return settings, paths


def latest_checkpoint(workdir: Path) -> Path | None:
  """<workdir>/checkpoints/<latest step>, or None."""
  if not (workdir / "checkpoints").is_dir():  # a Checkpointer would create the directory
    return None
  with orbax.Checkpointer(workdir, every_steps=1) as ckpt:
    step = ckpt.latest_step()
  return None if step is None else workdir / "checkpoints" / str(step)


def model_source(config, workdir: Path) -> tuple[str, str]:
  """(kind, path) of the model to evaluate: kind is orbax, hf or random."""
  latest = latest_checkpoint(workdir)
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


def tokenizer_path(config, workdir: Path, kind: str) -> str:
  d = config.data
  if d.tokenizer_path:
    return d.tokenizer_path
  if kind == "hf":
    return config.init.hf_path
  if d.source == "synthetic":
    return synthetic.write_tokenizer(workdir / "tokenizer")
  if config.init.hf_path:
    return config.init.hf_path
  raise ValueError("data.tokenizer_path and init.hf_path are unset: no tokenizer to evaluate "
                   "with")


def load_orbax(config, path: str, mesh) -> llama.Llama:
  """The model of model.preset (or init.hf_path's architecture) with params from `path`,
  cast to model.param_dtype and placed by the params' logical axes on the mesh; for a LoRA
  run (lora.rank > 0) the base the config names plus the adapters in `path`."""
  if config.lora.rank > 0:
    return lora_train.adapted_model(config, path, mesh)
  graphdef, params = nnx.split(llama.abstract_model(derta_main.resolved_model_config(config)),
                               nnx.Param)
  shardings = train.param_shardings(params, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params, shardings)
  return nnx.merge(graphdef, orbax.load_params(path, abstract))


def run(config, workdir: Path) -> dict:
  """Evaluate per config.eval; outputs in <workdir>/eval/."""
  settings, paths = check_config(config, workdir)
  loaded = evaluate.load_suites(paths, limit=settings.limit)
  kind, path = model_source(config, workdir)
  tok_path = tokenizer_path(config, workdir, kind)
  tokenizer = data.load_tokenizer(tok_path)
  vocab = derta_main.resolved_model_config(config).vocab_size
  if tokenizer.vocab_size > vocab:
    raise ValueError(f"the tokenizer {tok_path} has {tokenizer.vocab_size} tokens, more than "
                     f"the model's vocab_size {vocab}")
  refusal = (tuple(config.loss.refusal_ids) or
             data.refusal_ids(tokenizer, config.data.refusal_text,
                              policy=config.data.refusal_policy))
  mesh = derta_main.config_mesh(config)
  model = load_orbax(config, path, mesh) if kind == "orbax" else derta_main.build_model(config,
                                                                                      mesh)
  return evaluate.run_suites(model, tokenizer, loaded, paths=paths, workdir=workdir,
                             settings=settings, judge=config.eval.judge, refusal_ids=refusal,
                             metadata=dict(model=f"{kind}: {path}", tokenizer=str(tok_path)))
