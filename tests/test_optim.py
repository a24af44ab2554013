"""Optimizer: HF schedules, torch AdamW parity, clipping, decay mask, gradient accumulation."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from derta_jax import optim
from derta_jax.models import llama

HF_SCHEDULES = {"cosine": "get_cosine_schedule_with_warmup",
                "linear": "get_linear_schedule_with_warmup",
                "constant": "get_constant_schedule_with_warmup"}


def _hf_warmup_steps(num_steps, warmup_ratio):
  """transformers' own formula; in v5 a `warmup_steps` below 1 is the ratio."""
  from transformers import TrainingArguments

  args = types.SimpleNamespace(warmup_steps=warmup_ratio)
  return TrainingArguments.get_warmup_steps(args, num_steps)


def _hf_scheduler(name, optimizer, num_steps, warmup):
  import transformers

  kwargs = {} if name == "constant" else dict(num_training_steps=num_steps)
  return getattr(transformers, HF_SCHEDULES[name])(optimizer, num_warmup_steps=warmup, **kwargs)


# ---------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_schedules_equal_transformers(name):
  import torch

  lr = 2e-5
  for num_steps in (10, 97, 1000):
    for ratio in (0.0, 0.03, 0.1):
      warmup = _hf_warmup_steps(num_steps, ratio)
      assert optim.warmup_steps_from_ratio(num_steps, ratio) == warmup
      opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
      multiplier = _hf_scheduler(name, opt, num_steps, warmup).lr_lambdas[0]
      want = np.array([lr * multiplier(s) for s in range(num_steps + 1)])
      schedule = optim.make_schedule(lr=lr, num_steps=num_steps, schedule=name,
                                     warmup_ratio=ratio)
      got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(num_steps + 1)), np.float64)
      np.testing.assert_allclose(got, want, rtol=1e-7, atol=0,
                                 err_msg=f"{name} num_steps={num_steps} ratio={ratio}")


def test_schedule_explicit_warmup_steps_and_past_the_end():
  schedule = optim.make_schedule(lr=1.0, num_steps=10, schedule="linear", warmup_steps=4)
  assert float(schedule(2)) == 0.5
  assert float(schedule(4)) == 1.0
  assert float(schedule(10)) == float(schedule(25)) == 0.0


# ---------------------------------------------------------------------------- AdamW


def _tree(rng):
  return {"w": rng.normal(size=(4, 3)).astype(np.float32),
          "final_norm": rng.normal(size=(3,)).astype(np.float32) + 1.0,
          "block": {"x": rng.normal(size=(5,)).astype(np.float32)}}


@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_adamw_matches_torch(clip_norm):
  import torch

  kw = dict(lr=1e-2, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1)
  num_steps, ratio = 10, 0.1
  rng = np.random.default_rng(0)
  params = _tree(rng)
  grads = [jax.tree.map(lambda x: 3.0 * x, _tree(rng)) for _ in range(5)]

  tx, _ = optim.make_optimizer(num_steps=num_steps, warmup_ratio=ratio, clip_norm=clip_norm,
                               **kw)
  state = tx.init(params)
  update = jax.jit(tx.update)
  ours = jax.tree.map(jnp.asarray, params)
  for g in grads:
    updates, state = update(g, state, ours)
    ours = optax.apply_updates(ours, updates)

  names = ["w", "final_norm", "block/x"]
  flat = lambda t: [t["w"], t["final_norm"], t["block"]["x"]]  # noqa: E731
  theirs = [torch.nn.Parameter(torch.tensor(p)) for p in flat(params)]
  opt = torch.optim.AdamW(
      [{"params": [theirs[0], theirs[2]]}, {"params": [theirs[1]], "weight_decay": 0.0}],
      lr=kw["lr"], betas=(kw["b1"], kw["b2"]), eps=kw["eps"], weight_decay=kw["weight_decay"])
  sched = _hf_scheduler("cosine", opt, num_steps, _hf_warmup_steps(num_steps, ratio))
  for g in grads:
    for p, gp in zip(theirs, flat(g), strict=True):
      p.grad = torch.tensor(gp)
    if clip_norm:
      torch.nn.utils.clip_grad_norm_(theirs, clip_norm)
    opt.step()
    sched.step()

  for name, a, b in zip(names, flat(ours), theirs, strict=True):
    np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=1e-6, atol=0,
                               err_msg=name)
  # The masked leaf moved by Adam alone: with decay it would differ by about lr * wd * p.
  assert not np.allclose(np.asarray(ours["w"]), params["w"])


def test_optimizer_state_is_fp32_for_bf16_params():
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _tree(np.random.default_rng(1)))
  tx, _ = optim.make_optimizer(lr=1e-3, num_steps=4, weight_decay=0.1)
  state = jax.jit(tx.init)(params)
  dtypes = {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  updates, _ = jax.jit(tx.update)(params, state, params)
  assert optax.apply_updates(params, updates)["w"].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------- clipping


def _clipped_after_one_step(grads, clip_norm):
  """The gradient the chain fed to Adam: its first moment after one step is (1 - b1) * g."""
  tx, _ = optim.make_optimizer(lr=1e-3, num_steps=4, b1=0.5, clip_norm=clip_norm)

  @jax.jit
  def first_moment(grads):
    _, state = tx.update(grads, tx.init(grads), grads)
    return jax.tree.map(lambda m: m / 0.5, optax.tree.get(state, "mu"))

  return first_moment(grads)


def test_clipping_scales_to_clip_norm_and_leaves_small_grads():
  rng = np.random.default_rng(2)
  grads = {"a": rng.normal(size=(7,)), "b": rng.normal(size=(2, 3))}
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
  grads = jax.tree.map(lambda x: 10.0 * x / optim.global_norm(grads), grads)
  np.testing.assert_allclose(optim.global_norm(grads), 10.0, rtol=1e-6)

  clipped = _clipped_after_one_step(grads, 1.0)
  np.testing.assert_allclose(optim.global_norm(clipped), 1.0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(a, b / 10.0, rtol=1e-6, atol=1e-7)

  small = jax.tree.map(lambda x: x / 20.0, grads)
  for clip_norm in (1.0, None, 0.0):
    unchanged = _clipped_after_one_step(small, clip_norm)
    for a, b in zip(jax.tree.leaves(unchanged), jax.tree.leaves(small), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  unclipped = _clipped_after_one_step(grads, None)
  np.testing.assert_allclose(optim.global_norm(unclipped), 10.0, rtol=1e-6)


# ---------------------------------------------------------------------------- decay mask


def test_decay_mask_on_tiny_llama():
  model = nnx.eval_shape(lambda: llama.init_model(llama.preset("tiny")))
  params = nnx.state(model, nnx.Param)
  flags = {jax.tree_util.keystr(path, simple=True, separator="/"): bool(flag)
           for path, flag in jax.tree_util.tree_leaves_with_path(optim.decay_mask(params))}
  assert len(flags) == len(jax.tree.leaves(params))
  off = sorted(name for name, flag in flags.items() if not flag)
  assert off == ["final_norm/scale/value", "layers/attn_norm/scale/value",
                 "layers/mlp_norm/scale/value"]
  assert {"embed/value", "lm_head/value", "layers/attn/q/value"} <= set(flags)


def test_decay_mask_on_nested_dict():
  mask = optim.decay_mask({"attn": {"q": 1.0, "bias": 2.0}, "post_norm": {"scale": 3.0}})
  assert mask == {"attn": {"q": True, "bias": False}, "post_norm": {"scale": False}}


# ---------------------------------------------------------------------------- accumulation


def _quadratic_grad_fn(w_D):
  def loss_fn(w_D, batch):
    residual_G = batch["x_GxD"] @ w_D - batch["y_G"]
    return jnp.sum(residual_G ** 2), {"rows": jnp.float32(residual_G.shape[0])}

  return lambda batch: jax.value_and_grad(loss_fn, has_aux=True)(w_D, batch)


def test_accumulated_grads_equal_full_batch():
  rng = np.random.default_rng(3)
  w_D = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
  batch = {"x_GxD": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32),
           "y_G": jnp.asarray(rng.normal(size=(16,)), jnp.float32)}
  grad_fn = _quadratic_grad_fn(w_D)
  (loss, metrics), grads = grad_fn(batch)
  for micro_batches in (1, 4):
    accumulate = jax.jit(lambda b, m=micro_batches: optim.accumulate_gradients(
        grad_fn, b, micro_batches=m))
    (acc_loss, acc_metrics), acc_grads = accumulate(batch)
    np.testing.assert_allclose(acc_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(acc_grads, grads, rtol=1e-6, atol=1e-6)
    assert float(acc_metrics["rows"]) == float(metrics["rows"]) == 16.0
    assert acc_grads.dtype == jnp.float32


def test_accumulation_sums_bf16_grads_in_fp32():
  batch = {"x_GxD": jnp.ones((8, 3), jnp.bfloat16)}

  def grad_fn(b):
    return (jnp.sum(b["x_GxD"]), {}), {"g": b["x_GxD"][0] * 1e-3}

  (loss, _), grads = optim.accumulate_gradients(grad_fn, batch, micro_batches=4)
  assert loss.dtype == grads["g"].dtype == jnp.float32
  np.testing.assert_allclose(grads["g"], 4e-3, rtol=1e-2)


def test_accumulation_rejects_bad_splits():
  batch = {"x_GxD": jnp.zeros((10, 3)), "y_G": jnp.zeros((10,))}
  with pytest.raises(ValueError, match=r"\(10\).*\(4\)"):
    optim.accumulate_gradients(lambda b: None, batch, micro_batches=4)
  with pytest.raises(ValueError, match="micro_batches=0"):
    optim.accumulate_gradients(lambda b: None, batch, micro_batches=0)
  with pytest.raises(ValueError, match="leading"):
    optim.accumulate_gradients(lambda b: None, {**batch, "y_G": jnp.zeros((8,))},
                               micro_batches=2)


# ---------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, key", [
    (dict(schedule="cosin"), "optim.schedule='cosin'"),
    (dict(lr=0.0), "optim.lr"),
    (dict(lr=-1e-5), "optim.lr"),
    (dict(num_steps=0), "optim.num_steps"),
    (dict(warmup_ratio=1.0), "optim.warmup_ratio"),
    (dict(warmup_ratio=-0.1), "optim.warmup_ratio"),
    (dict(warmup_steps=11), "optim.warmup_steps"),
    (dict(warmup_steps=2, warmup_ratio=0.1), "optim.warmup_steps"),
])
def test_bad_schedule_config_names_the_key(overrides, key):
  kwargs = {"lr": 1e-5, "num_steps": 10, **overrides}
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    optim.make_schedule(**kwargs)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    optim.make_optimizer(**kwargs)


@pytest.mark.parametrize("overrides, key", [
    (dict(b1=1.0), "optim.b1"), (dict(b2=-0.1), "optim.b2"), (dict(eps=-1.0), "optim.eps"),
    (dict(weight_decay=-1e-5), "optim.weight_decay"), (dict(clip_norm=-1.0), "optim.clip_norm"),
])
def test_bad_optimizer_config_names_the_key(overrides, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    optim.make_optimizer(lr=1e-5, num_steps=10, **overrides)
