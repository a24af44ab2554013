"""Training mixtures from harmful triples and helpful data, as the authors build them.

Upstream (data/train/generate_training_data.py), per triple i (question q, harmful
response h, safe response s), with T(q) = "[INST] {q} [\\INST]" and E = "<|end_of_text|>":
  RTO          prefix T(q)                          text " " + h + E   safe "true"
  prefix-MLE   prefix T(q) + " " + first k words of h  text " " + s + E   safe "false"
  vanilla      prefix T(q)                          text " " + s + E   safe "false"
  helpful      prefix T(instruction)                text " " + output + E
and the mixtures (helpful first, then safety data in triple order):
  vanilla = helpful + 6,000 vanilla;  recaug = helpful + 6,000 prefix-MLE;
  derta   = helpful + 3,000 RTO + 3,000 prefix-MLE (the same first 3,000 questions).
The paper's ablations remove one half of DeRTa each:
  harmful_prefix = helpful + 3,000 prefix-MLE;  rto_only = helpful + 3,000 RTO + 3,000 vanilla.
Differences: k comes from `sampler` (seeded, resampled per epoch); triples whose harmful
response has fewer than 3 words keep k = 0 instead of being dropped (upstream drops them
from the prefix-MLE and vanilla lists only, which shifts those lists against the RTO list).
DeRTa's rivals, from the same triples (not in the authors' script, which has no format for
them; each part starts from the first triple, so the parts of a mixture share questions):
  dpo             = helpful + 6,000 pairs   (chosen " " + s + E, rejected " " + h + E)
  qi              = helpful + 6,000 prefix-MLE with the harmful prefix cut in tokens of the
                    tokenizer given (Qi et al.'s augmentation), whatever prefix_mode says
  door            = helpful + 6,000 prefix-MLE + 6,000 harm   (refusal training + NPO)
  circuit_breaker = helpful + 6,000 vanilla + 6,000 harm      (retain + reroute)
where a harm example is prefix T(q), text " " + h + E, trained on its own tokens.
Safety examples (vanilla and prefix-MLE) have kind "safe", helpful ones "mle": both are MLE
targets alike, and only objectives that tell safety from utility data look at the difference.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import logging

from derta_jax.data import sampler, templates
from derta_jax.data.records import Example, Helpful, Triple

# name -> ((part, count), ...): the paper's counts; the rivals use its 6,000 questions.
RECIPES = {
    "vanilla": (("vanilla", 6000),),
    "recaug": (("prefix", 6000),),
    "derta": (("rto", 3000), ("prefix", 3000)),
    "harmful_prefix": (("prefix", 3000),),
    "rto_only": (("rto", 3000), ("vanilla", 3000)),
    "dpo": (("pair", 6000),),
    "qi": (("prefix", 6000),),
    "door": (("prefix", 6000), ("harm", 6000)),
    "circuit_breaker": (("vanilla", 6000), ("harm", 6000)),
}
PARTS = ("rto", "prefix", "vanilla", "pair", "harm")
# Recipes whose harmful prefixes are cut in tokens, whatever prefix_mode is given.
TOKEN_CUT = ("qi",)
UPSTREAM_EOS = "<|end_of_text|>"


def _prefix_cut(triples: Sequence[Triple], *, seed, epoch, mode, static, tokenizer, **kwargs):
  """The harmful prefix text of every triple for this epoch (with its leading space)."""
  if mode == "token":
    if tokenizer is None:
      raise ValueError('prefix_mode="token" needs a tokenizer')
    ids = [tokenizer.encode(t.output) for t in triples]
    ks = sampler.sample_prefix_lengths([len(i) for i in ids], seed=seed, epoch=epoch,
                                       mode="token", static=static, **kwargs)
    return [" " + tokenizer.decode(i[:k]).lstrip(" ") if k else ""
            for i, k in zip(ids, ks, strict=True)]
  words = [t.output.split(" ") for t in triples]
  ks = sampler.sample_prefix_lengths([len(w) for w in words], seed=seed, epoch=epoch, mode=mode,
                                     static=static, **kwargs)
  return [" " + " ".join(w[:k]) for w, k in zip(words, ks, strict=True)]


def build_recipe(name: str, *, triples: Sequence[Triple], helpful: Sequence[Helpful],
                 seed: int = 0, epoch: int = 0, counts: dict[str, int] | None = None,
                 template: str | templates.ChatTemplate = "upstream",
                 eos_text: str = UPSTREAM_EOS,
                 separator: str = " ", after_prefix: str = " ",
                 prefix_mode: str = "official_word",
                 static: bool = False, tokenizer=None, **prefix_kwargs) -> list[Example]:
  """The examples of recipe `name` for one epoch (prefix cuts depend on seed and epoch).

  counts overrides the paper's counts per part (PARTS). Every part starts from the first
  triple, as upstream. separator goes between prompt and response (upstream: one space; a
  chat template: none; a harmful prefix takes its place, followed by `after_prefix`: a space
  upstream; "" starts the refusal right at the cut, with the token RTO trains when the
  refusal word has no one-token form after a space); eos_text ends every response. Recipes
  in TOKEN_CUT cut in tokens of `tokenizer` (prefix_mode "token", whatever is given).
  """
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
  parts = dict(RECIPES[name])
  for part, count in (counts or {}).items():
    if part not in PARTS:
      raise ValueError(f"counts has unknown part {part!r}; parts: {', '.join(PARTS)}")
    if part not in parts:
      raise ValueError(f"recipe {name!r} has no {part!r} part; it has {sorted(parts)}")
    parts[part] = int(count)
  if name in TOKEN_CUT:
    if tokenizer is None:
      raise ValueError(f"recipe {name!r} cuts harmful prefixes in tokens; pass tokenizer=")
    prefix_mode = "token"
  for part, count in parts.items():
    if count > len(triples):
      logging.warning("recipe %s: %d %s examples asked for, only %d triples; using %d",
                      name, count, part, len(triples), len(triples))

  prompt = lambda q: templates.apply_template(template, q)  # noqa: E731
  examples = [Example(prompt(h.instruction), separator + h.output + eos_text, "mle")
              for h in helpful]
  for part, count in parts.items():
    used = triples[:count]
    if part in ("rto", "harm"):
      examples += [Example(prompt(t.instruction), separator + t.output + eos_text, part)
                   for t in used]
    elif part == "pair":
      examples += [Example(prompt(t.instruction), separator + t.safe_response + eos_text, "pair",
                           rejected=separator + t.output + eos_text)
                   for t in used]
    elif part == "vanilla":
      examples += [Example(prompt(t.instruction), separator + t.safe_response + eos_text, "safe")
                   for t in used]
    else:
      cuts = _prefix_cut(used, seed=seed, epoch=epoch, mode=prefix_mode, static=static,
                         tokenizer=tokenizer, **prefix_kwargs)
      examples += [Example(prompt(t.instruction),
                           (after_prefix if cut else separator) + t.safe_response + eos_text,
                           "safe",
                           harmful_prefix=separator + cut.lstrip(" ") if cut else "")
                   for t, cut in zip(used, cuts, strict=True)]
  return examples
