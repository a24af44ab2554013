"""The training loop end to end: meshes agree, resume is exact, bad configs are named."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import set_config
from flax import nnx

from configs import toy_cpu
from derta_jax import main
from derta_jax.checkpoints import orbax
from derta_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = dict(mode="train", optim__schedule="constant", optim__lr=3e-3, train__log_every=1,
                 ckpt__every_steps=5, ckpt__max_to_keep=0)


def _config(**overrides):
  return set_config(toy_cpu.get_config(), **{**OVERRIDES, **overrides})


def _losses(workdir):
  """step -> loss from metrics.jsonl (the last line written for a step wins; a line still
  being written is left out)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, filter(lambda x: x.endswith("\n"), f))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """20 uninterrupted steps on the 1 x 8 x 1 mesh."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  summary = main.run(_config(train__num_steps=20), workdir)
  assert summary["steps"] == 20 and os.path.exists(os.path.join(workdir, "hf", "config.json"))
  return _losses(workdir)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one_device"))
  main.run(_config(train__num_steps=20, mesh__num_devices=1, mesh__fsdp=1), workdir)
  return _losses(workdir)


def _assert_same_losses(losses, expected, rtol):
  assert sorted(losses) == sorted(expected) == list(range(1, 21))
  for step, loss in losses.items():
    assert abs(loss - expected[step]) <= rtol * abs(expected[step]), (step, loss, expected[step])


def test_1x8x1_gives_the_same_losses_as_one_device(reference, one_device):
  _assert_same_losses(reference, one_device, 1e-5)
  assert reference[20] < reference[1]


def test_2x2x2_gives_the_same_losses_as_one_device(tmp_path, one_device):
  main.run(_config(train__num_steps=20, mesh__data=2, mesh__fsdp=2, mesh__tensor=2),
           str(tmp_path))
  _assert_same_losses(_losses(str(tmp_path)), one_device, 1e-5)


def test_checkpoint_from_1x8x1_continues_on_2x2x2(tmp_path, reference):
  main.run(_config(train__num_steps=10), str(tmp_path))
  summary = main.run(_config(train__num_steps=15, mesh__data=2, mesh__fsdp=2, mesh__tensor=2),
                     str(tmp_path))
  assert summary["steps"] == 15
  losses = _losses(str(tmp_path))
  for step in range(11, 16):
    assert abs(losses[step] - reference[step]) <= 1e-5 * abs(reference[step]), step


def test_sigkill_after_a_checkpoint_then_restart_is_exact(tmp_path, reference):
  workdir = str(tmp_path)
  args = [sys.executable, "run.py", f"--workdir={workdir}", "--config.train.num_steps=20"]
  args += [f"--config.{k.replace('__', '.')}={v}" for k, v in OVERRIDES.items()]
  metrics = os.path.join(workdir, "metrics.jsonl")
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and max(_losses(workdir), default=0) >= 7:
      break
    time.sleep(0.01)
  assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_losses(workdir))
  assert 7 <= killed_at < 20
  restart = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert restart.returncode == 0, restart.stderr[-3000:]
  assert json.loads(restart.stdout.strip().splitlines()[-1])["steps"] == 20
  losses = _losses(workdir)
  resumed_from = 5 * (killed_at // 5)
  for step in range(resumed_from + 1, 21):
    assert abs(losses[step] - reference[step]) <= 1e-7 * abs(reference[step]), step


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path):
  with pytest.raises(FloatingPointError, match="at step 1; stopped without saving"):
    main.run(_config(train__num_steps=5, loss__z_loss=float("nan")), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "1"))


@pytest.mark.parametrize("overrides, match", [
    (dict(mode="serve"), "config.mode='serve'"),
    (dict(data__source="web"), "data.source='web'"),
    (dict(train__global_batch=6), r"train.global_batch \(6\) must divide over"),
    (dict(optim__schedule="cosin"), "optim.schedule='cosin'"),
    (dict(mesh__tensor=3), "mesh sizes"),
    (dict(loss__normalize="mean"), "normalize='mean'"),
    (dict(data__refusal_text="I cannot"), "is 2 tokens"),
    (dict(train__micro_batches=3), "micro"),
    (dict(train__tpu_compiler_options="fast"), "train.tpu_compiler_options='fast'"),
    (dict(model__attention="splash"), "model.attention='splash' runs on TPU only"),
])
def test_bad_configs_fail_before_training_with_the_value(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    main.run(_config(train__num_steps=2, **overrides), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))


def test_init_orbax_path_starts_from_those_params(tmp_path):
  source = tmp_path / "source"
  main.run(_config(train__num_steps=5, mesh__num_devices=1), str(source))
  config = _config(train__num_steps=5, init__orbax_path=str(source / "checkpoints" / "5"))
  for name in ("run", "fresh"):
    (tmp_path / name).mkdir()
  run = loop.setup(config, tmp_path / "run")
  _, state, _, start = loop.restore_or_init(config, run)
  run.ckpt.close()
  stored = orbax.load_params(source / "checkpoints" / "5", state["params"])
  assert start == 0
  for (_, got), (_, want) in zip(nnx.to_flat_state(state["params"]),
                                 nnx.to_flat_state(stored), strict=True):
    np.testing.assert_array_equal(np.asarray(got[...]), np.asarray(want[...]))
  fresh_run = loop.setup(_config(), tmp_path / "fresh")
  fresh = loop.restore_or_init(_config(), fresh_run)[1]
  fresh_run.ckpt.close()
  assert any(not np.array_equal(np.asarray(a[...]), np.asarray(b[...])) for (_, a), (_, b) in
             zip(nnx.to_flat_state(fresh["params"]), nnx.to_flat_state(stored), strict=True))
