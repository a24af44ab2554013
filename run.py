"""derta_jax entry point: `python run.py [--config=configs/<name>.py[:arg]] [--workdir=DIR]`."""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

# Config files import each other as `configs.<name>`; run.py's folder holds `configs/`,
# also when run.py is started through runpy or from another directory.
if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).parent / "configs" / "toy_cpu.py"),
    "Config file (get_config), optionally with ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config>).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax and JAX are chatty at INFO
    logging.set_verbosity(logging.WARNING)
  from derta_jax import main as derta_main  # after flag parsing, so --help is fast

  config_name = Path(flags.FLAGS["config"].config_filename).stem
  derta_main.run(_CONFIG.value, _WORKDIR.value or Path("runs") / config_name)


if __name__ == "__main__":
  app.run(main)
