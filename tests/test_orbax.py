"""Orbax train-state checkpoints: interval, retention, resharding, SIGTERM, load_params."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from derta_jax import sharding as sharding_lib
from derta_jax.checkpoints import orbax as ckpt_lib
from derta_jax.models import llama

CONFIG = {"model": {"preset": "tiny", "d_model": 64}, "optim": {"lr": 2e-5}, "seed": 7}


def _params(tiny_params, mesh):
  """`tiny_params` as a nested dict, each laid out on `mesh` by its logical axes."""
  flat = nnx.to_flat_state(tiny_params)
  params = {}
  for path, var in flat:
    value = var[...]
    sharding = sharding_lib.param_sharding("/".join(path), value.shape,
                                           var.get_metadata()["out_sharding"], mesh)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jax.device_put(value, sharding)
  return params


def _state(params, step):
  mesh = params["embed"].sharding.mesh
  mu = jax.tree.map(lambda p: p * 0.5 + step, params)
  replicated = NamedSharding(mesh, PartitionSpec())
  return {"params": params,
          "opt_state": {"mu": mu, "count": jax.device_put(jnp.float32(step), replicated)},
          "step": jax.device_put(jnp.int32(step), replicated)}


def _abstract(state, mesh):
  """ShapeDtypeStructs placed like `state` but on `mesh` (same specs, different devices)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, x.sharding.spec)), state)


def _assert_identical(got, want, abstract):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w, a in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(abstract),
                     strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert g.sharding.is_equivalent_to(a.sharding, g.ndim), (g.sharding, a.sharding)


@pytest.fixture(scope="module")
def tiny_params():
  # One init for the module: init_model compiles the whole model.
  return nnx.state(llama.init_model(llama.preset("tiny")), nnx.Param)


@pytest.fixture(scope="module")
def fsdp_mesh():
  return sharding_lib.make_mesh(fsdp=8)


@pytest.fixture(scope="module")
def fsdp_params(tiny_params, fsdp_mesh):
  return _params(tiny_params, fsdp_mesh)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, fsdp_params):
  """Steps 0, 10, 20 saved with every_steps=10, max_to_keep=2; returns (workdir, states)."""
  workdir = tmp_path_factory.mktemp("run")
  states = {s: _state(fsdp_params, s) for s in (0, 10, 20)}
  with ckpt_lib.Checkpointer(workdir, every_steps=10, max_to_keep=2) as ckpt:
    for s, state in states.items():
      assert ckpt.save(s, state, config={**CONFIG, "at": s})
  return workdir, states


def test_round_trip_keeps_latest_two(saved, fsdp_mesh):
  workdir, states = saved
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
  with ckpt_lib.Checkpointer(workdir, every_steps=10) as ckpt:
    assert ckpt.latest_step() == 20 and ckpt.all_steps() == [10, 20]
    abstract = _abstract(states[20], fsdp_mesh)
    state, step = ckpt.restore(abstract)
    assert step == 20
    _assert_identical(state, states[20], abstract)
    assert state["params"]["embed"].sharding.spec == PartitionSpec("tensor", "fsdp")
    older, step = ckpt.restore(abstract, step=10)
    assert step == 10
    _assert_identical(older, states[10], abstract)
    assert ckpt.restore_config() == {**CONFIG, "at": 20}
    assert ckpt.restore_config(10)["at"] == 10
    with pytest.raises(FileNotFoundError, match="step 0 .* available steps: \\[10, 20\\]"):
      ckpt.restore(abstract, step=0)


@pytest.mark.parametrize("layout", ["data2_fsdp4", "one_device"])
def test_restore_onto_other_mesh(saved, layout):
  workdir, states = saved
  if layout == "one_device":
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=SingleDeviceSharding(jax.devices()[3])), states[20])
  else:
    abstract = _abstract(states[20], sharding_lib.make_mesh(data=2, fsdp=4))
  with ckpt_lib.Checkpointer(workdir, every_steps=10) as ckpt:
    state, _ = ckpt.restore(abstract)
  _assert_identical(state, states[20], abstract)


def test_leftover_tmp_dir_is_not_a_step(saved):
  workdir, states = saved
  leftover = workdir / "checkpoints" / "30.orbax-checkpoint-tmp-1700000000"
  (leftover / "state").mkdir(parents=True)
  (leftover / "state" / "partial").write_bytes(b"\0" * 16)
  with ckpt_lib.Checkpointer(workdir, every_steps=10) as ckpt:
    assert ckpt.latest_step() == 20 and ckpt.all_steps() == [10, 20]


def test_interval_and_force(tmp_path, fsdp_params):
  state = _state(fsdp_params, 5)
  with ckpt_lib.Checkpointer(tmp_path, every_steps=10) as ckpt:
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
      ckpt.restore(state)
    assert not ckpt.save(5, state, config=CONFIG)
    ckpt.wait()
    assert ckpt.latest_step() is None
    assert not (tmp_path / "checkpoints" / "5").exists()
    assert ckpt.save(5, state, config=CONFIG, force=True)
    assert not ckpt.save(5, state, config=CONFIG, force=True)  # never overwritten
    with pytest.raises(ValueError, match="JSON"):
      ckpt.save(10, state, config={"bad": object()})
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]


def test_sigterm_saves_off_interval_and_restores_handler(tmp_path, fsdp_params):
  def previous(signum, frame):
    pass

  original = signal.signal(signal.SIGTERM, previous)
  try:
    state = _state(fsdp_params, 3)
    with ckpt_lib.Checkpointer(tmp_path, every_steps=100) as ckpt:
      ckpt.install_signal_handler()
      assert not ckpt.should_stop(3)
      assert not ckpt.save(3, state, config=CONFIG)
      os.kill(os.getpid(), signal.SIGTERM)
      assert ckpt.should_stop() and ckpt.should_stop(4)
      assert ckpt.save(4, state, config=CONFIG)
      assert signal.getsignal(signal.SIGTERM) != previous
    assert signal.getsignal(signal.SIGTERM) is previous
    with ckpt_lib.Checkpointer(tmp_path, every_steps=100) as reopened:
      assert reopened.latest_step() == 4
  finally:
    signal.signal(signal.SIGTERM, original)


def test_load_params_from_step_dir_and_params_dir(saved, tmp_path):
  workdir, states = saved
  want = states[20]["params"]
  abstract = _abstract(want, sharding_lib.make_mesh(data=2, fsdp=4))
  got = ckpt_lib.load_params(workdir / "checkpoints" / "20", abstract)
  _assert_identical(got, want, abstract)

  with ocp.StandardCheckpointer() as writer:
    writer.save((tmp_path / "params").absolute(), want)
  got = ckpt_lib.load_params(tmp_path / "params", abstract)
  _assert_identical(got, want, abstract)


def test_load_params_errors(saved, tmp_path, fsdp_mesh):
  workdir, states = saved
  abstract = _abstract(states[20]["params"], fsdp_mesh)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    ckpt_lib.load_params(tmp_path / "nowhere", abstract)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty holds no Orbax checkpoint"):
    ckpt_lib.load_params(tmp_path / "empty", abstract)
  step_dir = workdir / "checkpoints" / "20"

  wrong_shape = dict(abstract, embed=jax.ShapeDtypeStruct((256, 32), jnp.float32))
  with pytest.raises(ValueError, match=r"params/embed stored \(256, 64\) requested \(256, 32\)"):
    ckpt_lib.load_params(step_dir, wrong_shape)
  extra = dict(abstract, lora_a=jax.ShapeDtypeStruct((4,), jnp.float32))
  with pytest.raises(ValueError, match=r"not in the checkpoint: params/lora_a \(4,\)"):
    ckpt_lib.load_params(step_dir, extra)
  missing = {k: v for k, v in abstract.items() if k != "final_norm"}
  with pytest.raises(ValueError, match=r"not requested: params/final_norm/scale \(64,\)"):
    ckpt_lib.load_params(step_dir, missing)


def test_restore_mismatch_names_key(saved, fsdp_mesh):
  workdir, states = saved
  abstract = _abstract(states[20], fsdp_mesh)
  del abstract["opt_state"]["count"]
  with ckpt_lib.Checkpointer(workdir, every_steps=10) as ckpt:
    with pytest.raises(ValueError, match=r"20/state: .*not requested: opt_state/count \(\)"):
      ckpt.restore(abstract)


def test_nnx_state_round_trip(tmp_path, tiny_params, fsdp_mesh):
  state = tiny_params
  replicated = NamedSharding(fsdp_mesh, PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          nnx.state(llama.abstract_model(llama.preset("tiny")), nnx.Param))
  with ckpt_lib.Checkpointer(tmp_path, every_steps=1) as ckpt:
    assert ckpt.save(1, state, config=CONFIG)
    restored, step = ckpt.restore(abstract)
  assert step == 1 and isinstance(restored, nnx.State)
  _assert_identical(restored, state, abstract)
  params = ckpt_lib.load_params(tmp_path / "checkpoints" / "1", abstract)
  _assert_identical(params, state, abstract)


def _set(x, index, value):
  """`x` with `x[index] = value`, kept on `x`'s sharding."""
  return jax.device_put(x.at[index].set(value), x.sharding)


def _poisoned(state):
  """`state` with one NaN in the q projection and two Inf in the embedding's first moment."""
  params = dict(state["params"], layers=dict(state["params"]["layers"]))
  attn = params["layers"]["attn"] = dict(params["layers"]["attn"])
  attn["q"] = _set(attn["q"], (1, 3, 0, 5), jnp.nan)
  mu = dict(state["opt_state"]["mu"])
  mu["embed"] = _set(mu["embed"], (np.array([0, 200]), np.array([1, 63])), jnp.inf)
  return dict(state, params=params, opt_state=dict(state["opt_state"], mu=mu))


def test_nonfinite_values_are_named(tmp_path, fsdp_params, fsdp_mesh):
  state = _poisoned(_state(fsdp_params, 5))
  abstract = _abstract(state, fsdp_mesh)
  hint = "; the run had likely diverged before this save: use an earlier step"
  with ckpt_lib.Checkpointer(tmp_path, every_steps=5) as ckpt:
    assert ckpt.save(5, state, config=CONFIG)
    with pytest.raises(ValueError) as error:
      ckpt.restore(abstract)
  step_dir = tmp_path / "checkpoints" / "5"
  assert str(error.value) == (f"{step_dir / 'state'}: 2 tensor(s) hold NaN or Inf: "
                              "opt_state/mu/embed (2 non-finite), params/layers/attn/q "
                              f"(1 non-finite){hint}")
  with pytest.raises(ValueError) as error:  # the optimizer state is not read
    ckpt_lib.load_params(step_dir, abstract["params"])
  assert str(error.value) == (f"{step_dir / 'state'}: 1 tensor(s) hold NaN or Inf: "
                              f"params/layers/attn/q (1 non-finite){hint}")

  with ocp.StandardCheckpointer() as writer:
    writer.save((tmp_path / "params").absolute(), state["params"])
  with pytest.raises(ValueError, match=r"params: 1 tensor\(s\) hold NaN or Inf: layers/attn/q "
                                       r"\(1 non-finite\)"):
    ckpt_lib.load_params(tmp_path / "params", abstract["params"])


def test_nonfinite_nnx_leaf_is_named(tmp_path, tiny_params):
  state = jax.tree.map(lambda x: x, tiny_params)  # new Variables: the fixture stays clean
  state["final_norm"]["scale"][...] = tiny_params["final_norm"]["scale"][...].at[7].set(-jnp.inf)
  with ocp.StandardCheckpointer() as writer:
    writer.save((tmp_path / "params").absolute(), state)
  with pytest.raises(ValueError, match=r"1 tensor\(s\) hold NaN or Inf: final_norm/scale/value "
                                       r"\(1 non-finite\)"):
    ckpt_lib.load_params(tmp_path / "params", state)
