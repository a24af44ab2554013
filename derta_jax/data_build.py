"""A run's tokenizer, refusal ids and training examples from its config (config.data,
config.loss.refusal_ids): the data half of what config_build does for the model.

Checks raise ValueError (or DataError for files) naming the key and value.
"""

from __future__ import annotations

from pathlib import Path

from etils import epath

from derta_jax import data
from derta_jax.data import synthetic, templates
from derta_jax.data import tfds as tfds_data

SOURCES = ("synthetic", "recipe", "tfds", "upstream")


def tokenizer_path(config, workdir: Path, *, model_from_hf: bool = False) -> str:
  """data.tokenizer_path; else the synthetic tokenizer (written to <workdir>/tokenizer) for
  data.source "synthetic"; else init.hf_path's. `model_from_hf`: the model is read from
  init.hf_path itself, which then brings its own tokenizer."""
  d = config.data
  if d.tokenizer_path:
    return d.tokenizer_path
  if d.source == "synthetic" and not model_from_hf:
    return synthetic.write_tokenizer(workdir / "tokenizer")
  if config.init.hf_path:
    return config.init.hf_path
  raise ValueError("data.tokenizer_path is unset and so is init.hf_path: no tokenizer")


def refusal_ids(config, tokenizer) -> tuple[int, ...]:
  """loss.refusal_ids, or the tokens of data.refusal_text under data.refusal_policy."""
  if config.loss.refusal_ids:
    ids = tuple(config.loss.refusal_ids)
    if not all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids):
      raise ValueError(f"loss.refusal_ids={ids}: ids must be ints in [0, "
                       f"{tokenizer.vocab_size}) of the tokenizer")
    return ids
  try:
    return tuple(data.refusal_ids(tokenizer, config.data.refusal_text,
                                  policy=config.data.refusal_policy))
  except ValueError as e:
    raise ValueError(f"data.refusal_text={config.data.refusal_text!r}, data.refusal_policy="
                     f"{config.data.refusal_policy!r}: {e}") from None


def check_vocab(tokenizer, vocab_size: int, path) -> None:
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"the tokenizer {path} has {tokenizer.vocab_size} tokens, more than the "
                     f"model's vocab_size {vocab_size}")


def tfds_sources(d) -> tuple[list, list]:
  """(helpful, triples) from the ArrayRecord datasets `data.tfds.prepare` wrote under
  data.tfds_dir: the triples, and the helpful pairs where they were prepared."""
  if not d.tfds_dir:
    raise ValueError("data.source='tfds' needs data.tfds_dir, the data_dir given to "
                     "derta_jax.data.tfds.prepare")
  try:
    triples = list(tfds_data.open_records(d.tfds_dir, "triples", d.tfds_split))
    helpful = (list(tfds_data.open_records(d.tfds_dir, "helpful", d.tfds_split))
               if tfds_data.is_prepared(d.tfds_dir, "helpful") else [])
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"data.tfds_dir={d.tfds_dir!r}, data.tfds_split={d.tfds_split!r}: "
                     f"{e}") from None
  return helpful, triples


def _files(key: str, value: str, source: str) -> list[str]:
  """The file(s) data.<key> names (comma-separated for upstream_path); ValueError naming the
  key and value when it is unset, has an empty entry or names no file."""
  if not value.strip():
    raise ValueError(f"data.{key} is unset; data.source={source!r} reads it")
  parts = value.split(",") if key == "upstream_path" else [value]
  for n, part in enumerate(parts, 1):
    if not part.strip():
      raise ValueError(f"data.{key}={value!r}: entry {n} of {len(parts)} is empty (a "
                       "trailing or doubled comma?)")
    if not epath.Path(part).is_file():
      raise ValueError(f"data.{key}={value!r}: {part} is not a file")
  return parts


def _records(load, key: str, value: str, source: str) -> list:
  """Every record of the files data.<key> names; ValueError when one of them holds none."""
  records = []
  for path in _files(key, value, source):
    found = load(path)
    if not found:
      raise ValueError(f"data.{key}={value!r}: {path} holds no records (an empty file?)")
    records += found
  return records


def _sources(config) -> tuple[list, list]:
  """(helpful pairs, triples) of data.source synthetic, recipe or tfds, checked non-empty."""
  d = config.data
  if d.source == "synthetic":
    return synthetic.make_sources(seed=config.seed, n_helpful=d.synthetic_helpful,
                                  n_triples=d.synthetic_triples)
  if d.source == "tfds":
    helpful, triples = tfds_sources(d)
    if not triples:
      raise ValueError(f"data.tfds_dir={d.tfds_dir!r}, data.tfds_split={d.tfds_split!r}: "
                       "no triples")
    return helpful, triples
  helpful = (_records(data.load_helpful, "helpful_path", d.helpful_path, d.source)
             if d.helpful_path else [])
  return helpful, _records(data.load_triples, "triples_path", d.triples_path, d.source)


def training_data(config, workdir: Path):
  """(tokenizer, recipe(epoch) -> examples, refusal ids) from config.data and config.loss."""
  d = config.data
  if d.source not in SOURCES:
    raise ValueError(f"data.source={d.source!r}; choose one of {SOURCES}")
  if d.source == "upstream":
    examples = _records(data.load_upstream, "upstream_path", d.upstream_path, d.source)
  else:
    helpful, triples = _sources(config)
  tokenizer = data.load_tokenizer(tokenizer_path(config, workdir))
  ids = refusal_ids(config, tokenizer)
  if d.source == "upstream":
    return tokenizer, (lambda epoch: examples), ids
  counts = {k: v for k, v in (("rto", d.n_rto), ("prefix", d.n_prefix),
                              ("vanilla", d.n_vanilla), ("pair", d.n_pair),
                              ("harm", d.n_harm)) if v >= 0 and k in
            dict(data.RECIPES.get(d.recipe, ()))}
  template = templates.resolve(d.template, tokenizer)
  eos_text = d.eos_text or getattr(template, "eos_text", tokenizer.decode([tokenizer.eos_id]))

  def recipe(epoch):
    return data.build_recipe(d.recipe, triples=triples, helpful=helpful, seed=config.seed,
                             epoch=epoch, counts=counts, template=template,
                             eos_text=eos_text, separator=templates.separator(template),
                             after_prefix=d.after_prefix,
                             prefix_mode=d.prefix_mode, static=d.static_prefix,
                             tokenizer=tokenizer)

  return tokenizer, recipe, ids
