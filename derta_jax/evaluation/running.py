"""What every suite does to run: the context it runs in, generation in length-sorted
batches, and judging with the configured judge next to strict (verdict, evidence, ASR)."""

from __future__ import annotations

import dataclasses
import zlib

from tqdm import tqdm

from derta_jax.data import templates
from derta_jax.evaluation import judges, text
from derta_jax.evaluation.settings import Settings
from derta_jax.models import generate as generation


@dataclasses.dataclass
class Context:
  model: object
  tokenizer: object
  judge: object
  settings: Settings
  refusal_ids: tuple[int, ...]
  eos_ids: tuple[int, ...]
  paths: dict
  strict: judges.KeywordJudge = dataclasses.field(
      default_factory=lambda: judges.make_judge("strict"))
  harmful_ids: dict = dataclasses.field(default_factory=dict)  # path -> generated ids


@dataclasses.dataclass
class Result:
  rows: list[dict]
  metrics: dict


def seed_for(seed: int, *parts) -> int:
  """A seed per (seed, suite, batch) that fits int32, the same in every run."""
  return zlib.crc32(repr((seed, *parts)).encode()) & 0x7FFFFFFF


def generate(ctx: Context, prompts: list[list[int]], name: str) -> list[list[int]]:
  """New tokens per prompt; similar lengths share a batch, results in input order."""
  s = ctx.settings
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  out: list[list[int]] = [[] for _ in prompts]
  starts = range(0, len(order), s.batch_size)
  for start in tqdm(starts, desc=f"eval {name}", unit="batch", disable=len(starts) < 2):
    chunk = order[start:start + s.batch_size]
    new = generation.generate(ctx.model, [prompts[i] for i in chunk],
                            max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                            top_p=s.top_p, seed=seed_for(s.seed, name, start),
                            eos_id=ctx.eos_ids, batch_size=s.batch_size)
    for i, ids in zip(chunk, new, strict=True):
      out[i] = list(ids)
  return out


def strip_eos(ctx: Context, ids: list[int]) -> list[int]:
  return ids[:-1] if ids and ids[-1] in ctx.eos_ids else ids


def prompt_ids(ctx: Context, prompt_text: str) -> list[int]:
  return [ctx.tokenizer.bos_id, *ctx.tokenizer.encode(prompt_text)]


def answer(ctx: Context, items, name: str, *, template: str, wrap: str = "{q}"):
  """(prompt texts, generated ids, response texts) for eval items."""
  prompts = [templates.apply_template(template, wrap.format(q=it.question)) for it in items]
  ids = generate(ctx, [prompt_ids(ctx, p) for p in prompts], name)
  return prompts, ids, [ctx.tokenizer.decode(strip_eos(ctx, i)) for i in ids]


def truncated(ctx: Context, ids: list[int]) -> bool:
  """Whether generation stopped at max_new_tokens rather than at EOS."""
  return not ids or ids[-1] not in ctx.eos_ids


def verdicts(ctx: Context, responses: list[str], prompts: list[str]) -> list[dict]:
  """Per response: refused (the configured judge: the attack failed), strict_refused, and
  the judge's evidence when it gives any."""
  if hasattr(ctx.judge, "verdicts"):
    found = ctx.judge.verdicts(responses, prompts)
    out = [dict(refused=not v.harmful, evidence=v.as_dict()) for v in found]
  else:
    out = [dict(refused=bool(x)) for x in ctx.judge.judge(responses, prompts=prompts)]
  for row, strict in zip(out, ctx.strict.judge(responses), strict=True):
    row["strict_refused"] = strict
  return out


def asr(rows: list[dict]) -> dict:
  """ASR under the configured judge and under strict, with the blank responses counted."""
  return dict(asr=text.attack_success_rate([r["refused"] for r in rows]),
              asr_strict=text.attack_success_rate([r["strict_refused"] for r in rows]),
              empty=sum(not r["response"].strip() for r in rows))


def judged(ctx: Context, items, name: str, template: str) -> tuple[Result, list[list[int]]]:
  """Generate for eval items and judge the responses; (result, generated ids)."""
  prompts, ids, responses = answer(ctx, items, name, template=template)
  found = verdicts(ctx, responses, [it.question for it in items])
  rows = [dict(question=it.question, prompt=p, response=r, truncated=truncated(ctx, i), **v)
          for it, p, i, r, v in zip(items, prompts, ids, responses, found, strict=True)]
  refused = sum(r["refused"] for r in rows)
  return Result(rows, dict(n=len(rows), refused=refused, **asr(rows))), ids
