"""run.py's toyworld mode: the paper's central comparison, end to end, on the toy world.

  <workdir>/world/          the world's files and tokenizer (world.write_world)
  <workdir>/base/           a "base" model pre-trained to comply with every request
  <workdir>/recipes/<name>/ each recipe fine-tuned from the base with the same budget, and
                            its evaluations: harmful/eval, benign/eval, second_attack/eval
  <workdir>/report.{md,json} and plots (report.write_report)

Every training is `training.loop.run` on a derived config (so checkpoints, resume and export are
the normal ones: a finished run is reused, an interrupted one resumes); every evaluation is
`evaluate.evaluate` on the held-out pairs. Recipes differ only in their data (data.recipe
and its part counts): same base, steps, lr and seed. Compiled programs are cached in
<workdir>/xla_cache unless a JAX compilation cache is already set.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from derta_jax import config_build, data, data_build
from derta_jax.checkpoints import hf
from derta_jax.data import recipes
from derta_jax.evaluation import evaluate
from derta_jax.evaluation import settings as eval_settings
from derta_jax.toyworld import report, world
from derta_jax.training import loop

# Config sections whose change makes an existing run in the workdir another experiment.
_TRAINING_KEYS = ("seed", "model", "init", "data", "loss", "train", "optim", "lora")


def section_problems(config, section: str, counts) -> tuple[list[str], list[str]]:
  """(recipe names of config.<section>.recipes, problems with them and with the `counts`
  keys, each of which must be an int >= 1)."""
  c = config[section]
  names = [n.strip() for n in c.recipes.split(",") if n.strip()]
  problems = []
  unknown = sorted(set(names) - set(recipes.RECIPES))
  if not names or unknown or len(set(names)) != len(names):
    problems.append(f"{section}.recipes={c.recipes!r}: give distinct names of "
                    f"{sorted(recipes.RECIPES)}")
  for key in counts:
    if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
      problems.append(f"{section}.{key}={c[key]!r} must be an int >= 1")
  return names, problems


def check_config(config) -> list[str]:
  """The recipe names; one ValueError names every bad toyworld.<key> and eval.<key>."""
  w = config.toyworld
  names, problems = section_problems(config, "toyworld", (
      "base_steps", "steps", "n_safety", "global_batch", "seq_len", "eval_benign",
      "cb_lora_rank"))
  for key in ("base_lr", "lr", "cb_lr"):
    if not w[key] > 0:
      problems.append(f"toyworld.{key}={w[key]!r} must be > 0")
  if not 0.0 <= w.wrapped_helpful <= 1.0:
    problems.append(f"toyworld.wrapped_helpful={w.wrapped_helpful!r} must be in [0, 1]")
  try:
    settings = eval_settings.from_config(config)
    if 0 not in settings.prefill_ks:
      problems.append(f"eval.prefill_ks={config.eval.prefill_ks!r} must include 0: "
                      "helpfulness is the benign response with nothing prefilled")
  except ValueError as err:
    problems.append(str(err))
  if config.lora.rank:
    problems.append(f"lora.rank={config.lora.rank}: the toy world fine-tunes every weight "
                    "(circuit breakers: toyworld.cb_lora_rank); set lora.rank=0")
  if problems:
    raise ValueError("; ".join(problems))
  return names


def derived(config, **values):
  """A copy of config with "section.key" values replaced, in mode train."""
  sub = config.copy_and_resolve_references()
  sub.mode = "train"
  for key, value in values.items():
    node = sub
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return sub


def base_config(config, files: world.Files):
  """Pre-training on the base corpus alone: recipe vanilla with no safety examples."""
  w = config.toyworld
  return derived(config, **{
      "data.source": "recipe", "data.recipe": "vanilla", "data.n_vanilla": 0,
      "data.helpful_path": str(files.base), "data.triples_path": str(files.triples),
      "data.tokenizer_path": str(files.tokenizer), "init.hf_path": "", "init.orbax_path": "",
      "train.num_steps": w.base_steps, "train.global_batch": w.global_batch,
      "train.seq_len": w.seq_len, "optim.lr": w.base_lr})


def part_counts(name: str, n_safety: int) -> dict[str, int]:
  """"data.n_<part>" of recipe `name` with n_safety questions where the paper has 6,000."""
  parts = dict(recipes.RECIPES[name])
  return {f"data.n_{p}": round(parts.get(p, 0) * n_safety / 6000) for p in recipes.PARTS}


def rival_overrides(config, name: str, section: str) -> dict:
  """What a recipe's training changes besides its data: circuit breakers train LoRA
  adapters (<section>.cb_lora_rank) at <section>.cb_lr (their reference is the base with
  the adapters off); the other recipes fine-tune every weight."""
  if name != "circuit_breaker":
    return {}
  c = config[section]
  return {"lora.rank": c.cb_lora_rank, "lora.alpha": float(c.cb_lora_rank), "optim.lr": c.cb_lr}


def recipe_config(config, files: world.Files, name: str, base_hf: Path):
  """Fine-tuning from the base: the helpful data plus toyworld.n_safety safety examples,
  split into the recipe's parts in the paper's proportions (of 6,000)."""
  w = config.toyworld
  return derived(config, **{
      "data.source": "recipe", "data.recipe": name, **part_counts(name, w.n_safety),
      "data.helpful_path": str(files.helpful), "data.triples_path": str(files.triples),
      "data.tokenizer_path": str(files.tokenizer), "init.hf_path": str(base_hf),
      "init.orbax_path": "", "train.num_steps": w.steps, "train.global_batch": w.global_batch,
      "train.seq_len": w.seq_len, "optim.lr": w.lr,
      **rival_overrides(config, name, "toyworld")})


def check_not_stale(sub, workdir: Path) -> None:
  """An existing run in `workdir` must have been trained with this config's settings."""
  stored = config_build.stored_config(workdir)
  if stored is not None:
    config_build.check_same_settings(stored, sub.to_dict(), _TRAINING_KEYS,
                                     where=f"{workdir} holds a run trained with other settings")


def train_once(sub, workdir: Path) -> dict:
  """loop.run, which resumes a run or only re-exports a finished one; seconds it took."""
  check_not_stale(sub, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  summary = loop.run(sub, workdir)
  return dict(summary, seconds=round(time.perf_counter() - start, 1))


def evaluate_recipe(model, tokenizer, files: world.Files, config, workdir: Path,
                    refusal: tuple[int, ...]) -> dict:
  """The report's metrics of one model, from three evaluate calls on held-out pairs."""
  settings = eval_settings.from_config(config, seed=config.seed)
  common = dict(dataclasses.asdict(settings), judge=config.eval.judge, refusal_ids=refusal)
  start = time.perf_counter()
  harmful = evaluate.evaluate(model, tokenizer, workdir=workdir / "harmful", suites=dict(
      harmful=files.harmful, refusal_position=files.harmful, prefilling=files.harmful_triples,
      refusal_probe=files.harmful_triples), **common)
  benign = evaluate.evaluate(model, tokenizer, workdir=workdir / "benign",
                             suites=dict(prefilling=files.benign_triples), **common)
  second = evaluate.evaluate(model, tokenizer, workdir=workdir / "second_attack",
                             suites=dict(harmful=files.wrapped), **common)
  metrics = report.recipe_metrics(
      tokenizer, files, harmful=harmful, benign=benign, second=second)
  metrics["eval_seconds"] = round(time.perf_counter() - start, 1)
  return metrics


def trained_and_evaluated(config, sub, sub_dir: Path, tokenizer, files: world.Files,
                          refusal: tuple[int, ...]) -> dict:
  """Train (or reuse) one model of the comparison, then evaluate it."""
  if jax.process_index() == 0:  # the progress bars do not say which model they train
    print(f"toyworld: {sub_dir.name}: {sub.train.num_steps} training steps, then "
          "evaluation", file=sys.stderr, flush=True)
  trained = train_once(sub, sub_dir)
  model = hf.load_hf(sub_dir / "hf", dtype=jnp.dtype(config.model.param_dtype),
                     compute_dtype=jnp.dtype(config.model.dtype))
  metrics = evaluate_recipe(model, tokenizer, files, config, sub_dir, refusal)
  return dict(metrics, steps=trained["steps"], final_loss=trained.get("loss"),
              train_seconds=trained["seconds"])


def run(config, workdir: Path) -> dict:
  """Base, recipes, evaluation, report; prints the table, where the report is and one
  summary line (the full figures are in report.json); returns the summary."""
  names = check_config(config)
  start = time.perf_counter()
  if not jax.config.jax_compilation_cache_dir:
    # The recipes' train steps are one program: compiled once, then read back (on a re-run,
    # every program is).
    jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
  w = config.toyworld
  files = world.write_world(workdir / "world", seed=config.seed,
                            heldout_per_verb=w.heldout_per_verb,
                            wrapped_helpful=w.wrapped_helpful, eval_benign=w.eval_benign)
  tokenizer = data.load_tokenizer(files.tokenizer)
  refusal = data_build.refusal_ids(config, tokenizer)
  common = dict(tokenizer=tokenizer, files=files, refusal=refusal)
  base_dir = workdir / "base"
  base = trained_and_evaluated(config, base_config(config, files), base_dir, **common)
  results = {name: trained_and_evaluated(
      config, recipe_config(config, files, name, base_dir / "hf"),
      workdir / "recipes" / name, **common) for name in names}
  summary = dict(mode="toyworld", workdir=str(workdir), base=base, recipes=results,
                 seconds=round(time.perf_counter() - start, 1))
  table = report.write_report(workdir, summary, config)
  if jax.process_index() == 0:
    print(table)
    print(f"\nReport: {workdir / 'report.md'} (figures: report.json; plots: "
          f"{', '.join(report.PLOTS)}, all in {workdir})")
    print(f"toyworld: base + {len(names)} recipes ({', '.join(names)}) trained and evaluated "
          f"in {summary['seconds']:.0f} s")
  return summary
