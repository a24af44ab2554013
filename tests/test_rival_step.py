"""The rival objectives in the train step: the chunked step equals the pure loss on full
logits, a 2x2x2 mesh equals one device, micro-batches equal the full batch, and the LoRA
reference (adapters off) of circuit breakers."""


import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import set_config
from flax import nnx

from configs import toy_cpu
from derta_jax import losses, main, optim, sharding
from derta_jax.checkpoints import orbax
from derta_jax.losses import objectives
from derta_jax.models import llama, lora
from derta_jax.training import step as train

ARRAYS = ("targets", "mle_mask", "rto_mask", "segment_ids", "positions", "safety_mask",
          "harm_mask", "chosen_mask", "pair_ids", "response_index")


def _segment(batch, ids, r, t, seg, prompt, response, mask):
  """Writes one sequence of `prompt + response` tokens at row r from t; returns its end."""
  n = prompt + response
  batch["segment_ids"][r, t:t + n] = seg
  batch["positions"][r, t:t + n] = np.arange(n)
  batch["targets"][r, t:t + n - 1] = ids[r, t + 1:t + n]
  supervised = slice(t + prompt - 1, t + n - 1)
  for m in mask:
    batch[m][r, supervised] = 1
  batch["response_index"][r, supervised] = np.arange(response)
  return t + n


def _batch(vocab, rows=8, t=40, seed=0):
  """Packed rows of every kind: helpful, safety, a chosen + rejected pair (adjacent segments
  sharing a pair id), a harmful response, then padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (rows, t)).astype(np.int32)
  batch = {k: np.zeros((rows, t), np.int32) for k in ARRAYS}
  batch["input_ids"] = ids
  for r in range(rows):
    pos, seg = 0, 1
    for kind in rng.permutation(["helpful", "safe", "pair", "harm"])[:int(rng.integers(1, 4))]:
      p, n = int(rng.integers(2, 5)), int(rng.integers(2, 5))
      if pos + (2 if kind == "pair" else 1) * (p + n) > t:
        break
      if kind == "pair":
        batch["pair_ids"][r, pos + p - 1:pos + p + n - 1] = seg
        pos = _segment(batch, ids, r, pos, seg, p, n, ["chosen_mask"])
        m = int(rng.integers(2, 5))
        batch["pair_ids"][r, pos + p - 1:pos + p + m - 1] = seg
        pos, seg = _segment(batch, ids, r, pos, seg + 1, p, m, ["harm_mask"]), seg + 2
      else:
        masks = {"helpful": ["mle_mask"], "safe": ["mle_mask", "safety_mask"],
                 "harm": ["harm_mask"]}[kind]
        pos, seg = _segment(batch, ids, r, pos, seg, p, n, masks), seg + 1
  return batch


def _models(seed=0, lora_rank=0):
  config = llama.preset("tiny")
  model = llama.init_model(config, seed=seed)
  reference = llama.init_model(config, seed=seed + 1)  # another model: a non-trivial ratio
  if lora_rank:
    model = lora.attach(model, lora.LoraConfig(rank=lora_rank, alpha=8.0), seed=seed)
  return config, model, reference


def _loss_config(objective, **kw):
  return losses.LossConfig(refusal_ids=(7,), chunk_size=16, objective=objective,
                           cb_reroute_layers=(0,), cb_retain_layers=(0, 1), total_steps=10,
                           **kw)


@pytest.mark.parametrize("objective, weighted", [("dpo", False), ("qi", False),
                                                 ("door", False), ("door", True)])
def test_chunked_step_loss_equals_the_pure_loss_on_full_logits(objective, weighted):
  """The step's chunked log-probs of the policy, the reference and (W-DOOR) the weighting
  model give the loss and gradient of the pure objective on full logits."""
  config, model, reference = _models()
  weighting = llama.init_model(config, seed=5)
  batch = _batch(config.vocab_size)
  cfg = _loss_config(objective, dpo_sft_weight=0.5, wdoor_tau=2.0 if weighted else 0.0)
  graphdef, params = nnx.split(model, nnx.Param)
  frozen = {"reference": nnx.split(reference, nnx.Param)[1]}
  if weighted:
    frozen["weighting"] = nnx.split(weighting, nnx.Param)[1]
  counts = objectives.global_counts(objective, batch)

  def ours(p):
    return train.loss_fn(graphdef, p, batch, cfg, counts=counts, frozen=frozen)

  def logp_of(m):
    return losses.token_logprobs(logits_BxTxV=m(
        batch["input_ids"], batch["positions"], batch["segment_ids"]),
        targets_BxT=batch["targets"])

  weights = None
  if weighted:
    weights = jnp.exp((logp_of(reference) - logp_of(weighting)) / 2.0)
    assert float(jnp.std(weights)) > 0.01

  def full_logits(p):
    return objectives.rival_loss(cfg, batch=batch, counts=counts,
                                 logp_BxT=logp_of(nnx.merge(graphdef, p)),
                                 ref_logp_BxT=logp_of(reference), token_weights_BxT=weights)

  (a, ma), ga = jax.value_and_grad(ours, has_aux=True)(params)
  (b, mb), gb = jax.value_and_grad(full_logits, has_aux=True)(params)
  assert abs(float(a)) > 1e-3
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5, atol=1e-6)
  assert sorted(ma) == sorted(mb)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def _setup(objective, mesh=None, micro_batches=1):
  config, model, reference = _models()
  tx, schedule = optim.make_optimizer(lr=3e-3, num_steps=20, schedule="constant",
                                      weight_decay=0.01, clip_norm=1.0, eps=1e-3)
  ref, ref_shardings = train.reference_weights(reference, mesh)
  graphdef, state, shardings = train.init_state(model, tx, mesh)
  cfg = _loss_config(objective)
  fn = train.make_train_step(graphdef, tx, schedule, cfg, micro_batches=micro_batches)
  frozen_shardings = None if mesh is None else {"reference": ref_shardings}
  return config, state, {"reference": ref}, train.jit_train_step(fn, shardings, mesh,
                                                                 frozen_shardings)


def _run(objective, steps=3, mesh=None, micro_batches=1):
  config, state, frozen, step_fn = _setup(objective, mesh, micro_batches)
  losses_seen = []
  for i in range(steps):
    batch = _batch(config.vocab_size, seed=i)
    if mesh is not None:
      batch = sharding.global_batch(batch, mesh)
    state, metrics = step_fn(state, batch, frozen)
    losses_seen.append(float(metrics["loss"]))
  return losses_seen, jax.device_get(state["params"])


@pytest.mark.parametrize("objective", ["dpo", "qi", "door"])
def test_2x2x2_mesh_equals_one_device(objective):
  one, params_one = _run(objective)
  mesh = sharding.make_mesh(2, 2, 2, devices=jax.devices()[:8])
  eight, params_eight = _run(objective, mesh=mesh)
  np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(params_eight), jax.tree.leaves(params_one), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert one[-1] != one[0]  # it trains


@pytest.mark.parametrize("objective", ["door"])  # sequence counts: the hardest normaliser
def test_micro_batches_equal_the_full_batch(objective):
  full, params_full = _run(objective, steps=1)
  accum, params_accum = _run(objective, steps=1, micro_batches=4)
  np.testing.assert_allclose(accum, full, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_accum), jax.tree.leaves(params_full), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_the_reference_from_the_policy_itself_survives_the_donated_steps():
  """The loop's reference is the model the state starts from: a copy, in the params' own
  dtype too, or donating the state would delete its buffers."""
  _, model, _ = _models()
  initial = jax.tree.map(np.asarray, nnx.split(model, nnx.Param)[1])
  tx, schedule = optim.make_optimizer(lr=3e-3, num_steps=20, schedule="constant",
                                      weight_decay=0.0, clip_norm=1.0, eps=1e-3)
  ref, _ = train.reference_weights(model, dtype=jnp.float32)
  graphdef, state, _ = train.init_state(model, tx)
  step_fn = train.jit_train_step(
      train.make_train_step(graphdef, tx, schedule, _loss_config("qi")), None, None)
  vocab = llama.preset("tiny").vocab_size
  state, first = step_fn(state, _batch(vocab), {"reference": ref})
  np.testing.assert_allclose(float(first["qi_log_ratio"]), 0.0, atol=1e-6)  # pi == pi_ref
  state, _ = step_fn(state, _batch(vocab, seed=1), {"reference": ref})
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(initial), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_circuit_breaker_reference_is_the_lora_base_with_adapters_off():
  """At step 0 the adapters' B is 0, so the policy is its reference: cosine 1 on every
  rerouted position, retain distance 0; training lowers the cosine."""
  config, model, _ = _models(lora_rank=4)
  tx, schedule = optim.make_optimizer(lr=1e-2, num_steps=20, schedule="constant",
                                      weight_decay=0.0, clip_norm=1.0, eps=1e-8)
  base, _ = train.frozen_base(model)
  graphdef, state, _ = train.init_state(model, tx)
  cfg = _loss_config("circuit_breaker", cb_alpha=2.0)
  step_fn = train.jit_train_step(train.make_train_step(graphdef, tx, schedule, cfg), None,
                                 None)
  batch = _batch(config.vocab_size)
  state, first = step_fn(state, batch, {"base": base})
  np.testing.assert_allclose(float(first["cb_cosine"]), 1.0, atol=1e-5)
  np.testing.assert_allclose(float(first["cb_retain"]), 0.0, atol=1e-6)
  np.testing.assert_allclose(float(first["c_reroute"]), 2.0)  # alpha (1 - 0 / 2S)
  assert np.isfinite(float(first["grad_norm"])) and float(first["grad_norm"]) > 0
  for _ in range(8):
    state, last = step_fn(state, batch, {"base": base})
  assert float(last["cb_cosine"]) < 0.9 * float(first["cb_cosine"])
  np.testing.assert_allclose(float(last["c_retain"]), 2.0 * 8 / 20, rtol=1e-6)


def test_a_rival_without_a_reference_model_is_named():
  _, model, _ = _models()
  graphdef, params = nnx.split(model, nnx.Param)
  batch = _batch(llama.preset("tiny").vocab_size)
  cfg = _loss_config("dpo")
  with pytest.raises(ValueError, match="needs a reference model"):
    train.loss_fn(graphdef, params, batch, cfg, counts=objectives.global_counts("dpo", batch))


def _loop_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.parametrize("recipe, extra", [
    ("dpo", {}),  # full fine-tune: the reference is rebuilt from init on resume
    ("circuit_breaker", dict(lora__rank=4, lora__alpha=4.0, loss__cb_reroute_layers=(0,))),
])
def test_resume_is_exact_and_the_reference_is_rebuilt(tmp_path, monkeypatch, recipe, extra):
  """10 steps straight, or stopped at 5 (a preemption notice) and resumed: the same losses."""
  overrides = dict(mode="train", optim__schedule="constant", optim__lr=3e-3,
                   train__log_every=1, ckpt__every_steps=5, ckpt__max_to_keep=0,
                   mesh__num_devices=1, mesh__fsdp=1, data__recipe=recipe, data__n_pair=40,
                   data__n_harm=40, data__n_vanilla=40, **extra)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  main.run(set_config(toy_cpu.get_config(), train__num_steps=10, **overrides), straight)
  with monkeypatch.context() as patch:
    patch.setattr(orbax.Checkpointer, "should_stop", lambda self, step=None: step == 5)
    stopped = main.run(set_config(toy_cpu.get_config(), train__num_steps=10, **overrides),
                       resumed)
  assert stopped["steps"] == 5
  summary = main.run(set_config(toy_cpu.get_config(), train__num_steps=10, **overrides),
                     resumed)
  assert summary["resumed_from"] == 5 and summary["steps"] == 10
  a, b = _loop_losses(straight), _loop_losses(resumed)
  assert a[10] != a[1]
  for step in range(6, 11):
    assert abs(a[step] - b[step]) <= 1e-7 * abs(a[step]), (step, a[step], b[step])
