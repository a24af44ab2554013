"""What every evaluation suite shares (`Settings`), built and checked from plain values or
from a config's `eval` section before anything loads or runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from etils import epath

from derta_jax.data import templates
from derta_jax.evaluation import judges

PREFILL_KS = (0, 3, 5, 10, 20, 40)
# eval.preset "paper": suite -> the authors' file under <eval.upstream_dir>/data/test/.
PAPER_FILES = {
    "codeattack": "safety_codeattack.json", "jailbreakchat": "safety_jailbreakchat.json",
    "selfcipher": "safety_selfcipher.json", "completion_attack": "safety_completionattack.json",
    "illegal_instructions": "safety_illegal_instructions_200.json",
    "gsm8k": "helpfulness_gsm8k_500.json", "mmlu": "helpfulness_mmlu_500.json",
    "alpaca": "helpfulness_alpaca_eval_300.json",
}
PRESETS = ("", "paper")


def over_refusal_file() -> Path:
  """The shipped over-refusal set (XSTest's ten types and unsafe contrasts, our own prompts)."""
  return Path(__file__).parent / "data" / "over_refusal.jsonl"


def preset_paths(preset: str, upstream_dir: str) -> dict[str, str]:
  """{suite: file} of an eval preset; ValueError names eval.preset / eval.upstream_dir."""
  if preset not in PRESETS:
    raise ValueError(f"eval.preset={preset!r}: choose one of {list(PRESETS)}")
  if not preset:
    return {}
  if not upstream_dir:
    raise ValueError("eval.preset='paper' reads the authors' files: set eval.upstream_dir to "
                     "a clone of their repository (RobustNLP/DeRTa)")
  test = epath.Path(upstream_dir) / "data" / "test"
  paths = {name: str(test / file) for name, file in PAPER_FILES.items()}
  missing = [p for p in paths.values() if not epath.Path(p).is_file()]
  if missing:
    raise ValueError(f"eval.upstream_dir={upstream_dir!r}: eval.preset='paper' needs "
                     f"{', '.join(missing)}: no such file")
  return dict(paths, over_refusal=str(over_refusal_file()))
# The generation form of a training template, where the authors' differs (eval.template "").
EVAL_FORM = {"upstream": "upstream_eval"}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every suite shares; `check_settings` builds it from plain values."""

  template: str = "upstream_eval"
  max_new_tokens: int = 256
  batch_size: int = 16
  prefill_ks: tuple[int, ...] = PREFILL_KS
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  limit: int = 0  # first n items of every file; 0 = all
  generator: str = "derta_jax"


def parse_ks(value) -> tuple[int, ...]:
  """Prefix lengths from "0,3,5" or a sequence of ints: sorted, distinct, >= 0."""
  parts = value.split(",") if isinstance(value, str) else list(value)
  try:
    ks = [int(p) if isinstance(p, str) else p for p in parts]
  except ValueError:
    raise ValueError(f"not a comma-separated list of ints: {value!r}") from None
  if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in ks):
    raise ValueError(f"expected one or more ints >= 0, got {value!r}")
  return tuple(sorted(set(ks)))


def check_judge(spec) -> None:
  """A judge object, "harm", a keyword list name, or "<model kind>:<dir>" with a config.json."""
  if not isinstance(spec, str):
    if not callable(getattr(spec, "judge", None)):
      raise ValueError(f"{spec!r} has no judge(responses, prompts) method")
    return
  _, path = judges.split_spec(spec)
  if path and not (epath.Path(path) / "config.json").exists():
    raise ValueError(f"{spec!r}: {path}/config.json does not exist")


def check_settings(values: Mapping, judge, *, prefix: str = "") -> Settings:
  """Settings from plain values; one ValueError naming every bad `<prefix><name>=value`."""
  v = dict(values)
  problems = []

  def bad(name, why):
    problems.append(f"{prefix}{name}={v[name]!r}: {why}")

  if v["template"] not in templates.NAMES:
    bad("template", f"choose one of {sorted(templates.NAMES)}")
  for name in ("max_new_tokens", "batch_size"):
    if isinstance(v[name], bool) or not isinstance(v[name], int) or v[name] < 1:
      bad(name, "must be an int >= 1")
  try:
    v["prefill_ks"] = parse_ks(v["prefill_ks"])
  except ValueError as e:
    bad("prefill_ks", str(e))
  if not v["temperature"] >= 0.0:
    bad("temperature", "must be >= 0 (0 = greedy)")
  if not 0.0 < v["top_p"] <= 1.0:
    bad("top_p", "must be in (0, 1]")
  v["limit"] = v["limit"] or 0
  if isinstance(v["limit"], bool) or not isinstance(v["limit"], int) or v["limit"] < 0:
    bad("limit", "must be an int >= 0 (0 = every item)")
  try:
    check_judge(judge)
  except ValueError as e:
    problems.append(f"{prefix}judge: {e}")
  if problems:
    raise ValueError("; ".join(problems))
  return Settings(**{f.name: v[f.name] for f in dataclasses.fields(Settings)})


def from_config(config, *, seed: int | None = None) -> Settings:
  """Settings from config.eval (keys it lacks take the defaults); ValueError names every bad
  eval.<key>. `seed`: instead of eval.seed (the toy world samples with the run's seed).
  eval.template "" takes data.template's generation form (EVAL_FORM)."""
  e = config.get("eval")
  if e is None:
    raise ValueError("the config has no `eval` section; see configs/base.py for its keys")
  defaults = Settings()
  values = {f.name: e.get(f.name, getattr(defaults, f.name))
            for f in dataclasses.fields(Settings)}
  if seed is not None:
    values["seed"] = seed
  if not values["template"]:  # the training template's generation form
    trained = config.get("data", {}).get("template", "upstream")
    values["template"] = EVAL_FORM.get(trained, trained)
  return check_settings(values, e.get("judge", "harm"), prefix="eval.")
