"""Device meshes, logical parameter axes -> shardings, batch sharding, multi-host start."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Batch rows are split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (None: replicated). Every parameter axis name appears here.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    # LoRA ranks are small (8 to 128) and rarely divide a mesh axis.
    ("lora_rank", None),
)


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES) -> PartitionSpec:
  table = dict(rules)
  unknown = [a for a in axes if a is not None and a not in table]
  if unknown:
    raise ValueError(f"logical axes {unknown} have no sharding rule; rules cover {sorted(table)}")
  return PartitionSpec(*(None if a is None else table[a] for a in axes))


def param_sharding(name: str, shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh,
                   rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of one parameter; raises if a sharded dimension does not divide evenly."""
  spec = logical_to_spec(axes, rules)
  for dim, axis in zip(shape, spec, strict=True):
    size = mesh.shape[axis] if axis is not None else 1
    if dim % size:
      raise ValueError(f"parameter {name} {tuple(shape)}: dimension {dim} (logical axes {axes}) "
                       f"does not divide over mesh axis {axis!r} of size {size}; change the "
                       "mesh or the sharding rules")
  return NamedSharding(mesh, spec)


def param_shardings(params: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings of the params from their logical axes, in the params' tree structure."""
  def one(path, var):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    return var.replace(param_sharding(name, var.shape, var.get_metadata()["out_sharding"],
                                      mesh, rules))

  return jax.tree_util.tree_map_with_path(one, params,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh; one size may be -1 for the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [k for k, v in sizes.items() if v == -1]
  bad = {k: v for k, v in sizes.items() if v != -1 and (not isinstance(v, int) or v < 1)}
  if bad or len(free) > 1:
    raise ValueError(f"mesh sizes {sizes}: each must be a positive int, at most one -1")
  fixed = int(np.prod([v for v in sizes.values() if v != -1]))
  if free:
    if len(devices) % fixed:
      raise ValueError(f"mesh sizes {sizes}: {len(devices)} devices do not divide by the "
                       f"fixed axes' product {fixed}")
    sizes[free[0]] = len(devices) // fixed
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(f"mesh sizes {sizes} multiply to {int(np.prod(list(sizes.values())))} "
                     f"but there are {len(devices)} devices; use -1 for one axis")
  shape = tuple(sizes[a] for a in MESH_AXES)
  return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES)


# XLA:TPU options for the FSDP train step ("overlap"): asynchronous collectives fused and
# overlapped with the layer matmuls, all-gathers kept as all-gathers instead of zero-filled
# buffers + all-reduces, and the data-parallel gradient reduction optimised. Measured by
# ahead-of-time compiling LLaMA-3-8B on v5p:4x4x4 (gb 128, seq 1024; README): estimated
# step 0.470 s with XLA's defaults -> 0.364 s.
TPU_COMPILER_OPTIONS = {
    "overlap": {
        "xla_tpu_enable_async_collective_fusion": True,
        "xla_tpu_enable_async_collective_fusion_fuse_all_gather": True,
        "xla_tpu_enable_async_collective_fusion_fuse_reduce_scatter": True,
        "xla_tpu_enable_async_collective_fusion_multiple_steps": True,
        "xla_tpu_overlap_compute_collective_tc": True,
        "xla_enable_async_all_gather": True,
        "xla_enable_async_reduce_scatter_fusion": True,
        "xla_tpu_prefer_async_allgather_to_allreduce": True,
        "xla_tpu_enable_data_parallel_all_reduce_opt": True,
        "xla_tpu_data_parallel_opt_different_sized_ops": True,
    },
    "default": {},
}


def compiler_options(mesh: Mesh, preset: str = "overlap") -> dict | None:
  """The XLA options of TPU_COMPILER_OPTIONS[preset] when the mesh is TPU, else None."""
  if preset not in TPU_COMPILER_OPTIONS:
    raise ValueError(f"train.tpu_compiler_options={preset!r}; choose one of "
                     f"{sorted(TPU_COMPILER_OPTIONS)}")
  if mesh.devices.flat[0].platform != "tpu":
    return None
  return dict(TPU_COMPILER_OPTIONS[preset]) or None


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [B, T] batch arrays: rows over ("data", "fsdp"), tokens whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def validate(mesh: Mesh, *, global_batch_size: int, model_config) -> None:
  """Config checks that would otherwise fail inside compilation, with the values."""
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  tensor = mesh.shape["tensor"]
  problems = []
  if global_batch_size % rows:
    problems.append(f"train.global_batch ({global_batch_size}) must divide over mesh.data x "
                    f"mesh.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {rows}")
  if global_batch_size % jax.process_count():
    problems.append(f"train.global_batch ({global_batch_size}) must divide over "
                    f"{jax.process_count()} processes")
  c = model_config
  for name, value in (("n_heads", c.n_heads), ("n_kv_heads", c.n_kv_heads), ("d_ff", c.d_ff),
                      ("vocab_size", c.vocab_size)):
    if value % tensor:
      problems.append(f"model {name} ({value}) must divide over mesh.tensor ({tensor})")
  if c.d_model % mesh.shape["fsdp"]:
    problems.append(f"model d_model ({c.d_model}) must divide over mesh.fsdp "
                    f"({mesh.shape['fsdp']})")
  if problems:
    raise ValueError("; ".join(problems))


def initialize_distributed() -> bool:
  """jax.distributed.initialize() on multi-host runs: Cloud TPU pods (found by JAX itself),
  or a coordinator given by JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID; a no-op on one host or when already initialised. Returns whether
  distributed JAX is on."""
  if jax.distributed.is_initialized():
    return True
  # libtpu leaves a warning sentence (with commas) here when it finds no metadata.
  workers = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")
             if h and " " not in h]
  if len(workers) > 1 or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    n, i = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=int(n) if n else None,
                               process_id=int(i) if i else None)
    return True
  return False
