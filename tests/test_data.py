"""Prefix sampler, recipes, tokenizers, encoding and the batch pipeline."""

import collections
import json
import os

import numpy as np
import pytest
from conftest import llama3_tokenizer_path

from derta_jax import data, losses
from derta_jax.data import packing, pipeline, sampler, tokenize
from derta_jax.data.records import DataError, Example, Helpful, Triple

WORDS = ("the plan needs a rope , a map and 3 friends ; then wait until night . "
         "Überraschung: café naïve 42% — ok? yes!\nnext line\ttab").split(" ")


_llama3_tokenizer_path = llama3_tokenizer_path  # the subprocess below imports it from here


@pytest.fixture(scope="module")
def llama3():
  return tokenize.load_tokenizer(_llama3_tokenizer_path())


def _text(rng, n):
  return " ".join(rng.choice(WORDS, n))


def _triples(n, seed=0):
  rng = np.random.default_rng(seed)
  return [Triple(f"How do I do bad thing {i}?", _text(rng, int(rng.integers(1, 40))),
                 "I'm sorry, I cannot help with that. " + _text(rng, 5)) for i in range(n)]


def _helpful(n, seed=1):
  rng = np.random.default_rng(seed)
  return [Helpful(f"Tell me about topic {i}.", _text(rng, int(rng.integers(5, 60))))
          for i in range(n)]


# --------------------------------------------------------------------------- sampler


def test_official_word_gives_k0_for_a_third_and_uniform_k_otherwise():
  n = 30000
  lengths = np.full(n, 12)  # k ~ U[1, 10]
  k = sampler.sample_prefix_lengths(lengths, seed=0, epoch=0, mode="official_word")
  ids = np.arange(n)
  assert np.all(k[ids % 3 == 0] == 0)
  assert np.mean(k == 0) == pytest.approx(1 / 3, abs=0)
  others = k[ids % 3 != 0]
  assert others.min() >= 1 and others.max() <= 10
  counts = np.bincount(others, minlength=11)[1:]
  expected = len(others) / 10
  chi2 = float(np.sum((counts - expected) ** 2 / expected))
  assert chi2 < 27.88, (chi2, counts)  # chi-square, 9 dof, p = 0.001
  # Mixed lengths: k stays in [1, n - 2]; n < 3 gives 0 (upstream drops those rows).
  lengths = np.random.default_rng(0).integers(0, 50, 3000)
  k = sampler.sample_prefix_lengths(lengths, seed=3, epoch=0, mode="official_word")
  cut = (np.arange(3000) % 3 != 0) & (lengths >= 3)
  assert np.all((k[cut] >= 1) & (k[cut] <= lengths[cut] - 2))
  assert np.all(k[~cut] == 0)


def test_prefix_lengths_are_a_pure_function_of_seed_epoch_and_id():
  lengths = np.random.default_rng(1).integers(3, 80, 500)
  draw = lambda **kw: sampler.sample_prefix_lengths(  # noqa: E731
      kw.pop("lengths", lengths), seed=kw.pop("seed", 0), **kw)
  base = draw(epoch=0)
  np.testing.assert_array_equal(draw(epoch=0), base)
  assert not np.array_equal(draw(epoch=1), base)
  assert not np.array_equal(draw(epoch=0, seed=1), base)
  np.testing.assert_array_equal(draw(epoch=1, static=True), draw(epoch=7, static=True))
  # A subset of the ids, in another order, gets the same k's.
  pick = np.random.default_rng(2).permutation(500)[:50]
  np.testing.assert_array_equal(draw(epoch=0, lengths=lengths[pick], example_ids=pick),
                                base[pick])


def test_token_and_fixed_modes():
  lengths = np.random.default_rng(1).integers(0, 200, 20000)
  k = sampler.sample_prefix_lengths(lengths, seed=0, mode="token", p=0.5, max_k=64)
  assert np.all(k <= np.minimum(lengths, 64))
  assert np.mean(k[lengths > 0] > 0) == pytest.approx(0.5, abs=0.02)
  assert np.all(k[lengths == 0] == 0)
  np.testing.assert_array_equal(
      sampler.sample_prefix_lengths([5, 6], seed=0, mode="fixed", fixed=[0, 6]), [0, 6])
  with pytest.raises(ValueError, match="fixed"):
    sampler.sample_prefix_lengths([5, 6], seed=0, mode="fixed", fixed=[0, 7])
  with pytest.raises(ValueError, match="mode='words'"):
    sampler.sample_prefix_lengths([5], seed=0, mode="words")


# --------------------------------------------------------------------------- recipes


def _upstream_lines(triples, helpful, name, ks):
  """The authors' script's records for a recipe, given the k per triple."""
  tmpl = "[INST] {} [\\INST]"
  helpful_rows = [{"prefix": tmpl.format(h.instruction),
                   "text": f" {h.output}<|end_of_text|>", "safe": "false"}
                  for h in helpful]
  rto = [{"prefix": tmpl.format(t.instruction), "text": " " + t.output + "<|end_of_text|>",
          "safe": "true"} for t in triples]
  res = [" " + t.safe_response + "<|end_of_text|>" for t in triples]
  concat = [{"prefix": tmpl.format(t.instruction) + " " + " ".join(t.output.split(" ")[:k]),
             "text": r, "safe": "false"} for t, r, k in zip(triples, res, ks, strict=True)]
  vanilla = [{"prefix": tmpl.format(t.instruction), "text": r, "safe": "false"}
             for t, r in zip(triples, res, strict=True)]
  parts = dict(vanilla=helpful_rows + vanilla[:6000], recaug=helpful_rows + concat[:6000],
               derta=helpful_rows + rto[:3000] + concat[:3000])
  return [json.dumps(r) + "\n" for r in parts[name]]


@pytest.mark.parametrize("name", ["vanilla", "recaug", "derta"])
def test_recipes_write_the_authors_records(tmp_path, name):
  triples = [t for t in _triples(6100) if len(t.output.split(" ")) >= 3]
  helpful = _helpful(40)
  examples = data.build_recipe(name, triples=triples, helpful=helpful, seed=5, epoch=2)
  ks = sampler.sample_prefix_lengths([len(t.output.split(" ")) for t in triples], seed=5,
                                     epoch=2)
  path = tmp_path / "recipe.jsonl"
  data.write_upstream(examples, path)
  assert path.read_text().splitlines(keepends=True) == _upstream_lines(triples, helpful, name,
                                                                       ks)


def test_recipe_sizes_and_ablations(llama3):
  triples, helpful = _triples(7000), _helpful(30)
  expected = {"vanilla": dict(safe=6000), "recaug": dict(safe=6000),
              "derta": dict(rto=3000, safe=3000), "harmful_prefix": dict(safe=3000),
              "rto_only": dict(rto=3000, safe=3000), "dpo": dict(pair=6000),
              "qi": dict(safe=6000), "door": dict(safe=6000, harm=6000),
              "circuit_breaker": dict(safe=6000, harm=6000)}
  assert set(expected) == set(data.RECIPES)
  for name, kinds in expected.items():
    ex = data.build_recipe(name, triples=triples, helpful=helpful, tokenizer=llama3)
    assert collections.Counter(e.kind for e in ex) == dict(kinds, mle=30), name
    # Helpful first, then the parts in the recipe's order, each from the first triple.
    assert [e.kind for e in ex[:30]] == ["mle"] * 30, name
    assert [e.prompt for e in ex[30:]] == [f"[INST] {t.instruction} [\\INST]"
                                           for _, n in data.RECIPES[name]
                                           for t in triples[:n]], name
  derta = data.build_recipe("derta", triples=triples, helpful=helpful)
  rto_prompts = [e.prompt for e in derta if e.kind == "rto"]
  prefix_prompts = [e.prompt for e in derta if e.harmful_prefix]
  assert rto_prompts == prefix_prompts == [f"[INST] {t.instruction} [\\INST]"
                                           for t in triples[:3000]]
  small = data.build_recipe("derta", triples=triples, helpful=helpful,
                            counts={"rto": 10, "prefix": 20})
  assert len(small) == 30 + 10 + 20
  with pytest.raises(ValueError, match="no 'vanilla' part"):
    data.build_recipe("derta", triples=triples, helpful=helpful, counts={"vanilla": 5})
  with pytest.raises(ValueError, match="unknown recipe"):
    data.build_recipe("orpo", triples=triples, helpful=helpful)


def test_epochs_recut_prefixes_unless_static():
  triples = _triples(300)
  cuts = lambda **kw: [e.harmful_prefix for e in data.build_recipe(  # noqa: E731
      "recaug", triples=triples, helpful=[], **kw)]
  assert cuts(epoch=0) == cuts(epoch=0)
  assert cuts(epoch=0) != cuts(epoch=1)
  assert cuts(epoch=0, static=True) == cuts(epoch=1, static=True)


# -------------------------------------------------------------------------- tokenize


def test_llama3_tokenizer_matches_meta_and_resolves_sorry(llama3):
  import pathlib

  from llama_models.llama3.tokenizer import Tokenizer

  reference = Tokenizer(pathlib.Path(_llama3_tokenizer_path()))
  rng = np.random.default_rng(0)
  texts = [_text(rng, 30) for _ in range(20)] + ["Sorry", " I'm sorry<|end_of_text|>",
                                                 "[INST] q [\\INST]  x\n\n  y"]
  for text in texts:
    assert llama3.encode(text) == reference.encode(text, bos=False, eos=False,
                                                   allowed_special="all")
  assert data.refusal_ids(llama3, "Sorry") == (19701,)
  assert (llama3.bos_id, llama3.eos_id, llama3.vocab_size) == (128000, 128001, 128256)
  with pytest.raises(ValueError, match="is 2 tokens"):
    data.refusal_ids(llama3, " I cannot")
  assert len(data.refusal_ids(llama3, " I cannot", policy="first")) == 1


def test_hf_tokenizer_directory(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "Sorry", "hello", "world"])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                          pad_token="<pad>").save_pretrained(tmp_path)
  loaded = data.load_tokenizer(tmp_path)
  assert loaded.encode("hello world </s>") == [4, 5, 2]
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 0)
  assert data.refusal_ids(loaded) == (3,)
  with pytest.raises(DataError, match="does not exist"):
    data.load_tokenizer(tmp_path / "missing")
  with pytest.raises(DataError, match="no tokenizer.json"):
    data.load_tokenizer(tmp_path / "..")


def test_encode_packs_segments_with_exact_masks(llama3):
  examples = [Example("[INST] a [\\INST]", " yes<|end_of_text|>", "mle"),
              Example("[INST] b [\\INST]", " do this<|end_of_text|>", "rto"),
              Example("[INST] c [\\INST]", " Sorry<|end_of_text|>", "mle", " step one")]
  out = data.encode(examples, llama3, seq_len=64, refusal_ids=19701)
  assert set(out) == set(packing.ARRAYS) and out["input_ids"].shape == (1, 64)
  seg, pos = out["segment_ids"][0], out["positions"][0]
  assert list(np.unique(seg)) == [0, 1, 2, 3]
  for s, example in zip((1, 2, 3), examples, strict=True):
    where = np.flatnonzero(seg == s)
    ids = out["input_ids"][0, where]
    np.testing.assert_array_equal(pos[where], np.arange(len(where)))
    assert ids[0] == llama3.bos_id
    response = llama3.encode(example.response)
    assert list(ids[-len(response):]) == response
    mask = out["rto_mask" if example.kind == "rto" else "mle_mask"][0, where]
    # Exactly the positions that predict a response token.
    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(len(where) - len(response) - 1,
                                                                  len(where) - 1))
    targets = out["targets"][0, where][mask == 1]
    expected = [19701] * len(response) if example.kind == "rto" else response
    assert list(targets) == expected
  assert not np.any(out["mle_mask"] & out["rto_mask"])
  assert out.stats.rows == 1 and out.stats.tokens == int((seg > 0).sum())
  single = data.encode(examples, llama3, seq_len=64, pack=False)
  assert single["input_ids"].shape == (3, 64) and set(np.unique(single["segment_ids"])) == {0, 1}


def test_truncation_cuts_harmful_prefix_then_response_never_all_of_it(llama3):
  ex = Example("[INST] question here [\\INST]", " " + " ".join(["word"] * 30),
               "mle", " harmful " * 20)
  parts = packing.tokenize_examples([ex], llama3)[0]
  n_prompt, n_harm, n_resp, n_rejected = map(len, parts)
  assert n_rejected == 0
  stats = packing.EncodeStats()
  fitted = packing.fit_example(parts, 1 + n_prompt + n_resp + 5, stats)
  assert list(map(len, fitted)) == [n_prompt, 5, n_resp, 0]
  assert stats.harmful_prefix_shortened == 1
  fitted = packing.fit_example(parts, 1 + n_prompt + 3, stats)
  assert list(map(len, fitted)) == [n_prompt, 0, 3, 0] and stats.response_truncated == 1
  fitted = packing.fit_example(parts, 4, stats)
  assert list(map(len, fitted)) == [2, 0, 1, 0] and stats.prompt_truncated == 1
  out = data.encode([ex] * 3, llama3, seq_len=1 + n_prompt + 3)
  assert out.stats.harmful_prefix_shortened == 3 and out.stats.response_truncated == 3
  assert int(out["mle_mask"].sum()) == 3 * 3


def test_encode_matches_the_authors_preprocessing(tmp_path, llama3):
  """Upstream: ids = [BOS] + tok(prefix + text); labels masked on [BOS] + tok(prefix);
  RTO rows relabelled to 19701; position t predicts label t + 1."""
  triples, helpful = _triples(600), _helpful(200)
  path = tmp_path / "derta.jsonl"
  rows = data.build_recipe("derta", triples=triples, helpful=helpful,
                           counts={"rto": 300, "prefix": 300})
  # Rows the recipes never make, where a token spans prefix and text: " can" + "not" is
  # " cannot" in one string, and "Do" + "n't" is "Don" + "'t".
  merging = [Example("[INST] q [\\INST] I can", "not help<|end_of_text|>", "mle"),
             Example("[INST] q [\\INST] Do", "n't do it<|end_of_text|>", "rto")]
  data.write_upstream(rows + merging, path)
  rows = list(data.load_upstream(path))
  out = data.encode(rows, llama3, seq_len=1024, refusal_ids=19701, pack=False)
  differ = 0
  for r, ex in enumerate(rows):
    ids = [llama3.bos_id] + llama3.encode(ex.prompt + ex.response)
    n_prefix = 1 + len(llama3.encode(ex.prompt))
    labels = np.array(ids)
    labels[:n_prefix] = -100
    if ex.kind == "rto":
      labels[labels != -100] = 19701
    supervised = np.flatnonzero(labels[1:] != -100)
    ours = np.flatnonzero(out["mle_mask"][r] | out["rto_mask"][r])
    same = (np.array_equal(supervised, ours)
            and np.array_equal(out["targets"][r, ours], labels[1:][supervised]))
    boundary = tokenize.upstream_boundary_differs(ex.prompt, ex.response, llama3)
    assert same != boundary, (r, ex)
    differ += boundary
  # Exactly the two merging rows differ; every recipe row agrees.
  assert differ == 2


def test_batches_are_identical_across_processes_of_python(llama3):
  code = ("import hashlib, sys; sys.path.insert(0, 'tests'); import test_data as t; "
          "from derta_jax.data import packing, tokenize; "
          "p = t._pipeline(tokenize.load_tokenizer(t._llama3_tokenizer_path())); "
          "b = p.batch(5); print(hashlib.sha256(b''.join(b[k].tobytes() for k in sorted(b)))"
          ".hexdigest())")
  import hashlib
  import subprocess
  import sys

  runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__))
                         ).stdout.strip() for _ in range(2)}
  b = _pipeline(llama3).batch(5)
  assert runs == {hashlib.sha256(b"".join(b[k].tobytes() for k in sorted(b))).hexdigest()}


# -------------------------------------------------------------------------- pipeline


def _pipeline(llama3, **kwargs):
  triples, helpful = _triples(300), _helpful(200)
  recipe = lambda epoch: data.build_recipe(  # noqa: E731
      "derta", triples=triples, helpful=helpful, seed=1, epoch=epoch,
      counts={"rto": 150, "prefix": 150})
  kwargs = dict(dict(seq_len=256, global_batch=8, seed=4, refusal_ids=19701, process_index=0,
                     process_count=1), **kwargs)
  return pipeline.Pipeline(recipe, llama3, **kwargs)


def test_pipeline_is_a_function_of_seed_and_step(llama3):
  a, b = _pipeline(llama3), _pipeline(llama3)
  steps = a.steps_in_epoch(0)
  assert steps >= 3
  for step in (0, 1, steps - 1, steps, steps + 2):
    for key, value in a.batch(step).items():
      np.testing.assert_array_equal(b.batch(step)[key], value, err_msg=f"{step} {key}")
  # A fresh pipeline asked for a late step directly (a resumed run) gives the same rows.
  resumed = _pipeline(llama3)
  np.testing.assert_array_equal(resumed.batch(steps + 2)["input_ids"],
                                a.batch(steps + 2)["input_ids"])
  assert not np.array_equal(_pipeline(llama3, seed=5).batch(0)["input_ids"],
                            a.batch(0)["input_ids"])


def test_process_slices_partition_the_global_batch(llama3):
  whole = _pipeline(llama3).global_batch_at(3)
  slices = [_pipeline(llama3, process_index=p, process_count=4).batch(3) for p in range(4)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), whole[key])
  with pytest.raises(ValueError, match=r"global_batch \(8\) must be divisible .* \(3\)"):
    _pipeline(llama3, process_index=0, process_count=3)


def test_epochs_resample_prefixes_and_batches_feed_the_loss(llama3):
  p = _pipeline(llama3)
  cut = lambda e: sorted(len(f[1]) for f, kind in zip(p.epoch(e).fitted, p.epoch(e).kinds,  # noqa: E731
                                                       strict=True) if kind == "safe")
  assert cut(0) != cut(1)
  batch = p.batch(p.steps_in_epoch(0))  # the first step of epoch 1
  assert p.locate(p.steps_in_epoch(0)) == (1, 0)
  efficiency = float((batch["segment_ids"] > 0).mean())
  assert efficiency > 0.8
  logits = np.zeros((*batch["targets"].shape, llama3.vocab_size), np.float32)
  loss, metrics = losses.derta_loss(logits_BxTxV=logits, batch=batch, refusal_ids=19701)
  assert float(loss) == pytest.approx(np.log(llama3.vocab_size), rel=1e-6)
  assert float(metrics["rto_tokens"]) > 0 and float(metrics["mle_tokens"]) > 0
