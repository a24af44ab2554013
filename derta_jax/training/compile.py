"""Ahead-of-time compile of the train step for a TPU topology: memory fit and a cost estimate.

  python run.py --config=configs/llama3_tpu.py --config.mode=compile \
      --config.compile.topology=v5p:4x4x4

Needs libtpu (requirements-tpu.txt) but no TPU: the devices come from
`jax.experimental.topologies`, the train state and batch are ShapeDtypeStructs, and nothing
is allocated. The compiled HLO goes to <workdir>/compile/<topology>.hlo.txt.

The step time adds up the TPU compiler's own per-instruction estimates (`hlo_cost`), with
every while-loop body counted as often as the loop runs, at the chip's clock. Collectives
carry no estimate, so that time assumes they hide behind compute;
`estimated_collective_seconds` is their bytes over the chip's ICI bandwidth, and a step is
ICI-bound where it exceeds `estimated_step_seconds`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from derta_jax import config_build, sharding
from derta_jax.data import packing
from derta_jax.losses import objectives
from derta_jax.models import lora
from derta_jax.training import step
from derta_jax.training.hlo_cost import HloCost, hlo_cost


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: HBM, clock, dense bf16 FLOP/s and ICI bytes/s one way, per chip."""

  device_kind: str
  hbm_bytes: int
  clock_hz: float
  peak_flops: float
  ici_bytes_per_s: float | None = None


# HBM and peak bf16 FLOP/s: the Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p): v4 32 GiB, 275 TFLOP/s; v5e 16 GiB, 197;
# v5p 95 GiB, 459. Clock = peak / (MXUs x 128 x 128 x 2 FLOPs a cycle), with 8 MXUs a chip
# on v4 and v5p (2 TensorCores x 4) and 4 on v5e: 1.05, 1.50 and 1.75 GHz. "Interchip
# Interconnect BW" on the same pages: v5e 1,600 Gbit/s, v5p 4,800 (the v4 page gives none).
CHIPS = {
    "v4": Chip("TPU v4", 32 * 2**30, 1.05e9, 275e12),
    "v5e": Chip("TPU v5 lite", 16 * 2**30, 1.5e9, 197e12, 1600e9 / 8),
    "v5p": Chip("TPU v5", 95 * 2**30, 1.75e9, 459e12, 4800e9 / 8),
}
# The refusal id changes no shape: LLaMA-3's "Sorry" when the config leaves it to the data.
_DEFAULT_REFUSAL_IDS = (19701,)


def topology_devices(topology: str) -> tuple[Chip, list]:
  """(chip, devices) of a topology name like "v5p:4x4x4"; no TPU needed, libtpu is."""
  match = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", topology)
  if match is None or match.group(1) not in CHIPS:
    raise ValueError(f"compile.topology={topology!r}; expected <chip>:<shape> with chip one "
                     f"of {sorted(CHIPS)}, e.g. 'v5p:4x4x4' or 'v5e:16x16'")
  from jax.experimental import topologies

  try:
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except jax.errors.JaxRuntimeError as e:
    if "INVALID_ARGUMENT" not in str(e):
      raise
    raise ValueError(f"compile.topology={topology!r}: {e}") from None
  chip = CHIPS[match.group(1)]
  if devices[0].device_kind != chip.device_kind:
    raise ValueError(f"compile.topology={topology!r} gave {devices[0].device_kind!r} devices, "
                     f"expected {chip.device_kind!r}")
  return chip, list(devices)


def step_seconds(cost: HloCost, chip: Chip, devices_per_chip: int = 1) -> float:
  """Estimated cycles at the chip's clock, plus the FLOPs that have no estimate at peak."""
  return cost.cycles / chip.clock_hz + cost.unestimated_flops * devices_per_chip / chip.peak_flops


# ----------------------------------------------------------------------------------------
# The report.


def model_flops_per_step(model_config, tokens: int, seq_len: int) -> float:
  """MaxText's convention: 6 N per token for the weights plus 12 L T D for attention. With
  LoRA the frozen base needs no weight gradients (4 N), the adapters' N_a train (6 N_a)."""
  c = model_config
  weights = 6.0 * c.num_params()
  if c.lora is not None:
    weights = 4.0 * c.num_params() + 6.0 * lora.num_params(c)
  return weights * tokens + 12.0 * c.n_layers * seq_len * c.d_model * tokens


def summarize(*, topology: str, chip: Chip, devices: int, devices_per_chip: int,
              global_batch: int, seq_len: int, memory, cost: HloCost, xla_flops: float,
              model_flops: float, compile_seconds: float) -> dict:
  """The report's figures, per device unless named per chip or step.

  `memory` is `compiled.memory_analysis()`. flops_per_device is XLA's cost analysis, which
  counts a loop body once; flops_per_device_unrolled counts every iteration.
  """
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  hbm = chip.hbm_bytes // devices_per_chip
  seconds = step_seconds(cost, chip, devices_per_chip)
  chips = devices // devices_per_chip
  tokens = global_batch * seq_len
  return {
      "topology": topology, "devices": devices, "chips": chips, "global_batch": global_batch,
      "seq_len": seq_len, "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes, "total_bytes": total, "hbm_bytes": hbm,
      "fits": total <= hbm, "flops_per_device": xla_flops,
      "flops_per_device_unrolled": cost.flops,
      "collective_bytes_per_device": cost.collective_bytes,
      "estimated_collective_seconds": (cost.collective_bytes * devices_per_chip
                                       / chip.ici_bytes_per_s if chip.ici_bytes_per_s else None),
      "estimated_step_seconds": seconds, "model_flops_per_step": model_flops,
      "estimated_mfu": model_flops / (seconds * chips * chip.peak_flops) if seconds else None,
      "estimated_tokens_per_s_per_chip": tokens / seconds / chips if seconds else None,
      "untimed_ops": cost.untimed,
      "unknown_trip_count_loops": cost.unknown_loops,
      "compile_seconds": round(compile_seconds, 1),
  }


def compile_train_step(config: ml_collections.ConfigDict, devices):
  """The run's jitted train step lowered for `devices` and compiled: (compiled, model config)."""
  mesh = config_build.mesh(config, devices)
  model_config = config_build.model_config(config)
  if config.lora.rank:  # adapters train in fp32; the frozen base is held in lora.base_dtype
    model_config = model_config.replace(lora=lora.from_config(config.lora),
                                        param_dtype=config.lora.base_dtype)
  t = config.train
  sharding.validate(mesh, global_batch_size=t.global_batch, model_config=model_config)
  # num_steps only sizes the learning-rate table; 0 (= from the data) compiles the same.
  tx, schedule = config_build.optimizer(config, max(1, t.num_steps))
  graphdef, state, shardings = step.abstract_state(model_config, tx, mesh)
  base, base_shardings = step.abstract_base(model_config, mesh)
  frozen, frozen_shardings = ({}, {}) if base is None else ({"base": base},
                                                            {"base": base_shardings})
  loss_config = config_build.loss_config(
      config, tuple(config.loss.refusal_ids) or _DEFAULT_REFUSAL_IDS, max(1, t.num_steps))
  if loss_config.objective in objectives.NEEDS_REFERENCE and base is None:
    # The reference model: the initial weights, frozen in the compute dtype.
    frozen["reference"], frozen_shardings["reference"] = step.abstract_reference(model_config,
                                                                                mesh)
  train_step = step.make_train_step(graphdef, tx, schedule, loss_config,
                                    micro_batches=t.micro_batches)
  rows = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((t.global_batch, t.seq_len), jnp.int32, sharding=rows)
           for k in packing.ARRAYS}
  args = (state, batch, frozen) if frozen else (state, batch)
  compiled = step.jit_train_step(train_step, shardings, mesh, frozen_shardings or None,
                                 t.tpu_compiler_options).lower(*args).compile()
  return compiled, model_config


def _oom_bytes(message: str) -> int | None:
  """The temporaries' size in the TPU compiler's out-of-memory message, if it names it."""
  match = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", message)
  if match is None:
    return None
  return int(float(match.group(1)) * 1024 ** "_KMGT".index(match.group(2) or "_"))


def compile_report(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Compile the train step for config.compile.topology; write the HLO; return the figures."""
  topology, t = config.compile.topology, config.train
  chip, devices = topology_devices(topology)
  devices_per_chip = len(devices) // len({tuple(d.coords) for d in devices})
  extra = dict(remat=config.model.remat, micro_batches=t.micro_batches,
               mesh=config.mesh.to_dict(), lora_rank=config.lora.rank,
               objective=config_build.objective(config))
  start = time.perf_counter()
  try:
    compiled, model_config = compile_train_step(config, devices)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The compiler refuses a program whose temporaries alone exceed HBM: no memory or cost
    # analysis exists, only the size its message names (a lower bound of the total).
    needed = _oom_bytes(str(e))
    return dict(topology=topology, devices=len(devices),
                chips=len(devices) // devices_per_chip, global_batch=t.global_batch,
                seq_len=t.seq_len, temp_bytes=needed, total_bytes=needed,
                hbm_bytes=chip.hbm_bytes // devices_per_chip, fits=False,
                error=str(e).splitlines()[0],
                compile_seconds=round(time.perf_counter() - start, 1), **extra)
  compile_seconds = time.perf_counter() - start
  hlo = compiled.as_text()
  out = Path(workdir) / "compile" / f"{topology.replace(':', '_')}.hlo.txt"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(hlo)
  report = summarize(
      topology=topology, chip=chip, devices=len(devices), devices_per_chip=devices_per_chip,
      global_batch=t.global_batch, seq_len=t.seq_len, memory=compiled.memory_analysis(),
      cost=hlo_cost(hlo), xla_flops=float(compiled.cost_analysis().get("flops", 0.0)),
      model_flops=model_flops_per_step(model_config, t.global_batch * t.seq_len, t.seq_len),
      compile_seconds=compile_seconds)
  return dict(report, **extra, hlo_path=str(out))
