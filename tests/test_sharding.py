"""Mesh construction, batch sharding and the config checks run before compiling."""

import jax
import numpy as np
import pytest

from derta_jax import sharding
from derta_jax.models import llama


def test_mesh_sizes_and_errors():
  mesh = sharding.make_mesh(data=2, fsdp=-1, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="multiply to 16 but there are 8 devices"):
    sharding.make_mesh(data=2, fsdp=4, tensor=2)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh(data=-1, fsdp=-1)


def test_global_batch_is_sharded_over_data_and_fsdp():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  local = {"input_ids": np.arange(8 * 6, dtype=np.int32).reshape(8, 6)}
  arrays = sharding.global_batch(local, mesh)
  ids = arrays["input_ids"]
  assert ids.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(ids), local["input_ids"])
  # Each device holds 2 whole rows (8 rows over data x fsdp = 4), replicated over tensor.
  assert {s.data.shape for s in ids.addressable_shards} == {(2, 6)}


def test_validate_names_the_config_values():
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  tiny = llama.preset("tiny")
  sharding.validate(mesh, global_batch_size=8, model_config=tiny)
  with pytest.raises(ValueError, match=r"train.global_batch \(6\) must divide over mesh.data x "
                                       r"mesh.fsdp = 1 x 4 = 4"):
    sharding.validate(mesh, global_batch_size=6, model_config=tiny)
  odd = tiny.replace(n_heads=3, n_kv_heads=1, head_dim=16)
  with pytest.raises(ValueError, match=r"n_heads \(3\) must divide over mesh.tensor \(2\).*"
                                       r"n_kv_heads \(1\)"):
    sharding.validate(mesh, global_batch_size=8, model_config=odd)


def test_initialize_distributed_is_a_no_op_on_one_host(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  assert sharding.initialize_distributed() is False
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "WARNING: could not determine TPU worker "
                     "hostnames or IP addresses, please set env var")
  assert sharding.initialize_distributed() is False


def test_tpu_compiler_options_only_on_tpu():
  mesh = sharding.make_mesh(1, -1, 1)
  assert sharding.compiler_options(mesh) is None  # CPU devices: XLA:CPU has no such flags
  assert sharding.TPU_COMPILER_OPTIONS["overlap"]["xla_tpu_prefer_async_allgather_to_allreduce"]
  with pytest.raises(ValueError, match="train.tpu_compiler_options='fast'; choose one of"):
    sharding.compiler_options(mesh, "fast")
