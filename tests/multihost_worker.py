"""One process of a multi-host run simulated on one machine; the test starts one per process.

  python tests/multihost_worker.py 127.0.0.1:PORT NUM_PROCESSES PROCESS_ID [run.py flags]
  python tests/multihost_worker.py 127.0.0.1:PORT NUM_PROCESSES PROCESS_ID --barrier-race DIR

Joins the others through jax.distributed with CPU (gloo) collectives, then runs run.py with
the flags, or (--barrier-race) runs Orbax barriers in a thread beside a stream of steps with
cross-process collectives, after opening a Checkpointer in DIR, as an async save does. JAX
reads no process count or id from the environment, so this passes them.
"""

import faulthandler
import runpy
import signal
import sys
import threading
from pathlib import Path

import jax

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"
RACE_BARRIERS, RACE_STEPS = 200, 800


def barrier_race(workdir: str) -> None:
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from derta_jax.checkpoints.orbax import Checkpointer

  Checkpointer(workdir, every_steps=1).close()  # sets up barriers for this process count
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), PartitionSpec("d"))
  x = jax.make_array_from_process_local_data(
      sharding, np.ones((jax.local_device_count(), 256), np.float32))
  step = jax.jit(lambda a: a * 0.5 + a.sum() / a.size, out_shardings=sharding)  # all-reduce

  def barriers():
    for i in range(RACE_BARRIERS):
      ocp.multihost.sync_global_processes(f"race_{i}")

  thread = threading.Thread(target=barriers)
  thread.start()
  for _ in range(RACE_STEPS):
    x = step(x).block_until_ready()
  thread.join()
  print(f"process {jax.process_index()}: {RACE_BARRIERS} barriers beside {RACE_STEPS} steps")


def main() -> None:
  address, num_processes, process_id, *flags = sys.argv[1:]
  # The test sends SIGUSR1 before killing a hung worker: every thread's stack goes to the log.
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  # Must precede the first use of the CPU backend, which happens inside run.py.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=int(num_processes),
                             process_id=int(process_id))
  if flags[:1] == ["--barrier-race"]:
    barrier_race(flags[1])
    return
  sys.argv = [str(RUN_PY), *flags]
  runpy.run_path(str(RUN_PY), run_name="__main__")


if __name__ == "__main__":
  main()
