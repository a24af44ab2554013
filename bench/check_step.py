"""What the checked checkpoints cost: the check step (loss and gradient norm of a state, no
update) against the train step it guards, same model, same batch, XLA CPU.

  python bench/check_step.py [--repeats 5] [--layers 4] [--seq-len 512] [--batch 4]
                             [--every-steps 200]

Prints one JSON line: both medians, their ratio (check / train), and the share of training
time the checks add at one checkpoint every `--every-steps` steps (ratio / every_steps).
The check must report the loss the train step reports for the same state and batch.
"""

import argparse
import json
import os
import tempfile

from model_forward import median_seconds  # bench/ is on sys.path when run as a script
from train_step import REFUSAL_ID, _hf_model, _our_batch, _rows, add_model_args

import derta_jax
from derta_jax import losses, optim
from derta_jax.training import step as train


def _steps(path, batch):
  """(one train step, one check step of the current state) -> each its loss."""
  tx, schedule = optim.make_optimizer(lr=2e-5, num_steps=100, schedule="cosine",
                                      warmup_ratio=0.03, clip_norm=1.0)
  graphdef, state, _ = train.init_state(derta_jax.load_hf(path), tx)
  loss_config = losses.LossConfig(refusal_ids=(REFUSAL_ID,), chunk_size=512)
  train_fn = train.jit_train_step(train.make_train_step(graphdef, tx, schedule, loss_config),
                                  None, None)
  check_fn = train.jit_train_step(train.make_check_step(graphdef, schedule, loss_config),
                                  None, None, check=True)
  holder = dict(state=state)

  def train_step():
    holder["state"], metrics = train_fn(holder["state"], batch)
    return float(metrics["loss"])

  def check_step():
    return float(check_fn(holder["state"], batch)["loss"])

  return train_step, check_step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_args(parser)
  parser.add_argument("--every-steps", type=int, default=200)
  args = parser.parse_args()
  model = _hf_model(args.layers, args.seq_len)
  rows = _rows(args.batch, args.seq_len, model.config.vocab_size)
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    train_step, check_step = _steps(tmp, _our_batch(*rows))
  # Warm-up (compiles); then the check of a state must see the loss its train step sees.
  check_step(), train_step()
  checked, trained = check_step(), train_step()
  t_train, t_check = median_seconds([train_step, check_step], args.repeats)
  print(json.dumps({
      "bench": "check_step",
      "config": dict(layers=args.layers, d_model=model.config.hidden_size,
                     vocab=model.config.vocab_size, batch=args.batch, seq_len=args.seq_len),
      "train_step_s": round(t_train, 4), "check_step_s": round(t_check, 4),
      "ratio": round(t_check / t_train, 3),
      "overhead_at_every_steps": round(t_check / t_train / args.every_steps, 5),
      "every_steps": args.every_steps,
      "loss_check_vs_train_abs_diff": abs(checked - trained),
      "repeats": args.repeats, "threads": os.cpu_count(),
  }))


if __name__ == "__main__":
  main()
