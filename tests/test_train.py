"""The jitted train step on its own: k micro-batches equal one k-times-larger batch.

Learning, mesh parity and resume are tested through the loop in test_train_loop.py."""

import jax
import numpy as np

from derta_jax import losses, optim
from derta_jax.models import llama
from derta_jax.training import step as train

REFUSAL = 7


def _batch(config, rows=8, t=32, seed=0):
  """Packed-like rows: a prompt, then an MLE or an RTO response, then padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, config.vocab_size, (rows, t)).astype(np.int32)
  batch = {k: np.zeros((rows, t), np.int32) for k in ("targets", "mle_mask", "rto_mask",
                                                      "segment_ids", "positions")}
  batch["input_ids"] = ids
  for r in range(rows):
    prompt, length = int(rng.integers(3, 10)), int(rng.integers(16, t + 1))
    batch["segment_ids"][r, :length] = 1
    batch["positions"][r, :length] = np.arange(length)
    batch["targets"][r, :length - 1] = ids[r, 1:length]
    kind = "rto_mask" if r % 3 == 1 else "mle_mask"
    batch[kind][r, prompt - 1:length - 1] = 1
  return batch


def _setup(mesh=None, micro_batches=1, seed=0):
  config = llama.preset("tiny")
  model = llama.init_model(config, seed=seed)
  tx, schedule = optim.make_optimizer(lr=3e-3, num_steps=20, schedule="constant",
                                      weight_decay=0.01, clip_norm=1.0, eps=1e-3)
  graphdef, state, shardings = train.init_state(model, tx, mesh)
  loss_config = losses.LossConfig(refusal_ids=(REFUSAL,), chunk_size=16)
  step = train.make_train_step(graphdef, tx, schedule, loss_config, micro_batches=micro_batches)
  return config, state, train.jit_train_step(step, shardings, mesh)


def test_gradient_accumulation_equals_the_full_batch():
  config, full, full_step = _setup()
  _, accum, accum_step = _setup(micro_batches=4)
  batch = _batch(config)
  full, m1 = full_step(full, batch)
  accum, m2 = accum_step(accum, batch)
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(accum["params"]), jax.tree.leaves(full["params"]),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
