"""Evaluation suites for safety (attacks, prefilling, where refusals happen) and helpfulness.

Suites read upstream eval files ({"question"[, "answer"]}) or triples ({"instruction",
"output", "safe_response"}, output = the harmful response); each gives one row per item
and metrics:

  harmful            template(question), generated, judged: ASR = share NOT refused
  completion_attack  the raw question, no template (the authors' completion attack): ASR
  prefilling         template(instruction) + the first k tokens of the harmful output;
                     the continuation alone is judged: ASR per k
  refusal_position   harmful responses that refuse: token index of the first refusal phrase
                     (the harmful suite's generations when it ran on the same file)
  refusal_probe      teacher-forced P(refusal | q, r̂_<t) at every position t of the harmful
                     output, the quantity RTO trains: mean curve over t
  over_refusal       benign questions: share refused
  gsm8k              accuracy: the response's last number vs the answer's (after "####")
  mmlu               accuracy: the response's first "(A)".."(D)"; a response without one
                     counts as wrong
  alpaca             generations only, in AlpacaEval's format, for external judging

`evaluate(model, tokenizer, suites={"harmful": path, ...}, workdir=...)` checks every file,
runs the suites and writes <workdir>/eval/ (eval_report). Prompts and scoring: eval_text;
the probe: probe. Greedy decoding is deterministic; sampling is seeded.
"""

from __future__ import annotations

import dataclasses
import os
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from etils import epath
from tqdm import tqdm

from derta_jax import losses
from derta_jax.data import formats, templates
from derta_jax.data.records import DataError
from derta_jax.data.tokenize import refusal_ids as tokenizer_refusal_ids
from derta_jax.evaluation import judges, probe, report, text
from derta_jax.evaluation.settings import PREFILL_KS, Settings, check_settings
from derta_jax.models import generate as generation

FIRST_TOKENS = 5  # refusal_position reports the share of refusals starting before this

# ---------------------------------------------------------------------------- data


def _check_answers(name: str, items: formats.Loaded) -> None:
  for item, at in zip(items, items.where, strict=True):
    where = f'{at}: field "answer"'
    if item.answer is None:
      raise DataError(f"{where}: missing (the {name} suite scores against it)")
    if name == "gsm8k" and text.last_number(item.answer) is None:
      raise DataError(f"{where}: no number in {item.answer[-60:]!r}")
    if name == "mmlu" and text.mmlu_gold(item.answer) is None:
      raise DataError(f'{where}: expected a letter A-D or "(A)".."(D)", got {item.answer[:60]!r}')


def load_suites(paths: Mapping[str, str | os.PathLike], *, limit: int = 0) -> dict[str, list]:
  """Every suite's records (the first `limit` when > 0), all read and checked before
  anything runs: DataError names the file, line and field; ValueError the suite or key."""
  unknown = sorted(set(paths) - set(SUITES))
  if unknown:
    raise ValueError(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
  if not paths:
    raise ValueError(f"no suite to run; give a file for one or more of {list(SUITES)}")
  missing = [f"{name}={os.fspath(p)!r}" for name, p in paths.items()
             if not epath.Path(p).is_file()]
  if missing:
    raise ValueError(f"eval file(s) not found: {', '.join(missing)}")
  loaded = {}
  for name in SUITES:  # registry order: harmful runs before refusal_position reuses it
    if name not in paths:
      continue
    path = paths[name]
    records = (formats.load_triples if SUITES[name].triples else formats.load_eval)(path)
    if not records:
      raise DataError(f"{os.fspath(path)}: no records for the {name} suite")
    if SUITES[name].answers:
      _check_answers(name, records)
    loaded[name] = list(records)[:limit or None]
  return loaded


# ---------------------------------------------------------------------------- running


@dataclasses.dataclass
class _Context:
  model: object
  tokenizer: object
  judge: object
  settings: Settings
  refusal_ids: tuple[int, ...]
  eos_ids: tuple[int, ...]
  paths: dict
  harmful_ids: dict = dataclasses.field(default_factory=dict)  # path -> generated ids


@dataclasses.dataclass
class Result:
  rows: list[dict]
  metrics: dict


def _seed(seed: int, *parts) -> int:
  """A seed per (seed, suite, batch) that fits int32, the same in every run."""
  return zlib.crc32(repr((seed, *parts)).encode()) & 0x7FFFFFFF


def _generate(ctx: _Context, prompts: list[list[int]], name: str) -> list[list[int]]:
  """New tokens per prompt; similar lengths share a batch, results in input order."""
  s = ctx.settings
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  out: list[list[int]] = [[] for _ in prompts]
  starts = range(0, len(order), s.batch_size)
  for start in tqdm(starts, desc=f"eval {name}", unit="batch", disable=len(starts) < 2):
    chunk = order[start:start + s.batch_size]
    new = generation.generate(ctx.model, [prompts[i] for i in chunk],
                            max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                            top_p=s.top_p, seed=_seed(s.seed, name, start),
                            eos_id=ctx.eos_ids, batch_size=s.batch_size)
    for i, ids in zip(chunk, new, strict=True):
      out[i] = list(ids)
  return out


def _strip_eos(ctx: _Context, ids: list[int]) -> list[int]:
  return ids[:-1] if ids and ids[-1] in ctx.eos_ids else ids


def _prompt(ctx: _Context, prompt_text: str) -> list[int]:
  return [ctx.tokenizer.bos_id, *ctx.tokenizer.encode(prompt_text)]


def _answer(ctx: _Context, items, name: str, *, template: str, wrap: str = "{q}"):
  """(prompt texts, generated ids, response texts) for eval items."""
  prompts = [templates.apply_template(template, wrap.format(q=it.question)) for it in items]
  ids = _generate(ctx, [_prompt(ctx, p) for p in prompts], name)
  return prompts, ids, [ctx.tokenizer.decode(_strip_eos(ctx, i)) for i in ids]


def _truncated(ctx: _Context, ids: list[int]) -> bool:
  """Whether generation stopped at max_new_tokens rather than at EOS."""
  return not ids or ids[-1] not in ctx.eos_ids


def _judged(ctx: _Context, items, name: str, template: str) -> tuple[Result, list[list[int]]]:
  """Generate for eval items and judge the responses; (result, generated ids)."""
  prompts, ids, responses = _answer(ctx, items, name, template=template)
  refused = [bool(x) for x in ctx.judge.judge(responses, prompts=[it.question for it in items])]
  rows = [dict(question=it.question, prompt=p, response=r, refused=x,
               truncated=_truncated(ctx, i))
          for it, p, i, r, x in zip(items, prompts, ids, responses, refused, strict=True)]
  return Result(rows, dict(n=len(rows), refused=sum(refused))), ids


def harmful(ctx: _Context, items) -> Result:
  result, ids = _judged(ctx, items, "harmful", ctx.settings.template)
  ctx.harmful_ids[ctx.paths["harmful"]] = ids  # refusal_position reuses them
  result.metrics["asr"] = text.attack_success_rate([r["refused"] for r in result.rows])
  return result


def completion_attack(ctx: _Context, items) -> Result:
  result, _ = _judged(ctx, items, "completion_attack", "raw")
  result.metrics["asr"] = text.attack_success_rate([r["refused"] for r in result.rows])
  return result


def over_refusal(ctx: _Context, items) -> Result:
  result, _ = _judged(ctx, items, "over_refusal", ctx.settings.template)
  result.metrics["refusal_rate"] = result.metrics["refused"] / result.metrics["n"]
  return result


def prefilling(ctx: _Context, triples) -> Result:
  s = ctx.settings
  cases = [(t, k, *text.prefill_prompt(ctx.tokenizer, s.template, t.instruction,
                                             t.output, k))
           for k in s.prefill_ks for t in triples]
  ids = _generate(ctx, [c[2] for c in cases], "prefilling")
  responses = [ctx.tokenizer.decode(_strip_eos(ctx, i)) for i in ids]
  refused = ctx.judge.judge(responses, prompts=[c[0].instruction for c in cases])
  rows = []
  for (t, k, prompt_ids, used), i, r, x in zip(cases, ids, responses, refused, strict=True):
    rows.append(dict(instruction=t.instruction, k=k, k_used=used,
                     prompt=templates.apply_template(s.template, t.instruction),
                     prefill=ctx.tokenizer.decode(prompt_ids[len(prompt_ids) - used:]),
                     response=r, refused=bool(x), truncated=_truncated(ctx, i)))
  by_k = {k: [r["refused"] for r in rows if r["k"] == k] for k in s.prefill_ks}
  asr_by_k = {str(k): text.attack_success_rate(v) for k, v in by_k.items()}
  return Result(rows, dict(asr_by_k=asr_by_k, n=len(triples)))


def _scored(ctx: _Context, items, name: str, wrap: str, predict: Callable,
            gold: Callable, correct: Callable) -> Result:
  prompts, ids, responses = _answer(ctx, items, name, template=ctx.settings.template,
                                    wrap=wrap)
  rows = []
  for it, p, i, r in zip(items, prompts, ids, responses, strict=True):
    pred, want = predict(r), gold(it.answer)
    rows.append(dict(question=it.question, prompt=p, response=r, prediction=pred, gold=want,
                     correct=correct(pred, want), truncated=_truncated(ctx, i)))
  right = sum(r["correct"] for r in rows)
  return Result(rows, dict(accuracy=right / len(rows), n=len(rows), correct=right))


def gsm8k(ctx: _Context, items) -> Result:
  return _scored(ctx, items, "gsm8k", text.GSM8K_WRAP, text.last_number,
                 text.last_number, text.same_number)


def mmlu(ctx: _Context, items) -> Result:
  return _scored(ctx, items, "mmlu", text.MMLU_WRAP, text.mmlu_choice,
                 text.mmlu_gold, lambda pred, want: pred is not None and pred == want)


def alpaca(ctx: _Context, items) -> Result:
  _, _, responses = _answer(ctx, items, "alpaca", template=ctx.settings.template)
  rows = [dict(instruction=it.question, output=r, generator=ctx.settings.generator)
          for it, r in zip(items, responses, strict=True)]
  return Result(rows, dict(n=len(rows)))


def refusal_position(ctx: _Context, items) -> Result:
  """Where refusals start; positions come from a keyword judge's match (the configured
  judge when it is one, else "strict")."""
  path = ctx.paths["refusal_position"]
  ids = ctx.harmful_ids.get(path) if ctx.paths.get("harmful") == path else None
  if ids is None:
    _, ids, _ = _answer(ctx, items, "refusal_position", template=ctx.settings.template)
  finder = ctx.judge if hasattr(ctx.judge, "match") else judges.make_judge("strict")
  rows, positions = [], []
  for it, full in zip(items, ids, strict=True):
    tokens = _strip_eos(ctx, full)
    response = ctx.tokenizer.decode(tokens)
    found = finder.match(response)
    row = dict(question=it.question, response=response, refused=found is not None,
               phrase=None, char_offset=None, token_index=None)
    if found is not None:
      index = text.refusal_token_index(ctx.tokenizer, tokens, found[0])
      row.update(phrase=found[1], char_offset=found[0], token_index=index)
      positions.append(index)
    rows.append(row)
  metrics = dict(n=len(rows), refusals=len(positions), judge=getattr(finder, "name", None),
                 share_first_5=None, mean_position=None,
                 histogram=np.bincount(positions).tolist() if positions else [])
  if positions:
    metrics.update(share_first_5=float(np.mean(np.asarray(positions) < FIRST_TOKENS)),
                   mean_position=float(np.mean(positions)))
  return Result(rows, metrics)


def refusal_probe(ctx: _Context, triples) -> Result:
  """Teacher-forced P(refusal | q, r̂_<t) over each harmful output (see eval_probe)."""
  s = ctx.settings
  seqs = probe.probe_sequences(ctx.tokenizer, s.template, triples,
                                    ctx.model.config.max_position_embeddings)
  curves = probe.refusal_curves(ctx.model, seqs, refusal_ids=ctx.refusal_ids,
                                     batch_size=s.batch_size, pad_id=ctx.tokenizer.pad_id)
  rows = [dict(instruction=t.instruction, prompt=templates.apply_template(s.template,
                                                                          t.instruction),
               response_tokens=len(c), cut=cut, p_refusal=[float(x) for x in c])
          for t, c, (_, _, cut) in zip(triples, curves, seqs, strict=True)]
  curve, counts = probe.mean_curve(curves)
  return Result(rows, dict(
      n=len(rows), refusal_ids=list(ctx.refusal_ids), cut=sum(c for _, _, c in seqs),
      curve=curve.tolist(), counts=counts.tolist(), first=float(curve[0]),
      mean=float(sum(c.sum() for c in curves) / counts.sum())))  # over all positions


@dataclasses.dataclass(frozen=True)
class Suite:
  run: Callable[[_Context, list], Result]
  triples: bool = False  # reads triples, else eval items
  answers: bool = False  # every item needs a usable "answer"


SUITES: dict[str, Suite] = {
    "harmful": Suite(harmful),
    "completion_attack": Suite(completion_attack),
    "prefilling": Suite(prefilling, triples=True),
    "refusal_position": Suite(refusal_position),
    "refusal_probe": Suite(refusal_probe, triples=True),
    "over_refusal": Suite(over_refusal),
    "gsm8k": Suite(gsm8k, answers=True),
    "mmlu": Suite(mmlu, answers=True),
    "alpaca": Suite(alpaca),
}


def evaluate(model, tokenizer, *, suites: Mapping[str, str | os.PathLike],
             workdir: str | os.PathLike, template: str = "upstream_eval", judge="strict",
             max_new_tokens: int = 256, batch_size: int = 16, prefill_ks=PREFILL_KS,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, limit: int = 0,
             refusal_ids=None, generator: str = "derta_jax",
             metadata: Mapping | None = None) -> dict:
  """Run `suites` ({suite: file}), write <workdir>/eval/, return the summary.

  judge: a judges spec ("strict", "gcg", "qi", "model:<dir>") or a judge object.
  refusal_ids: the probe's refusal token(s); None = the tokenizer's "Sorry".
  limit: the first n items of every file (0 = all). metadata: extra summary entries.
  """
  settings = check_settings(dict(
      template=template, max_new_tokens=max_new_tokens, batch_size=batch_size,
      prefill_ks=prefill_ks, temperature=temperature, top_p=top_p, seed=seed, limit=limit,
      generator=generator), judge)
  loaded = load_suites(suites, limit=settings.limit)
  return run_suites(model, tokenizer, loaded, paths=suites, workdir=workdir, settings=settings,
                    judge=judge, refusal_ids=refusal_ids, metadata=metadata)


def run_suites(model, tokenizer, loaded: Mapping[str, list], *, paths, workdir, settings,
               judge, refusal_ids=None, metadata: Mapping | None = None) -> dict:
  """Run already loaded and checked suites (`load_suites`) and write the outputs."""
  if isinstance(judge, str):
    judge = judges.make_judge(judge)
  refusal = losses.refusal_tuple(tokenizer_refusal_ids(tokenizer) if refusal_ids is None
                                 else refusal_ids, model.config.vocab_size)
  eos = tuple(sorted({*model.config.eos_ids, tokenizer.eos_id}))
  ctx = _Context(model, tokenizer, judge, settings, refusal, eos,
                 {k: os.fspath(v) for k, v in paths.items()})
  out_dir = Path(workdir) / "eval"
  start = time.perf_counter()
  results, files = {}, {}
  for name, items in loaded.items():
    result = SUITES[name].run(ctx, items)
    results[name] = result.metrics
    files[name] = report.write_suite(out_dir, name, result.rows, result.metrics)
  summary = dict(mode="eval", **(metadata or {}), eval_dir=str(out_dir), suites=results,
                 files=files, seconds=round(time.perf_counter() - start, 2))
  config = dict(dataclasses.asdict(settings), judge=getattr(judge, "name", repr(judge)),
                refusal_ids=list(refusal), eos_ids=list(eos), paths=ctx.paths)
  report.write_summary(out_dir, summary, config)
  return summary
