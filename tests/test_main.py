"""run.py end to end: the default config's train mode, a TPU config on a tiny checkpoint,
config errors (the default's toyworld mode: test_toyworld.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd):
  return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def _summary(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_config_trains_checkpoints_and_exports(tmp_path):
  # No --config: configs/toy_cpu.py, workdir runs/toy_cpu.
  summary = _summary(_run("--config.mode=train", cwd=tmp_path))
  workdir = tmp_path / "runs" / "toy_cpu"
  assert summary["mode"] == "train" and summary["steps"] == summary["num_steps"] == 60
  assert summary["rto_loss"] < 1.0 and summary["loss"] < 5.0  # log(256) = 5.5 at the start
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["40", "60"]
  assert (workdir / "hf" / "model.safetensors").exists()
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
  assert {"step", "loss", "mle_loss", "rto_loss", "lr", "grad_norm", "tokens_per_s"} <= set(
      records[0])
  assert list((workdir / "tensorboard").iterdir())


def test_export_variant_round_trips(tmp_path):
  summary = _summary(_run("--config=" + str(ROOT / "configs" / "toy_cpu.py") + ":export",
                          cwd=tmp_path))
  assert summary["reload_max_abs_param_diff"] == 0.0
  assert summary["reload_max_abs_logit_diff"] < 1e-5
  assert summary["files"] == ["config.json", "generation_config.json", "model.safetensors"]
  assert (tmp_path / "runs" / "toy_cpu" / "hf" / "model.safetensors").exists()


def test_tpu_config_on_a_small_checkpoint_over_8_devices(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint(max_shard_size="20KB")
  summary = _summary(_run("--config=" + str(ROOT / "configs" / "llama3_tpu.py") + ":export",
                          f"--config.init.hf_path={path}", "--config.model.preset=",
                          # splash is TPU-only (and needs 128-multiple blocks): einsums on CPU
                          "--config.model.attention=xla",
                          f"--workdir={tmp_path / 'work'}", cwd=tmp_path))
  assert summary["params"] > 0 and "model.safetensors" in summary["files"]
  cfg = json.loads((tmp_path / "work" / "hf" / "config.json").read_text())
  assert cfg["dtype"] == "bfloat16" and cfg["num_hidden_layers"] == 3


def test_checkpoint_that_is_not_the_preset(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint()
  proc = _run("--config=" + str(ROOT / "configs" / "llama3_tpu.py") + ":export",
              f"--config.init.hf_path={path}", f"--workdir={tmp_path}", cwd=tmp_path)
  assert proc.returncode != 0
  assert "is not model.preset='llama3_8b'" in proc.stderr
  assert "'n_layers': (32, 3)" in proc.stderr
  assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("flag, message", [
    ("--config.modle.preset=tiny", "modle"),
    ("--config.mode=serve",
     "config.mode='serve'; choose one of ('train', 'export', 'compile', 'eval', 'toyworld', "
     "'realmodel')"),
    ("--config.model.preset=llama9", "unknown model preset 'llama9'"),
])
def test_bad_config_values_fail_clearly(tmp_path, flag, message):
  proc = _run(flag, f"--workdir={tmp_path}", cwd=tmp_path)
  assert proc.returncode != 0 and message in proc.stderr
