"""Two processes joined by jax.distributed (4 fake CPU devices each) train, checkpoint and
resume through run.py exactly like one process on 8 devices."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from derta_jax.data import synthetic

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
# A constant lr without warmup: the schedule does not depend on train.num_steps.
FLAGS = ("--config=" + str(ROOT / "configs" / "toy_cpu.py"), "--config.mode=train",
         "--config.train.log_every=1",
         "--config.optim.schedule=constant", "--config.optim.warmup_ratio=0.0",
         "--config.ckpt.every_steps=3")
COMPARED = ("loss", "mle_loss", "rto_loss", "grad_norm")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args, *, devices: int, log: Path) -> subprocess.Popen:
  # Less LLVM optimisation halves compile time, the bulk of this test; all runs share it.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"))
  with open(log, "w") as out:
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def _finish(procs: dict[Path, subprocess.Popen], timeout_s: float = TIMEOUT_S) -> None:
  """Waits for all; on a failure or timeout kills the rest and shows every log's tail."""
  deadline = time.monotonic() + timeout_s
  try:
    codes = [p.wait(timeout=max(deadline - time.monotonic(), 0)) for p in procs.values()]
  except subprocess.TimeoutExpired:
    codes = None
    for p in procs.values():  # workers dump every thread's stack (multihost_worker.py)
      if p.poll() is None:
        p.send_signal(signal.SIGUSR1)
    time.sleep(2)
  finally:
    for p in procs.values():
      p.kill()
  if codes is None or any(codes):
    logs = "\n".join(f"--- {log} (exit {p.returncode}):\n{log.read_text()[-8000:]}"
                     for log, p in procs.items())
    raise AssertionError(f"exit codes {codes} (None: timed out after {timeout_s} s)\n{logs}")


def _run_workers(tmp_path: Path, name: str, flags, num_processes: int = 2,
                 timeout_s: float = TIMEOUT_S) -> None:
  address = f"127.0.0.1:{_free_port()}"
  logs = [tmp_path / f"{name}.{i}.log" for i in range(num_processes)]
  _finish({log: _start([ROOT / "tests" / "multihost_worker.py", address, num_processes, i,
                        *flags], devices=4, log=log) for i, log in enumerate(logs)}, timeout_s)


def _metrics(workdir: Path) -> dict[int, dict]:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records]
  assert len(set(steps)) == len(steps), f"steps logged twice: {steps}"
  return {r["step"]: r for r in records}


def _checkpoints(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())


def test_checkpoint_barriers_do_not_race_the_step_collectives(tmp_path):
  """An async save's thread meets the other hosts at Orbax barriers while the main thread
  runs steps with cross-process collectives. Orbax's default barrier is itself a collective
  (a psum over every device): the two hosts can order it and a step differently and then
  wait on each other forever (CI once hung so after a save). A Checkpointer in a
  multi-process run puts the barriers on JAX's coordination service; with the default this
  test hangs (seen each of the 4 times tried here)."""
  _run_workers(tmp_path, "race", ("--barrier-race", tmp_path / "ckpt"), timeout_s=120)


def test_two_processes_train_and_resume_like_one(tmp_path):
  ref, multi = tmp_path / "ref", tmp_path / "multi"
  # The reference runs alongside the others (compiling is mostly single-threaded).
  ref_log = tmp_path / "ref.log"
  ref_proc = _start([ROOT / "run.py", *FLAGS, "--config.train.num_steps=10", f"--workdir={ref}"],
                    devices=8, log=ref_log)
  try:
    # Two processes would write <workdir>/tokenizer at once; they read one written here.
    flags = (*FLAGS, f"--workdir={multi}", "--config.data.tokenizer_path="
             + synthetic.write_tokenizer(tmp_path / "tokenizer"))
    _run_workers(tmp_path, "first", (*flags, "--config.train.num_steps=6"))
    assert _checkpoints(multi) == [3, 6] and sorted(_metrics(multi)) == list(range(1, 7))
    _run_workers(tmp_path, "resumed", (*flags, "--config.train.num_steps=10"))
  finally:
    _finish({ref_log: ref_proc})

  want, got = _metrics(ref), _metrics(multi)
  assert sorted(want) == sorted(got) == list(range(1, 11))  # so the rerun began at step 7
  for key in COMPARED:
    np.testing.assert_allclose([got[s][key] for s in want], [want[s][key] for s in want],
                               rtol=1e-5, err_msg=key)
  assert _checkpoints(multi) == [9, 10] and (multi / "hf" / "model.safetensors").exists()
