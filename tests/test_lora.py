"""LoRA: a fresh adapter changes nothing, merging is exact, PEFT reads our adapters, dropout
is per row and mesh-independent, and a LoRA run trains only adapters, resumes and exports.

Random weights are drawn with numpy: on this CPU, compiling JAX's random-number programs
costs more than most of these tests."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import set_config
from flax import nnx

from configs import toy_cpu
from derta_jax import config_build, main, sharding
from derta_jax.checkpoints import hf, orbax, peft
from derta_jax.models import llama, lora
from derta_jax.training import step as train_step

LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.25)


@nnx.jit
def _hidden(model, ids, keys=None):
  return model.hidden_states(ids, lora_keys_B=keys)


@nnx.jit
def _logits(model, ids):
  return model(ids)


def _tokens(cfg, b=8, t=12, seed=1):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)


def _randomised(model, seed=5, std=0.1):
  """`model` with random B (a trained adapter instead of a fresh one)."""
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree.map(lambda x: x + rng.normal(0, std, x.shape).astype(np.float32),
                                 nnx.state(model, lora.LoraParam)))
  return model


@pytest.fixture(scope="module")
def base():
  """The tiny preset with 3 layers: N(0, 0.1) matrices, unit norm scales."""
  graphdef, state = nnx.split(llama.abstract_model(llama.preset("tiny", n_layers=3)))
  rng = np.random.default_rng(2)
  flat = {path: var.replace(jnp.asarray(
      np.ones(var.shape) if path[-1] == "scale" else rng.normal(0, 0.1, var.shape), jnp.float32))
      for path, var in nnx.to_flat_state(state)}
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def adapted(base):
  return _randomised(lora.attach(base, LORA, seed=3))


def test_fresh_adapters_keep_the_base_model(base):
  model = lora.attach(base, LORA, seed=3)
  ids = _tokens(base.config)
  np.testing.assert_array_equal(_hidden(model, ids), _hidden(base, ids))
  # Only the adapters are new: the base weights are the very same arrays.
  for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                            nnx.to_flat_state(nnx.state(base, nnx.Param)), strict=True):
    assert a[...] is b[...]


def test_adapters_shapes_axes_and_targets(base):
  model = lora.attach(base, lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "o", "down")))
  flat = dict(nnx.to_flat_state(nnx.state(model, lora.LoraParam)))
  assert flat[("layers", "attn", "q_lora", "a")].shape == (3, 64, 4)  # [L, D, R]
  assert flat[("layers", "attn", "q_lora", "b")].shape == (3, 4, 4, 16)  # [L, R, N, H]
  assert flat[("layers", "attn", "o_lora", "a")].shape == (3, 4, 16, 4)  # [L, N, H, R]
  assert flat[("layers", "mlp", "down_lora", "b")].shape == (3, 4, 64)  # [L, R, D]
  assert len(flat) == 6 and sum(v.size for v in flat.values()) == lora.num_params(model.config)
  for path, var in flat.items():
    axes = var.get_metadata()["out_sharding"]
    assert axes[0] == "layers" and "lora_rank" in axes and len(axes) == var.ndim, path
    sharding.logical_to_spec(axes)
  # PEFT's kaiming-uniform A: U(-1/sqrt(in), 1/sqrt(in)); B starts at zero.
  a = np.asarray(flat[("layers", "attn", "q_lora", "a")][...])
  assert 0.9 / 8 < np.abs(a).max() <= 1 / 8
  assert not np.asarray(flat[("layers", "attn", "q_lora", "b")][...]).any()
  with pytest.raises(ValueError, match="already has adapters"):
    lora.attach(model, LORA)


def test_merged_weights_give_the_adapted_model(adapted):
  merged = lora.merge(adapted)
  assert merged.config.lora is None and not nnx.state(merged, lora.LoraParam)
  ids = _tokens(adapted.config)
  np.testing.assert_allclose(_hidden(merged, ids), _hidden(adapted, ids), atol=1e-5, rtol=0)
  again = lora.merge(lora.attach(merged, LORA))  # B = 0 again: nothing to add
  for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(again)),
                            nnx.to_flat_state(nnx.state(merged)), strict=True):
    np.testing.assert_array_equal(a[...], b[...])


def test_dropout_needs_keys_acts_per_row_and_only_on_the_adapter_input(base, adapted):
  ids = _tokens(adapted.config)
  keys = lora.row_keys(seed=0, step=3, rows=8)
  plain, dropped = _hidden(adapted, ids), _hidden(adapted, ids, keys)
  assert float(jnp.min(jnp.max(jnp.abs(dropped - plain), axis=(1, 2)))) > 1e-3  # every row
  np.testing.assert_array_equal(_hidden(adapted, ids, keys), dropped)
  # A row's masks follow its key, wherever the row is in the batch.
  order = np.array([3, 0, 7, 1, 6, 2, 5, 4])
  np.testing.assert_allclose(_hidden(adapted, ids[order], keys[order]), dropped[order],
                             atol=1e-6)
  # With B = 0 dropout changes nothing: the base path never sees it.
  fresh = lora.attach(base, LORA)
  np.testing.assert_array_equal(_hidden(fresh, ids, keys), _hidden(fresh, ids))


def test_kv_cache_decode_applies_the_adapters(adapted):
  ids = _tokens(adapted.config, b=2, t=10)
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((10, 10), bool)), (2, 10, 10))
  hidden, _ = nnx.jit(lambda m: m.decode(ids, positions, mask, m.init_cache(2, 10), 0))(adapted)
  np.testing.assert_allclose(hidden, _hidden(adapted, ids), atol=1e-5)


def test_sharded_forward_and_grads_equal_one_device(adapted):
  graphdef, adapters, frozen = train_step.split_model(adapted)
  ids = _tokens(adapted.config)
  keys = lora.row_keys(seed=1, step=0, rows=8)

  def loss(adapters, frozen, ids):
    model = nnx.merge(graphdef, adapters, frozen)
    return jnp.mean(model.hidden_states(ids, lora_keys_B=keys) ** 2)

  want, want_grads = jax.jit(jax.value_and_grad(loss))(adapters, frozen, ids)
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  with jax.set_mesh(mesh):
    step = jax.jit(jax.value_and_grad(loss))
    args = (jax.device_put(adapters, sharding.param_shardings(adapters, mesh)),
            jax.device_put(frozen, sharding.param_shardings(frozen, mesh)),
            jax.device_put(ids, sharding.batch_sharding(mesh)))
    assert "all_gather" in step.lower(*args).as_text()  # the shard_map FSDP path
    got, grads = step(*args)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5)


def test_peft_loads_our_adapters_and_transformers_our_merged_weights(hf_checkpoint, tmp_path):
  from peft import PeftModel
  from transformers import LlamaForCausalLM

  path, _ = hf_checkpoint()
  model = _randomised(lora.attach(hf.load_hf(path), lora.LoraConfig(rank=4, alpha=16.0,
                                                                     dropout=0.05), seed=1))
  ids = _tokens(model.config, b=2, t=10)
  ours = np.asarray(_logits(model, ids))
  peft.save_peft(model, tmp_path / "peft", base_name_or_path=str(path))
  hf.save_hf(lora.merge(model), tmp_path / "merged")

  config = json.loads((tmp_path / "peft" / peft.CONFIG_FILE).read_text())
  assert config["r"] == 4 and config["lora_alpha"] == 16 and config["lora_dropout"] == 0.05
  assert config["base_model_name_or_path"] == str(path) and config["peft_type"] == "LORA"
  assert sorted(config["target_modules"]) == sorted(
      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  tensors = safetensors.numpy.load_file(tmp_path / "peft" / peft.WEIGHTS_FILE)
  assert tensors["base_model.model.model.layers.2.self_attn.k_proj.lora_B.weight"].shape == (
      32, 4)  # [K * H, R]
  assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 112)

  with torch.no_grad():
    torch_ids = torch.tensor(ids, dtype=torch.long)
    adapted = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(path),
                                        tmp_path / "peft").eval()
    np.testing.assert_allclose(adapted(torch_ids).logits.numpy(), ours, atol=1e-4)
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(merged(torch_ids).logits.numpy(), ours, atol=1e-4)
  with pytest.raises(ValueError, match="has LoRA adapters"):
    hf.save_hf(model, tmp_path / "unmerged")


def _config(**overrides):
  config = toy_cpu.get_config()
  values = dict(mode="train", lora__rank=4, lora__alpha=8.0, lora__dropout=0.1,
                lora__targets="q,v,o,down", train__num_steps=4, train__log_every=1,
                ckpt__every_steps=2, ckpt__max_to_keep=0, optim__schedule="constant",
                optim__lr=1e-2, data__n_rto=16, data__n_prefix=16, data__synthetic_helpful=32,
                data__synthetic_triples=32)
  return set_config(config, **{**values, **overrides})


def _losses(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_lora_run_trains_only_adapters_resumes_exactly_and_exports(hf_checkpoint, tmp_path):
  base_dir, _ = hf_checkpoint(vocab_size=256)
  config = dict(init__hf_path=str(base_dir), model__preset="")
  full = tmp_path / "full"
  summary = main.run(_config(**config), full)  # the toy config's mesh: fsdp over 8 devices
  assert summary["steps"] == 4 and summary["peft_dir"] == str(full / "peft")
  with orbax.Checkpointer(full, every_steps=2) as ckpt:
    assert ckpt.all_steps() == [2, 4] and ckpt.restore_config()["lora"]["rank"] == 4
  stored = set(orbax._shapes(orbax._stored_tree(full / "checkpoints" / "4" / "state")))
  assert {p.split("/")[0] for p in stored} == {"step", "params", "opt_state"}
  assert all("_lora/" in p for p in stored if p.startswith("params/"))  # no base weight
  # The merged export differs from the base in the targets' weights only.
  before = nnx.to_flat_state(nnx.state(hf.load_hf(base_dir), nnx.Param))
  after = dict(nnx.to_flat_state(nnx.state(hf.load_hf(full / "hf"), nnx.Param)))
  changed = {path[-1] for path, var in before if not np.array_equal(var[...], after[path][...])}
  assert changed == {"q", "v", "o", "down"}
  # The checkpoint's adapters on the rebuilt base give the merged export's logits.
  adapted = config_build.adapted_model(_config(**config), full / "checkpoints" / "4")
  ids = _tokens(adapted.config)
  np.testing.assert_allclose(_logits(hf.load_hf(full / "hf"), ids), _logits(adapted, ids),
                             atol=1e-5)
  # run.py's eval mode loads a LoRA checkpoint the same way (adapters on the named base).
  evaluated = config_build.checkpoint_model(_config(**config), str(full / "checkpoints" / "4"),
                                            None)
  np.testing.assert_array_equal(_logits(evaluated, ids), _logits(adapted, ids))

  # Resume from step 2 of a copy: steps 3 and 4 repeat exactly, dropout included.
  resumed = tmp_path / "resumed"
  shutil.copytree(full / "checkpoints", resumed / "checkpoints")
  shutil.rmtree(resumed / "checkpoints" / "4")
  main.run(_config(**config), resumed)
  want, got = _losses(full), _losses(resumed)
  assert sorted(got) == [3, 4] and all(got[s] == want[s] for s in got), (got, want)
  for name, value in safetensors.numpy.load_file(full / "peft" / peft.WEIGHTS_FILE).items():
    np.testing.assert_array_equal(
        safetensors.numpy.load_file(resumed / "peft" / peft.WEIGHTS_FILE)[name], value)

  # A resume rebuilds the base from the config, so the config must name the same base.
  with pytest.raises(ValueError, match=r"trajectory: init.hf_path: '/.*' -> ''"):
    main.run(_config(**{**config, "init__hf_path": ""}), resumed)


@pytest.mark.parametrize("overrides, message", [
    (dict(lora__rank=-1), r"lora.rank=-1 must be an int >= 0"),
    (dict(lora__targets="q,x"), r"lora.targets='q,x': give distinct names .*unknown \['x'\]"),
    (dict(lora__targets="q,q"), r"lora.targets='q,q'"),
    (dict(lora__dropout=1.0), r"lora.dropout=1.0 must be in \[0, 1\)"),
    (dict(lora__alpha=0.0), r"lora.alpha=0.0 must be > 0"),
    (dict(lora__base_dtype="int8"), r"lora.base_dtype='int8'; choose one of"),
    (dict(lora__init_a="zeros"), r"lora.init_a='zeros'; choose one of"),
])
def test_bad_lora_config_names_key_and_value(overrides, message):
  with pytest.raises(ValueError, match=message):
    config_build.check_train_config(_config(**overrides))
