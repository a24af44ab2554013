"""The data of DeRTa's rivals: safe / harm / pair examples, their arrays, pair packing and
cutting, and the dpo, qi, door and circuit_breaker recipes."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import llama3_tokenizer_path
from test_data import _helpful, _triples

from derta_jax import data
from derta_jax.data import packing, pipeline, sampler, tokenize
from derta_jax.data.records import DataError, Example

OLD_ARRAYS = ("input_ids", "targets", "mle_mask", "rto_mask", "segment_ids", "positions")
SUPERVISED = ("mle_mask", "rto_mask", "harm_mask", "chosen_mask")
SORRY = 19701


@pytest.fixture(scope="module")
def llama3():
  return tokenize.load_tokenizer(llama3_tokenizer_path())


def _segments(kind):
  """(role, masks) of each segment an example of `kind` becomes."""
  return {"mle": [("mle", {"mle_mask"})], "safe": [("safe", {"mle_mask", "safety_mask"})],
          "rto": [("rto", {"rto_mask"})], "harm": [("harm", {"harm_mask"})],
          "pair": [("chosen", {"chosen_mask"}), ("rejected", {"harm_mask"})]}[kind]


def _check_row(out, r, examples, tokenizer):
  """Row r holds `examples` in order, every segment as the module docstring says."""
  seg = out["segment_ids"][r]
  s = 0
  for ex in examples:
    pair_seg = s + 1
    for role, masks in _segments(ex.kind):
      s += 1
      where = np.flatnonzero(seg == s)
      assert len(where) and np.all(np.diff(where) == 1), (r, s)
      response = tokenizer.encode(ex.rejected if role == "rejected" else ex.response)
      head = tokenizer.encode(ex.prompt) + tokenizer.encode(ex.harmful_prefix)
      np.testing.assert_array_equal(out["input_ids"][r, where],
                                    [tokenizer.bos_id, *head, *response])
      np.testing.assert_array_equal(out["positions"][r, where], np.arange(len(where)))
      # The positions that predict a response token, and nothing else of the segment.
      supervised = where[len(where) - len(response) - 1:-1]
      for mask in ("safety_mask", *SUPERVISED):
        expected = np.isin(where, supervised) if mask in masks else np.zeros(len(where))
        np.testing.assert_array_equal(out[mask][r, where], expected, err_msg=f"{r} {s} {mask}")
      np.testing.assert_array_equal(out["response_index"][r, supervised],
                                    np.arange(len(response)))
      assert not out["response_index"][r, np.setdiff1d(where, supervised)].any()
      np.testing.assert_array_equal(out["pair_ids"][r, where],
                                    np.isin(where, supervised) * (pair_seg if ex.kind == "pair"
                                                                  else 0))
      targets = [SORRY] * len(response) if role == "rto" else response
      np.testing.assert_array_equal(out["targets"][r, supervised], targets)
  assert set(np.unique(seg)) == set(range(1, s + 1)) | ({0} if (seg == 0).any() else set())


def _mixed():
  return [Example("[INST] a [\\INST]", " yes<|end_of_text|>", "mle"),
          Example("[INST] b [\\INST]", " I won't.<|end_of_text|>", "pair",
                  rejected=" Take the rope<|end_of_text|>"),
          Example("[INST] c [\\INST]", " mix it<|end_of_text|>", "harm"),
          Example("[INST] d [\\INST]", " Sorry<|end_of_text|>", "safe", " step one"),
          Example("[INST] e [\\INST]", " do this<|end_of_text|>", "rto")]


def test_every_kind_gets_its_masks_targets_and_response_index(llama3):
  examples = _mixed()
  out = data.encode(examples, llama3, seq_len=80, refusal_ids=SORRY)
  assert tuple(out) == packing.ARRAYS and out["input_ids"].shape == (1, 80)
  assert all(v.dtype == np.int32 for v in out.values())
  _check_row(out, 0, examples, llama3)
  # The pair is segments 2 (chosen) and 3 (rejected); pair_ids names the chosen one.
  assert set(np.unique(out["pair_ids"])) == {0, 2}
  masks = np.stack([out[k] for k in SUPERVISED])
  assert masks.sum(0).max() == 1  # no position is trained two ways
  assert np.all(out["safety_mask"] <= out["mle_mask"])
  assert out.stats.tokens == int((out["segment_ids"] > 0).sum())
  single = data.encode(examples, llama3, seq_len=80, refusal_ids=SORRY, pack=False)
  assert single["input_ids"].shape == (5, 80) and single.stats.rows == 5
  for r, ex in enumerate(examples):
    _check_row(single, r, [ex], llama3)
  assert set(np.unique(single["segment_ids"][1])) == {0, 1, 2}


def test_pairs_stay_whole_in_packed_rows(llama3):
  triples = _triples(120, seed=3)
  examples = data.build_recipe("dpo", triples=triples, helpful=_helpful(40),
                               counts={"pair": 120})
  lengths = [packing.unit_length(p) for p in packing.tokenize_examples(examples, llama3)]
  rows = packing.pack_rows(lengths, 192)
  out = data.encode(examples, llama3, seq_len=192)
  assert out.stats.cut == 0 and out.stats.rows == len(rows) > 10
  assert out.stats.tokens == sum(lengths) == int((out["segment_ids"] > 0).sum())
  for r, members in enumerate(rows):
    _check_row(out, r, [examples[i] for i in members], llama3)
  # Each pair's id appears in one row only, on its two segments.
  n_pairs = 0
  for r in range(len(rows)):
    for p in set(np.unique(out["pair_ids"][r])) - {0}:
      on = out["pair_ids"][r] == p
      assert set(np.unique(out["segment_ids"][r, on])) == {p, p + 1}
      assert np.array_equal(on & (out["segment_ids"][r] == p), out["chosen_mask"][r] * on)
      n_pairs += 1
  assert n_pairs == 120


def test_pipeline_keeps_pairs_together(llama3):
  triples = _triples(200, seed=4)
  recipe = lambda epoch: data.build_recipe(  # noqa: E731
      "dpo", triples=triples, helpful=_helpful(50), counts={"pair": 200})
  pipe = pipeline.Pipeline(recipe, llama3, seq_len=160, global_batch=4, seed=1,
                           process_index=0, process_count=1)
  for step in range(pipe.steps_in_epoch(0)):
    batch = pipe.batch(step)
    for r in range(4):
      segs = batch["segment_ids"][r]
      for p in set(np.unique(batch["pair_ids"][r])) - {0}:
        # Both halves are [BOS] prompt response, with the same prompt.
        heads = [batch["input_ids"][r, segs == s][:np.argmax(batch[mask][r, segs == s]) + 1]
                 for s, mask in ((p, "chosen_mask"), (p + 1, "harm_mask"))]
        assert len(heads[0]) > 3 and heads[0].tolist() == heads[1].tolist()
        assert batch["pair_ids"][r, segs == p + 1].max() == p
  assert pipe.epoch(0).stats.tokens == sum(packing.unit_length(f) for f in pipe.epoch(0).fitted)


def test_a_too_long_pair_is_cut_longer_tail_first_then_the_prompt_twice():
  prompt, chosen, rejected = list(range(10)), list(range(100, 108)), list(range(200, 220))
  parts = (prompt, [], chosen, rejected)
  lengths = lambda seq_len: [len(p) for p in packing.cut_example(parts, seq_len)[0]]  # noqa: E731
  flags = lambda seq_len: packing.cut_example(parts, seq_len)[1]  # noqa: E731
  assert packing.unit_length(parts) == 50 and packing.cut_example(parts, 50) == (parts, 0)
  assert lengths(40) == [10, 0, 8, 10] and flags(40) == 2  # the rejected tail only
  assert lengths(30) == [10, 0, 4, 4] and flags(30) == 2  # down to equal, then both
  assert lengths(29) == [10, 0, 4, 3]  # on a tie, the rejected one first
  assert lengths(24) == [10, 0, 1, 1] and flags(24) == 2
  # Each prompt token cut saves two: 8 more to save takes 4, 9 takes 5.
  assert lengths(16) == [6, 0, 1, 1] and flags(16) == 6
  assert lengths(15) == [5, 0, 1, 1]
  (p, _, c, r), _ = packing.cut_example(parts, 30)
  assert (p, c, r) == (prompt, chosen[:4], rejected[:4])  # tails cut, prompt head cut
  assert packing.cut_example(parts, 16)[0][0] == prompt[4:]
  for seq_len in range(6, 51):
    assert packing.unit_length(packing.cut_example(parts, seq_len)[0]) <= seq_len
  with pytest.raises(ValueError, match="seq_len=5"):
    packing.cut_example(parts, 5)


def test_cut_pairs_are_counted_and_fit_one_row(llama3):
  long = " ".join(["word"] * 60)
  ex = Example("[INST] " + "question " * 20 + "[\\INST]", " " + long, "pair",
               rejected=" harmful " + long)
  out = data.encode([ex, ex], llama3, seq_len=40)
  assert out.stats.response_truncated == 2 and out.stats.prompt_truncated == 2
  assert out.stats.rows == 2 and np.all(out["segment_ids"].max(1) == 2)
  assert np.all(out["chosen_mask"].sum(1) >= 1) and np.all(out["harm_mask"].sum(1) >= 1)


def test_example_kinds_are_checked():
  with pytest.raises(ValueError, match="rejected"):
    Example("p", "r", "pair")
  with pytest.raises(ValueError, match="harmful_prefix"):
    Example("p", "r", "pair", " step", rejected="x")
  with pytest.raises(ValueError, match="only kind 'pair'"):
    Example("p", "r", "harm", rejected="x")
  with pytest.raises(ValueError, match="choose one of"):
    Example("p", "r", "dpo")

  class Blank:  # a tokenizer that has no tokens for whitespace
    def encode_batch(self, texts):
      return [[1] if t.strip() else [] for t in texts]

  with pytest.raises(DataError, match="rejected response ' ' encodes to no tokens"):
    packing.tokenize_examples([Example("p", "r", "pair", rejected=" ")], Blank())


@pytest.mark.parametrize("name", ["derta", "vanilla"])
def test_safe_examples_leave_the_derta_arrays_as_they_were(llama3, name):
  examples = data.build_recipe(name, triples=_triples(100), helpful=_helpful(30), seed=2,
                               counts={part: 100 for part, _ in data.RECIPES[name]})
  as_mle = [dataclasses.replace(e, kind="mle") if e.kind == "safe" else e for e in examples]
  assert {e.kind for e in examples} - {"rto"} == {"mle", "safe"}
  for pack in (True, False):
    new, old = (data.encode(ex, llama3, seq_len=96, refusal_ids=SORRY, pack=pack)
                for ex in (examples, as_mle))
    for key in OLD_ARRAYS:
      np.testing.assert_array_equal(new[key], old[key], err_msg=key)
    for key in ("harm_mask", "chosen_mask", "pair_ids"):
      assert not new[key].any(), key
    assert not old["safety_mask"].any()
    # safety_mask: the mle positions of the safety examples, which the same rows show as
    # the only mle positions once the helpful examples are taken out of MLE.
    no_helpful = [dataclasses.replace(e, kind="harm") if e.kind == "mle" else e
                  for e in examples]
    np.testing.assert_array_equal(
        new["safety_mask"],
        data.encode(no_helpful, llama3, seq_len=96, refusal_ids=SORRY, pack=pack)["mle_mask"])
    assert np.all(new["safety_mask"] <= new["mle_mask"])
    assert new["mle_mask"].sum() > new["safety_mask"].sum() > 0
    supervised = new["mle_mask"] | new["rto_mask"]
    assert not new["response_index"][supervised == 0].any()


def test_qi_cuts_harmful_prefixes_in_tokens(llama3):
  triples, helpful = _triples(300, seed=5), _helpful(10)
  qi = data.build_recipe("qi", triples=triples, helpful=helpful, seed=3, epoch=1,
                         tokenizer=llama3, counts={"prefix": 300})
  assert qi == data.build_recipe("recaug", triples=triples, helpful=helpful, seed=3, epoch=1,
                                 tokenizer=llama3, counts={"prefix": 300}, prefix_mode="token")
  assert qi != data.build_recipe("recaug", triples=triples, helpful=helpful, seed=3, epoch=1,
                                 counts={"prefix": 300})
  ids = [llama3.encode(t.output) for t in triples]
  ks = sampler.sample_prefix_lengths([len(i) for i in ids], seed=3, epoch=1, mode="token")
  cuts = [e.harmful_prefix for e in qi[10:]]
  assert cuts == [" " + llama3.decode(i[:k]).lstrip(" ") if k else ""
                  for i, k in zip(ids, ks, strict=True)]
  assert sum(map(bool, cuts)) > 100
  with pytest.raises(ValueError, match="recipe 'qi' cuts harmful prefixes in tokens"):
    data.build_recipe("qi", triples=triples, helpful=helpful)


def test_rival_recipes_pair_and_harm_texts():
  triples = _triples(20)
  kw = dict(triples=triples, helpful=[], eos_text="<E>")
  dpo = data.build_recipe("dpo", counts={"pair": 5}, **kw)
  assert dpo == [Example(f"[INST] {t.instruction} [\\INST]", " " + t.safe_response + "<E>",
                         "pair", rejected=" " + t.output + "<E>") for t in triples[:5]]
  door = data.build_recipe("door", counts={"prefix": 4, "harm": 4}, **kw)
  assert [e.kind for e in door] == ["safe"] * 4 + ["harm"] * 4
  assert [e.response for e in door[4:]] == [" " + t.output + "<E>" for t in triples[:4]]
  assert [e.prompt for e in door[:4]] == [e.prompt for e in door[4:]]
  cb = data.build_recipe("circuit_breaker", counts={"vanilla": 3, "harm": 3}, **kw)
  assert [(e.kind, e.response) for e in cb] == (
      [("safe", " " + t.safe_response + "<E>") for t in triples[:3]]
      + [("harm", " " + t.output + "<E>") for t in triples[:3]])
  with pytest.raises(ValueError, match="no 'harm' part"):
    data.build_recipe("dpo", counts={"harm": 3}, **kw)
  with pytest.raises(ValueError, match="unknown part 'chosen'"):
    data.build_recipe("dpo", counts={"chosen": 3}, **kw)


def test_upstream_files_hold_safe_examples_as_mle_and_refuse_harm_and_pairs(tmp_path):
  path = tmp_path / "up.jsonl"
  data.write_upstream([Example("p", " s", "safe")], path)
  assert json.loads(path.read_text())["safe"] == "false"
  assert data.load_upstream(path) == [Example("p", " s", "mle")]
  for bad in (Example("p", " h", "harm"), Example("p", " s", "pair", rejected=" h")):
    with pytest.raises(DataError, match=f"record 2: an Example of kind '{bad.kind}' has no"):
      data.write_upstream([Example("p", " s"), bad], path)
  assert data.load_upstream(path) == [Example("p", " s", "mle")]  # the old file stays


def test_tfds_stores_upstream_examples_without_the_new_kinds():
  from derta_jax.data import tfds as tfds_derta

  assert tfds_derta._to_feature_dict("upstream", Example("p", " s", "rto")) == dict(
      prompt="p", response=" s", kind="rto", harmful_prefix="")
  with pytest.raises(DataError, match="kind 'harm' cannot be stored"):
    tfds_derta._to_feature_dict("upstream", Example("p", " h", "harm"))
