"""The workdir lock: a second run fails at once, a killed run's lock is taken over, release
always happens, remote workdirs and non-zero processes skip it."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from derta_jax import lock

ROOT = Path(__file__).resolve().parent.parent

# Takes the lock on argv[1] in another process; prints the error (and exits 3) if busy.
TAKE = """
import sys, time
from derta_jax import lock
try:
  with lock.WorkdirLock(sys.argv[1], mode="eval"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
except lock.WorkdirBusy as e:
  print(e, flush=True)
  sys.exit(3)
"""


def _take(workdir, hold_s=0.0) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", TAKE, str(workdir), str(hold_s)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def _record(workdir) -> str:
  return (Path(workdir) / ".lock").read_text()


def test_second_holder_fails_at_once_then_takes_it_after_release(tmp_path):
  with lock.WorkdirLock(tmp_path, mode="train") as held:
    assert held.held and json.loads(_record(tmp_path))["pid"] == os.getpid()
    busy = _take(tmp_path)  # a waiting lock would hang here until the timeout
    assert busy.returncode == 3, busy.stderr
    assert busy.stdout.startswith(f"{tmp_path}: in use by pid {os.getpid()} on host ")
    assert "(mode train, since " in busy.stdout and "use another --workdir" in busy.stdout
    with pytest.raises(lock.WorkdirBusy, match=f"pid {os.getpid()}"):  # in-process too
      lock.WorkdirLock(tmp_path, mode="eval").acquire()
  assert not held.held and _record(tmp_path) == ""  # cleared, not deleted
  free = _take(tmp_path)
  assert free.returncode == 0 and free.stdout == "held\n", free.stderr
  assert _record(tmp_path) == ""


def test_a_killed_holder_is_taken_over_with_a_warning(tmp_path, caplog):
  proc = subprocess.Popen([sys.executable, "-c", TAKE, str(tmp_path), "600"], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline() == "held\n"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  assert json.loads(_record(tmp_path))["pid"] == proc.pid  # its record stays behind
  with caplog.at_level(logging.WARNING):
    with lock.WorkdirLock(tmp_path, mode="train"):
      assert json.loads(_record(tmp_path))["mode"] == "train"
  assert f"taking over the lock left by pid {proc.pid} on host " in caplog.text
  assert "(mode eval, since " in caplog.text
  assert f"pid {proc.pid} no longer exists on this host" in caplog.text


def test_released_on_exception(tmp_path):
  with pytest.raises(ValueError, match="boom"):
    with lock.WorkdirLock(tmp_path, mode="train"):
      raise ValueError("boom")
  assert _record(tmp_path) == ""
  with lock.WorkdirLock(tmp_path, mode="train") as again:
    assert again.held


def test_busy_message_without_a_record_yet(tmp_path):
  with lock.WorkdirLock(tmp_path, mode="train"):
    (tmp_path / ".lock").write_text("")  # as between the holder's flock and its write
    with pytest.raises(lock.WorkdirBusy, match="its record is not written yet"):
      lock.WorkdirLock(tmp_path, mode="eval").acquire()


def test_remote_workdir_is_not_locked(tmp_path, monkeypatch, caplog):
  monkeypatch.chdir(tmp_path)
  with caplog.at_level(logging.INFO):
    with lock.WorkdirLock("gs://bucket/run", mode="train") as held:
      assert not held.held
  assert "gs://bucket/run is remote: no workdir lock is taken" in caplog.text
  assert list(tmp_path.iterdir()) == []


def test_disabled_is_a_no_op(tmp_path):
  with lock.WorkdirLock(tmp_path, mode="train", enabled=False) as held:
    assert not held.held
  assert not (tmp_path / ".lock").exists()
  with lock.WorkdirLock(tmp_path, mode="train"):  # a held run's other processes pass
    with lock.WorkdirLock(tmp_path, mode="train", enabled=False) as other:
      assert not other.held
