"""One process of a multi-host run simulated on one machine; the test starts one per process.

  python tests/multihost_worker.py 127.0.0.1:PORT NUM_PROCESSES PROCESS_ID [run.py flags]

Joins the others through jax.distributed with CPU (gloo) collectives, then runs run.py with
the flags. JAX reads no process count or id from the environment, so this passes them.
"""

import faulthandler
import runpy
import signal
import sys
from pathlib import Path

import jax

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"


def main() -> None:
  address, num_processes, process_id, *flags = sys.argv[1:]
  # The test sends SIGUSR1 before killing a hung worker: every thread's stack goes to the log.
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  # Must precede the first use of the CPU backend, which happens inside run.py.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=int(num_processes),
                             process_id=int(process_id))
  sys.argv = [str(RUN_PY), *flags]
  runpy.run_path(str(RUN_PY), run_name="__main__")


if __name__ == "__main__":
  main()
