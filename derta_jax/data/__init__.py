"""DeRTa data, from files to batches: the authors' formats (JSONL and ArrayRecord), templates,
recipes, seeded prefix cuts, tokenizing and packing, and the host-sharded batch of each step."""

from derta_jax.data.formats import (
           load_eval,
           load_helpful,
           load_triples,
           load_upstream,
           write_eval,
           write_helpful,
           write_triples,
           write_upstream,
)
from derta_jax.data.packing import encode
from derta_jax.data.pipeline import Pipeline
from derta_jax.data.recipes import RECIPES, build_recipe
from derta_jax.data.records import DataError, EvalItem, Example, Helpful, Triple
from derta_jax.data.sampler import sample_prefix_lengths
from derta_jax.data.templates import apply_template
from derta_jax.data.tokenize import load_tokenizer, refusal_ids

__all__ = ["RECIPES", "DataError", "EvalItem", "Example", "Helpful", "Pipeline", "Triple",
           "apply_template", "build_recipe", "encode", "load_eval", "load_helpful",
           "load_tokenizer", "load_triples", "load_upstream", "refusal_ids",
           "sample_prefix_lengths", "write_eval", "write_helpful", "write_triples",
           "write_upstream"]
