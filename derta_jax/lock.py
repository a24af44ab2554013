"""One run per workdir: an exclusive lock on `<workdir>/.lock` held for the run's lifetime.

    with WorkdirLock(workdir, mode=config.mode, enabled=jax.process_index() == 0):
      ...

Guarantees: while a run holds the lock, another run that takes it on the same workdir
fails at once with WorkdirBusy, naming the holder's pid, host, mode and start time. The
lock is an `fcntl.flock`, which the kernel drops when its process dies, however it dies
(kill -9 included), so a dead run never blocks the next one: its leftover record is taken
over with a warning. The file is never deleted (deleting a lock file races with another
process opening it); on release its record is cleared.

Not guaranteed: the lock is advisory, so only runs that take it are kept out (a shell, or
another program writing the workdir, is not). On NFS, Linux emulates flock with whole-file
POSIX locks, which work across hosts with NFSv4 (or NFSv3 with lockd); a mount with `nolock`
or `local_lock=flock` keeps locks local to each host, and a host that crashes keeps its
lock until the server's lease expires. Remote workdirs (`gs://...`, anything with "://")
cannot be locked and are skipped with a log line. In multi-process JAX runs only the
process that is given `enabled=True` (process 0) takes the lock.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from absl import logging

LOCK_NAME = ".lock"


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock; `holder` is its record (may be {})."""

  def __init__(self, workdir: str, holder: dict):
    self.workdir = workdir
    self.holder = holder
    super().__init__(f"{workdir}: in use by {_describe(holder)}; wait for it to finish or "
                     "use another --workdir")


def _describe(holder: dict) -> str:
  """'pid 1234 on host h (mode train, since ...)' from a lock record."""
  if not holder:
    return "another process (its record is not written yet)"
  if "pid" not in holder:
    return f"another process (unreadable record {holder.get('raw', '')!r})"
  return (f"pid {holder['pid']} on host {holder.get('host', '?')} "
          f"(mode {holder.get('mode', '?')}, since {holder.get('since', '?')})")


def _read_record(fd: int) -> dict:
  """The lock file's record: {} when empty, {"raw": text} when it is not a JSON object."""
  text = os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", errors="replace").strip()
  if not text:
    return {}
  try:
    record = json.loads(text)
  except json.JSONDecodeError:
    return {"raw": text}
  return record if isinstance(record, dict) else {"raw": text}


def _pid_state(holder: dict) -> str:
  """Whether the previous holder's pid exists, as far as this host can tell."""
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return "its pid is unknown"
  if holder.get("host") != socket.gethostname():
    return f"it ran on another host ({holder.get('host', '?')}), so it was not looked up"
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return f"pid {pid} no longer exists on this host"
  except PermissionError:
    pass  # exists, owned by another user
  # Alive but not holding the lock: the pid was reused, or it dropped the lock and lives on.
  return f"pid {pid} still exists on this host but does not hold the lock"


class WorkdirLock:
  """Context manager holding `<workdir>/<name>` (the workdir exists); WorkdirBusy if held.
  `mode` is recorded for whoever finds the workdir busy; `enabled=False` is a no-op. Runs
  that may share a workdir (training, and evaluation of its checkpoints) take locks of
  different names."""

  def __init__(self, workdir: str | os.PathLike, *, mode: str, enabled: bool = True,
               name: str = LOCK_NAME):
    self.workdir = str(workdir)
    self.mode = mode
    self.enabled = enabled
    self.remote = "://" in self.workdir
    self.path = None if self.remote else Path(self.workdir) / name
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> None:
    """Take the lock (non-blocking), take over a dead holder's record, write ours."""
    if self._fd is not None:
      raise RuntimeError(f"{self.workdir}: this WorkdirLock is already held")
    if not self.enabled:
      return
    if self.remote:
      logging.info("%s is remote: no workdir lock is taken (another run may write it)",
                   self.workdir)
      return
    # No O_TRUNC: the file may hold a live holder's record, read below for the error.
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_record(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirBusy(self.workdir, holder) from None
      raise
    try:
      previous = _read_record(fd)
      if previous:
        logging.warning("%s: taking over the lock left by %s, which died or is gone (%s)",
                        self.workdir, _describe(previous), _pid_state(previous))
      self._write(fd)
    except BaseException:
      os.close(fd)  # closing drops the flock
      raise
    self._fd = fd

  def _write(self, fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "mode": self.mode,
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    os.fsync(fd)

  def release(self) -> None:
    """Clear our record, unlock and close; the file stays. A no-op when not held."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      # Clear before unlocking: afterwards the file may already hold the next run's record.
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
