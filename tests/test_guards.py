"""Nothing silent, nothing poisoned: divergence stops with a good last checkpoint, resume
checks its config, truncation is reported and bounded, eval uses the training tokenizer."""

import json
import os
import subprocess
import sys

import pytest
from conftest import set_config

from configs import toy_cpu
from derta_jax import data, lock, main
from derta_jax.data import synthetic
from derta_jax.training import guard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(mode="train", optim__schedule="constant", optim__lr=3e-3, train__log_every=1,
            ckpt__every_steps=1, ckpt__max_to_keep=0, train__num_steps=4, mesh__num_devices=1,
            mesh__fsdp=1)


def _config(**overrides):
  return set_config(toy_cpu.get_config(), **{**BASE, **overrides})


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def _resume_sanely(workdir, num_steps=4):
  """Resumes a stopped workdir at a sane lr; every loss of the resumed steps is finite."""
  summary = main.run(_config(train__num_steps=num_steps, resume__allow_changes="optim"),
                     workdir)
  assert summary["steps"] == num_steps and os.path.isdir(os.path.join(workdir, "hf"))
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, num_steps + 1))  # one row a step
  assert all(r["loss"] < 10 and r["grad_norm"] > 0 for r in rows), rows


@pytest.mark.parametrize("lr, reason", [
    (1e30, r"loss is nan at step 3 \(the loss of the params of step 2"),
    # The loss sits at ln V; its gradient is 0 or NaN, as XLA's fusions of the step round.
    (1e6, r"(dead model: gradient norm 0|gradient norm is nan) .*at step 3 \(the loss"),
])
def test_a_blow_up_stops_before_saving_its_params_and_the_named_checkpoint_resumes(
    tmp_path, lr, reason):
  workdir = str(tmp_path)
  # Warm-up: step 1 trains at lr 0, step 2 at `lr`, which blows the params up.
  blow_up = _config(optim__lr=lr, optim__schedule="cosine", optim__warmup_ratio=0.25)
  with pytest.raises(guard.DivergenceError, match=reason + r".*The last good checkpoint is "
                     r"step 1 in " + str(tmp_path / "checkpoints")):
    main.run(blow_up, workdir)
  assert _steps(workdir) == [1] and not os.path.exists(tmp_path / "hf")
  _resume_sanely(workdir)


def test_a_nan_gradient_with_a_finite_loss_stops(tmp_path):
  values = dict(loss=2.0, grad_norm=float("inf"))
  assert guard.Guard(100).problem(values) == "gradient norm is inf (loss 2)"
  assert guard.Guard(100, enabled=False).problem(values) == "gradient norm is inf (loss 2)"


def test_the_guard_finds_spikes_and_dead_models_only_where_they_are():
  g = guard.Guard(256, window=10, warmup=5)
  for loss in (2.0, 2.2, 1.9, 2.1, 2.0):
    assert g.problem(dict(loss=loss, grad_norm=1.0)) is None
    g.record(dict(loss=loss))
  assert g.problem(dict(loss=2.9, grad_norm=1.0)) is None  # noise
  assert "loss spike: 11 is over 5 x the median 2" in g.problem(dict(loss=11.0, grad_norm=1.0))
  assert guard.Guard(256, enabled=False).problem(dict(loss=5.5, grad_norm=0.0)) is None
  low = guard.Guard(256, window=10, warmup=5)
  for _ in range(5):
    low.record(dict(loss=0.02))
  assert low.problem(dict(loss=0.5, grad_norm=1.0)) is None  # 25x, but not a nat above
  assert low.problem(dict(loss=0.005, grad_norm=0.0)) is None  # memorised, not dead
  assert "dead model" in low.problem(dict(loss=3.0, grad_norm=0.0))


def test_a_resume_refuses_keys_that_change_the_trajectory_and_allows_the_rest(tmp_path):
  workdir = str(tmp_path)
  main.run(_config(train__num_steps=2), workdir)
  before = (_rows(workdir), _steps(workdir), os.listdir(tmp_path / "hf"))
  with pytest.raises(ValueError, match=r"checkpoints/2: the config differs .* trajectory: "
                     r"data.recipe: 'derta' -> 'vanilla'; seed: 0 -> 1; train.seq_len: 64 -> "
                     r"32\. .*--config.resume.allow_changes=data.recipe,seed,train.seq_len"):
    main.run(_config(train__num_steps=3, seed=1, train__seq_len=32, data__recipe="vanilla"),
             workdir)
  with pytest.raises(ValueError, match=r"the run has 1 steps, fewer than the 2 its latest"):
    main.run(_config(train__num_steps=1), workdir)
  with pytest.raises(ValueError, match=r"resume.allow_changes='sed': \['sed'\] name no"):
    main.run(_config(train__num_steps=3, seed=1, resume__allow_changes="sed"), workdir)
  assert (_rows(workdir), _steps(workdir), os.listdir(tmp_path / "hf")) == before
  summary = main.run(_config(train__num_steps=3, seed=1, train__log_every=2,
                             resume__allow_changes="seed"), workdir)
  assert summary["steps"] == 3 and summary["resumed_from"] == 2


def test_truncation_is_reported_and_a_mostly_cut_dataset_refused(tmp_path):
  with pytest.raises(ValueError, match=r"data: \d+ of 160 examples are longer than "
                     r"train.seq_len=24 .* data.max_truncated_fraction=0.05"):
    main.run(_config(train__seq_len=24), str(tmp_path / "refused"))
  assert not os.path.exists(tmp_path / "refused" / "metrics.jsonl")
  summary = main.run(_config(train__seq_len=24, train__num_steps=2,
                             data__max_truncated_fraction=1.0), str(tmp_path / "cut"))
  cut = summary["data"]
  assert cut["examples"] == 160 and cut["cut"] > 80 and cut["response_truncated"] > 0
  row = _rows(tmp_path / "cut")[0]
  assert row["cut_response"] + row["cut_prompt"] + row["cut_harmful"] > 0


def _eval_config(**overrides):
  config = toy_cpu.get_config()
  return set_config(config, mode="eval", eval__max_new_tokens=4, **overrides)


def test_eval_decodes_with_the_tokenizer_and_template_the_checkpoint_was_trained_with(tmp_path):
  # A tokenizer with the synthetic words in another order: the same text, other ids.
  words = ("how", "to", "harm", "first", "?", ",", ".", "[", "]", "[\\", "INST", "Sorry", "I",
           "cannot", "help", "with", "that", "<unk>", "/INST", *synthetic.WORDS)[::-1]
  trained_tok = synthetic.write_word_tokenizer(tmp_path / "trained_tok", words)
  workdir = tmp_path / "run"
  main.run(_config(train__num_steps=2, data__tokenizer_path=trained_tok,
                   data__template="llama2_chat"), workdir)
  questions = tmp_path / "q.jsonl"
  questions.write_text(json.dumps({"question": "how to w1 the w2 ?"}) + "\n")
  summary = main.run(_eval_config(eval__harmful_path=str(questions)), workdir)
  assert summary["tokenizer"] == trained_tok and summary["template"] == "llama2_chat"
  # The export carries the tokenizer, so <workdir>/hf evaluates on its own.
  exported = data.load_tokenizer(workdir / "hf")
  assert exported.fingerprint() == data.load_tokenizer(trained_tok).fingerprint()
  other = synthetic.write_tokenizer(tmp_path / "other_tok")
  with pytest.raises(ValueError, match=r"eval: the tokenizer .*other_tok .* is not the one this "
                     r"checkpoint was trained with \(.*trained_tok"):
    main.run(_eval_config(eval__harmful_path=str(questions), data__tokenizer_path=other),
             workdir)


@pytest.mark.parametrize("overrides, match", [
    (dict(data__source="recipe"), r"data.triples_path is unset; data.source='recipe' reads it"),
    (dict(data__source="recipe", data__triples_path="{empty}"),
     r"data.triples_path='.*empty.jsonl': .*empty.jsonl holds no records"),
    (dict(data__source="recipe", data__triples_path="{missing}"),
     r"data.triples_path='.*missing.jsonl': .*missing.jsonl is not a file"),
    (dict(data__source="upstream", data__upstream_path="{upstream},"),
     r"data.upstream_path='.*upstream.jsonl,': entry 2 of 2 is empty \(a trailing"),
    (dict(data__source="upstream"), r"data.upstream_path is unset"),
    (dict(train__global_batch=0), r"train.global_batch=0, train.seq_len=64: need"),
    (dict(data__refusal_text="Nope"), r"data.refusal_text='Nope'.*the unknown token \(id"),
    (dict(loss__refusal_ids=(9999,)), r"loss.refusal_ids=\(9999,\): ids must be ints in"),
    (dict(ckpt__max_to_keep=-1), r"ckpt.max_to_keep \(-1\) >= 0"),
    (dict(train__divergence__warmup=60), r"train.divergence.warmup \(60\) must be at most"),
])
def test_bad_data_and_train_settings_fail_naming_the_key(tmp_path, overrides, match):
  (tmp_path / "empty.jsonl").write_text("")
  (tmp_path / "upstream.jsonl").write_text(json.dumps(
      {"prefix": "[INST] how to w1 the w2 ? [\\INST]", "text": " w3 w4", "safe": "false"}) + "\n")
  files = {k: str(tmp_path / f"{k}.jsonl") for k in ("empty", "missing", "upstream")}
  overrides = {k: v.format(**files) if isinstance(v, str) else v for k, v in overrides.items()}
  with pytest.raises(ValueError, match=match):
    main.run(_config(**overrides), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_a_second_run_in_a_busy_workdir_fails_at_once_naming_the_first(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from derta_jax import lock\n"
       f"with lock.WorkdirLock({str(tmp_path)!r}, mode='train'):\n"
       "  print('held', flush=True); time.sleep(60)"],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(lock.WorkdirBusy, match=rf"{tmp_path}: in use by pid {holder.pid} "):
      main.run(_config(), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".lock"]
  finally:
    holder.kill()
    holder.wait()
