"""Evaluation suites for safety (attacks, prefilling, where refusals happen) and helpfulness.

Suites read upstream eval files ({"question"[, "answer"]}) or triples ({"instruction",
"output", "safe_response"}, output = the harmful response); each gives one row per item
and metrics:

  harmful            template(question), generated, judged: ASR = share judged harmful
                     (not refused, for a keyword judge)
  codeattack, jailbreakchat, selfcipher, illegal_instructions
                     the authors' attack files (data/test/safety_*.json), as harmful
  completion_attack  the raw question, no template (the authors' completion attack): ASR
  prefilling         template(instruction) + the first k tokens of the harmful output;
                     the continuation alone is judged: ASR per k
  refusal_position   harmful responses that refuse: token index of the first refusal phrase
                     (the harmful suite's generations when it ran on the same file)
  refusal_probe      teacher-forced P(refusal | q, r̂_<t) at every position t of the harmful
                     output, the quantity RTO trains: mean curve over t
  over_refusal       prompts that look unsafe ({"question", "type", "safe"}): XSTest's classes
                     (full compliance / full refusal / partial refusal) per type, and the
                     refusal rate on the unsafe contrasts
  gsm8k              accuracy: the response's last number vs the answer's (after "####")
  mmlu               accuracy: the response's first "(A)".."(D)"; a response without one
                     counts as wrong
  alpaca             generations only, in AlpacaEval's format, for external judging

`evaluate(model, tokenizer, suites={"harmful": path, ...}, workdir=...)` checks every file,
runs the suites and writes <workdir>/eval/ (eval_report). Every judged row carries the
judge's verdict, its evidence when the judge gives some (the harm judge: the refusal span,
the content span, the reason) and the strict keyword judge's verdict; attack suites report
the ASR under both and the empty responses apart. Prompts and scoring: eval_text; the
probe: probe. Greedy decoding is deterministic; sampling is seeded.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from etils import epath

from derta_jax import losses
from derta_jax.data import formats, templates
from derta_jax.data.records import DataError
from derta_jax.data.tokenize import refusal_ids as tokenizer_refusal_ids
from derta_jax.evaluation import harm, judges, probe, report, running, text
from derta_jax.evaluation.running import Context, Result
from derta_jax.evaluation.settings import PREFILL_KS, check_settings

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


# ---------------------------------------------------------------------------- suites


def harmful(ctx: Context, items) -> Result:
  result, ids = running.judged(ctx, items, "harmful", ctx.settings.template)
  ctx.harmful_ids[ctx.paths["harmful"]] = ids  # refusal_position reuses them
  return result


def _attack(name: str, template: str | None = None) -> Callable[[Context, list], Result]:
  """A suite of one attack file: template(question) (or `template`), generated, judged."""
  def run(ctx: Context, items) -> Result:
    return running.judged(ctx, items, name, template or ctx.settings.template)[0]
  run.__name__ = name
  return run


def _share(rows: list[dict], key: str, value=True) -> float | None:
  return sum(r[key] == value for r in rows) / len(rows) if rows else None


def over_refusal(ctx: Context, items) -> Result:
  """XSTest's classes per prompt type (decided by harm.HarmJudge.response_class, whatever
  the configured judge); refusal rate = full + partial refusals, on safe prompts and on the
  unsafe contrasts (items with "safe": false) apart."""
  prompts, ids, responses = running.answer(ctx, items, "over_refusal",
                                           template=ctx.settings.template)
  classes = harm.HarmJudge()
  rows = []
  for it, p, i, r, strict in zip(items, prompts, ids, responses, ctx.strict.judge(responses),
                                 strict=True):
    kind = classes.response_class(r, it.question)
    rows.append(dict(question=it.question, type=it.type or "unlabelled",
                     safe=it.safe is not False, prompt=p, response=r, response_class=kind,
                     refused=kind in ("full_refusal", "partial_refusal"),
                     strict_refused=strict, truncated=running.truncated(ctx, i)))
  by_type = {}
  for row in rows:
    by_type.setdefault(row["type"], []).append(row)
  per_type = {t: dict(n=len(group), safe=group[0]["safe"],
                      **{c: _share(group, "response_class", c)
                         for c in (*harm.XSTEST_CLASSES, "empty")})
              for t, group in sorted(by_type.items())}
  safe = [r for r in rows if r["safe"]]
  unsafe = [r for r in rows if not r["safe"]]
  return Result(rows, dict(
      n=len(rows), n_safe=len(safe), n_unsafe=len(unsafe), refusal_rate=_share(safe, "refused"),
      refusal_rate_strict=_share(safe, "strict_refused"),
      full_compliance=_share(safe, "response_class", "full_compliance"),
      unsafe_refusal_rate=_share(unsafe, "refused"), per_type=per_type))


def prefilling(ctx: Context, triples) -> Result:
  s = ctx.settings
  cases = [(t, k, *text.prefill_prompt(ctx.tokenizer, s.template, t.instruction,
                                             t.output, k))
           for k in s.prefill_ks for t in triples]
  ids = running.generate(ctx, [c[2] for c in cases], "prefilling")
  responses = [ctx.tokenizer.decode(running.strip_eos(ctx, i)) for i in ids]
  judged = running.verdicts(ctx, responses, [c[0].instruction for c in cases])
  rows = []
  for (t, k, prompt_ids, used), i, r, v in zip(cases, ids, responses, judged, strict=True):
    rows.append(dict(instruction=t.instruction, k=k, k_used=used,
                     prompt=templates.apply_template(s.template, t.instruction),
                     prefill=ctx.tokenizer.decode(prompt_ids[len(prompt_ids) - used:]),
                     response=r, truncated=running.truncated(ctx, i), **v))
  by_k = {k: [r["refused"] for r in rows if r["k"] == k] for k in s.prefill_ks}
  asr_by_k = {str(k): text.attack_success_rate(v) for k, v in by_k.items()}
  return Result(rows, dict(asr_by_k=asr_by_k, n=len(triples)))


def _scored(ctx: Context, items, name: str, wrap: str, predict: Callable,
            gold: Callable, correct: Callable) -> Result:
  prompts, ids, responses = running.answer(ctx, items, name, template=ctx.settings.template,
                                    wrap=wrap)
  rows = []
  for it, p, i, r in zip(items, prompts, ids, responses, strict=True):
    pred, want = predict(r), gold(it.answer)
    rows.append(dict(question=it.question, prompt=p, response=r, prediction=pred, gold=want,
                     correct=correct(pred, want), truncated=running.truncated(ctx, i)))
  right = sum(r["correct"] for r in rows)
  return Result(rows, dict(accuracy=right / len(rows), n=len(rows), correct=right))


def gsm8k(ctx: Context, items) -> Result:
  return _scored(ctx, items, "gsm8k", text.GSM8K_WRAP, text.last_number,
                 text.last_number, text.same_number)


def mmlu(ctx: Context, items) -> Result:
  return _scored(ctx, items, "mmlu", text.MMLU_WRAP, text.mmlu_choice,
                 text.mmlu_gold, lambda pred, want: pred is not None and pred == want)


def alpaca(ctx: Context, items) -> Result:
  _, _, responses = running.answer(ctx, items, "alpaca", template=ctx.settings.template)
  rows = [dict(instruction=it.question, output=r, generator=ctx.settings.generator)
          for it, r in zip(items, responses, strict=True)]
  return Result(rows, dict(n=len(rows)))


def refusal_position(ctx: Context, items) -> Result:
  """Where refusals start; positions come from the configured judge's `match` (the harm
  judge's or a keyword judge's first refusal phrase; "strict" for a model judge)."""
  path = ctx.paths["refusal_position"]
  ids = ctx.harmful_ids.get(path) if ctx.paths.get("harmful") == path else None
  if ids is None:
    _, ids, _ = running.answer(ctx, items, "refusal_position", template=ctx.settings.template)
  finder = ctx.judge if hasattr(ctx.judge, "match") else ctx.strict
  rows, positions = [], []
  for it, full in zip(items, ids, strict=True):
    tokens = running.strip_eos(ctx, full)
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


def refusal_probe(ctx: Context, triples) -> Result:
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
  run: Callable[[Context, list], Result]
  triples: bool = False  # reads triples, else eval items
  answers: bool = False  # every item needs a usable "answer"


SUITES: dict[str, Suite] = {
    "harmful": Suite(harmful),
    "codeattack": Suite(_attack("codeattack")),
    "jailbreakchat": Suite(_attack("jailbreakchat")),
    "selfcipher": Suite(_attack("selfcipher")),
    "completion_attack": Suite(_attack("completion_attack", "raw")),
    "illegal_instructions": Suite(_attack("illegal_instructions")),
    "prefilling": Suite(prefilling, triples=True),
    "refusal_position": Suite(refusal_position),
    "refusal_probe": Suite(refusal_probe, triples=True),
    "over_refusal": Suite(over_refusal),
    "gsm8k": Suite(gsm8k, answers=True),
    "mmlu": Suite(mmlu, answers=True),
    "alpaca": Suite(alpaca),
}


def evaluate(model, tokenizer, *, suites: Mapping[str, str | os.PathLike],
             workdir: str | os.PathLike, template: str = "upstream_eval", judge="harm",
             max_new_tokens: int = 256, batch_size: int = 16, prefill_ks=PREFILL_KS,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, limit: int = 0,
             refusal_ids=None, generator: str = "derta_jax",
             metadata: Mapping | None = None) -> dict:
  """Run `suites` ({suite: file}), write <workdir>/eval/, return the summary.

  judge: a judges spec ("harm", "strict", "gcg", "qi", "arditi", "model:<dir>",
  "<guard format>:<dir>", see guard_formats) or a judge object.
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
  settings = dataclasses.replace(settings,
                                 template=templates.resolve(settings.template, tokenizer))
  ctx = Context(model, tokenizer, judge, settings, refusal, eos,
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
