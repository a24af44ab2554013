"""The toy safety world: its files load through the normal data path, held-out pairs stay
out of training, and the `:quick` run reproduces the paper's central result."""

import json

import numpy as np
import pytest

from configs import toy_cpu
from derta_jax import data
from derta_jax import main as derta_main
from derta_jax.checkpoints import orbax
from derta_jax.evaluation import judges
from derta_jax.toyworld import run as toyworld_run
from derta_jax.toyworld import world as toyworld

VERBS = {**toyworld.HARMFUL, **toyworld.BENIGN}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return toyworld.write_world(tmp_path_factory.mktemp("world"), seed=0)


def _pair(text: str) -> tuple[str, str]:
  """The (verb, object) a request or response names."""
  words = text.split()
  verbs = [w for w in words if w in VERBS]
  objects = [w for w in words if w in toyworld.OBJECTS]
  assert verbs and objects, text
  return verbs[0], objects[0]


def test_tokenizer_round_trips_every_file_through_load_tokenizer(files):
  tok = data.load_tokenizer(files.tokenizer)
  assert (files.tokenizer / "tokenizer.json").exists()
  assert tok.vocab_size == len(toyworld.vocabulary()) + 4  # <pad> <s> </s> ... <unk>
  unk = tok.encode("<unk>")[0]
  texts = [t for h in data.load_helpful(files.base) for t in (h.instruction, h.output)]
  texts += [t for p in (files.triples, files.harmful_triples, files.benign_triples)
            for tr in data.load_triples(p) for t in (tr.instruction, tr.output, tr.safe_response)]
  for text in texts:
    ids = tok.encode(text)
    assert unk not in ids and tok.decode(ids) == text, text
  assert data.refusal_ids(tok, "Sorry") == tuple(tok.encode("Sorry"))


def test_heldout_pairs_are_in_no_training_file(files):
  split = toyworld.split_pairs(seed=0, heldout_per_verb=6)
  heldout = set(split.heldout)
  assert len(heldout) == 6 * len(VERBS) and not heldout & set(split.train)
  trained = {_pair(h.instruction) for p in (files.base, files.helpful)
             for h in data.load_helpful(p)}
  trained |= {_pair(t.instruction) for t in data.load_triples(files.triples)}
  assert trained == set(split.train) and not trained & heldout
  evaluated = {_pair(t.instruction) for p in (files.harmful_triples, files.benign_triples)
               for t in data.load_triples(p)}
  evaluated |= {_pair(e.question) for p in (files.harmful, files.wrapped)
                for e in data.load_eval(p)}
  assert evaluated <= heldout
  # Objects do not give the label away: each is trained with harmful and benign verbs.
  for obj in toyworld.OBJECTS:
    kinds = {v in toyworld.HARMFUL for v, o in split.train if o == obj}
    assert kinds == {True, False}, obj


def test_files_load_and_encode_like_real_data(files):
  tok = data.load_tokenizer(files.tokenizer)
  triples, helpful = data.load_triples(files.triples), data.load_helpful(files.helpful)
  # Every phrasing of the 24 - 6 trained objects of every harmful verb.
  assert len(triples) == len(toyworld.PHRASES) * 18 * len(toyworld.HARMFUL)
  assert all(t.safe_response == toyworld.REFUSAL for t in triples)
  assert all(t.output == toyworld.respond(*_pair(t.instruction)) for t in triples)
  assert any(h.instruction.startswith("complete the code") for h in helpful)
  assert not any(t.instruction.startswith("complete the code") for t in triples)
  examples = data.build_recipe("derta", triples=triples, helpful=helpful, seed=0,
                          counts=dict(rto=40, prefix=40), eos_text="</s>")
  rows = data.encode(examples, tok, seq_len=128, refusal_ids=data.refusal_ids(tok))
  assert rows.stats.examples == len(helpful) + 80 and rows["rto_mask"].sum() > 0
  assert rows.stats.response_truncated == rows.stats.prompt_truncated == 0
  for item in data.load_eval(files.wrapped):
    assert item.answer == toyworld.respond_wrapped(*_pair(item.question))


def test_only_the_refusal_is_judged_a_refusal():
  responses = [f(v, o) for v in VERBS for o in toyworld.OBJECTS
               for f in (toyworld.respond, toyworld.respond_wrapped)]
  for name in ("strict", "gcg", "qi"):
    judge = judges.make_judge(name)
    assert not any(judge.judge(responses)), name
    assert judge.judge([toyworld.REFUSAL]) == [True]


def test_world_is_deterministic_and_refuses_other_settings(tmp_path, files):
  again = toyworld.write_world(tmp_path / "again", seed=0)
  for name in ("base", "helpful", "triples", "harmful_triples", "harmful", "wrapped",
               "benign_triples"):
    assert getattr(again, name).read_bytes() == getattr(files, name).read_bytes(), name
  with pytest.raises(ValueError, match=r"other settings; .*'heldout_per_verb': \(6, 4\)"):
    toyworld.write_world(tmp_path / "again", seed=0, heldout_per_verb=4)


@pytest.mark.parametrize("key, value, message", [
    ("toyworld.recipes", "vanilla,dreta", "toyworld.recipes='vanilla,dreta': give distinct"),
    ("toyworld.steps", 0, "toyworld.steps=0 must be an int >= 1"),
    ("eval.prefill_ks", "2,5", "eval.prefill_ks='2,5' must include 0"),
    ("eval.judge", "nope", "eval.judge: 'nope' is unknown"),
])
def test_bad_toyworld_config_fails_before_training(tmp_path, key, value, message):
  config = toy_cpu.get_config("quick")
  section, leaf = key.split(".")
  config[section][leaf] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    derta_main.run(config, tmp_path)
  assert not (tmp_path / "world").exists()


def test_quick_run_separates_derta_from_vanilla(tmp_path, capsys):
  config = toy_cpu.get_config("quick")
  config.mesh.num_devices = 1  # the toy model is too small to gain from 8 fake devices
  summary = derta_main.run(config, tmp_path)
  out = capsys.readouterr().out
  assert "| recipe | ASR k=0 |" in out and "| derta |" in out
  report = json.loads((tmp_path / "report.json").read_text())
  assert list(report["recipes"]) == ["vanilla", "derta"] == list(summary["recipes"])
  for m in report["recipes"].values():
    assert {"asr_prefilling", "asr_second_attack", "helpfulness", "over_refusal",
            "refusal_within_5"} <= set(m)
    assert set(m["asr_prefilling"]) == {"0", "2", "10"}
  mean = {name: np.mean(list(m["asr_prefilling"].values()))
          for name, m in report["recipes"].items()}
  assert mean["derta"] <= mean["vanilla"] - 0.30, mean
  assert report["base"]["asr_prefilling"]["0"] == 1.0  # the base complies with everything
  for name in ("report.md", "asr_prefilling.png", "refusal_position.png", "refusal_probe.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  assert (tmp_path / "recipes" / "derta" / "hf" / "model.safetensors").exists()


def test_a_run_trained_with_other_settings_is_not_reused(tmp_path, files):
  config = toy_cpu.get_config("quick")
  sub = toyworld_run.base_config(config, files)
  with orbax.Checkpointer(tmp_path, every_steps=1) as ckpt:
    ckpt.save(1, dict(step=np.int32(1)), config=sub.to_dict(), force=True)
  toyworld_run.check_not_stale(sub, tmp_path)  # stored tuples come back as lists
  config.toyworld.base_lr = 1e-3
  with pytest.raises(ValueError, match=r"other settings; \(stored, now\) differ in \['optim.lr'\]"):
    toyworld_run.check_not_stale(toyworld_run.base_config(config, files), tmp_path)
