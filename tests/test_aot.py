"""AOT compile report: the HLO cost walk on hand-written HLO, the report's arithmetic, and one
real compile of the tiny train step on the CPU devices (TPU topologies need libtpu)."""

import types

import jax
import pytest

from configs import toy_cpu
from derta_jax.models import llama
from derta_jax.training import compile as aot
from derta_jax.training import hlo_cost


def _fusion(name, cycles, shape="f32[128,128]{1,0}"):
  return (f'  %{name} = {shape} fusion(%p), kind=kLoop, calls=%fused, '
          f'backend_config={{"window_config":{{"estimated_cycles":"{cycles}"}}}}')


FUSED = """%fused (x: f32[128,128]) -> f32[128,128] {
  ROOT %x = f32[128,128]{1,0} parameter(0)
}
"""


def _loop(name, body_lines, *, trips, known=True, init=0, compare="LT"):
  """A counted loop `name` over (s32[], f32[128,128]): its body and condition computations."""
  body = "\n".join([
      f"%{name}_body (t: (s32[], f32[128,128])) -> (s32[], f32[128,128]) {{",
      "  %t = (s32[], f32[128,128]{1,0}) parameter(0)",
      "  %i = s32[] get-tuple-element(%t), index=0",
      "  %one = s32[] constant(1)",
      "  %next = s32[] add(%i, %one)",
      "  %p = f32[128,128]{1,0} get-tuple-element(%t), index=1",
      *body_lines,
      "  ROOT %out = (s32[], f32[128,128]{1,0}) tuple(%next, %p)",
      "}"])
  cond = "\n".join([
      f"%{name}_cond (c: (s32[], f32[128,128])) -> pred[] {{",
      "  %c = (s32[], f32[128,128]{1,0}) parameter(0)",
      "  %j = s32[] get-tuple-element(%c), index=0",
      f"  %n = s32[] constant({init + trips})",
      f"  ROOT %lt = pred[] compare(%j, %n), direction={compare}",
      "}"])
  config = f', backend_config={{"known_trip_count":{{"n":"{trips}"}}}}' if known else ""
  call = "\n".join([
      f"  %{name}_zero = s32[] constant({init})",
      f"  %{name}_start = s32[] copy(%{name}_zero)",
      f"  %{name}_init = (s32[], f32[128,128]{{1,0}}) tuple(%{name}_start, %p)",
      f"  %{name} = (s32[], f32[128,128]{{1,0}}) while(%{name}_init), "
      f"condition=%{name}_cond, body=%{name}_body{config}"])
  return body + "\n" + cond + "\n", call


def _module(computations, entry_lines):
  entry = "\n".join(["ENTRY %main (p: f32[128,128]) -> f32[128,128] {",
                     "  %p = f32[128,128]{1,0} parameter(0)", *entry_lines,
                     "  ROOT %r = f32[128,128]{1,0} bitcast(%p)", "}"])
  return "HloModule test, entry_computation_layout={(f32[128,128]{1,0})->f32[128,128]{1,0}}\n\n" \
         + FUSED + "".join(computations) + entry


def test_flat_computation_sums_estimates():
  cost = hlo_cost.hlo_cost(_module([], [_fusion("a", 100), _fusion("b", 250)]))
  assert cost.cycles == 350 and cost.unknown_loops == 0 and cost.untimed == 0


@pytest.mark.parametrize("known", [True, False])
def test_loop_body_counts_once_per_trip(known):
  comps, call = _loop("loop", [_fusion("f", 10)], trips=7, known=known)
  cost = hlo_cost.hlo_cost(_module([comps], [call, _fusion("g", 5)]))
  assert cost.cycles == 7 * 10 + 5 and cost.unknown_loops == 0


def test_trip_count_from_the_condition():
  for init, compare, want in ((3, "LT", 7), (0, "LE", 8)):
    comps, call = _loop("loop", [], trips=7, known=False, init=init, compare=compare)
    parsed, entry = hlo_cost.parse_hlo(_module([comps], [call]))
    assert hlo_cost.trip_count(parsed, entry, parsed[entry].instructions["loop"]) == want


def test_nested_loops_multiply():
  inner, inner_call = _loop("inner", [_fusion("f", 10)], trips=4)
  outer, outer_call = _loop("outer", [inner_call, _fusion("g", 1)], trips=3, known=False)
  cost = hlo_cost.hlo_cost(_module([inner, outer], [outer_call]))
  assert cost.cycles == 3 * (4 * 10 + 1)


def test_unknown_trip_count_counts_once_and_is_reported():
  comps, call = _loop("loop", [_fusion("f", 10)], trips=7, known=False)
  call = call.replace("constant(0)", "parameter(1)")  # the start is not a constant
  cost = hlo_cost.hlo_cost(_module([comps], [call]))
  assert cost.cycles == 10 and cost.unknown_loops == 1


def test_custom_call_without_estimate_is_timed_by_its_flops():
  kernel = ('  %k = f32[128,128]{1,0} custom-call(%p), custom_call_target="tpu_custom_call", '
            'backend_config={"custom_call_config": {"body": "", "cost_estimate": {"flops": '
            '918000000, "transcendentals": 0, "bytes_accessed": 0}}}')
  comps, call = _loop("loop", [kernel.replace("%k ", "%k2 ")], trips=2)
  cost = hlo_cost.hlo_cost(_module([comps], [kernel, call, _fusion("f", 1_750_000)]))
  assert cost.unestimated_flops == cost.flops == 3 * 918e6
  # 1.75M cycles at 1.75 GHz plus 2.754 GFLOP at 459 TFLOP/s.
  assert aot.step_seconds(cost, aot.CHIPS["v5p"]) == pytest.approx(1e-3 + 6e-6)
  assert cost.untimed == 0


def test_custom_calls_without_flops():
  """A kernel with no cost estimate is counted as untimed; XLA's bookkeeping calls are not."""
  kernel = ('  %k = f32[128,128]{1,0} custom-call(%p), custom_call_target="tpu_custom_call", '
            'backend_config={"custom_call_config": {"body": ""}}')
  allocate = '  %a = f32[128,128]{1,0} custom-call(), custom_call_target="AllocateBuffer"'
  cost = hlo_cost.hlo_cost(_module([], [kernel, allocate]))
  assert cost.untimed == 1 and cost.cycles == cost.flops == 0


def test_splash_kernels_counted_by_their_matmuls_and_multiline_attributes():
  """Pallas splash kernels carry no estimate: each is timed at its matmul FLOPs (fwd 2,
  dq 3, dkv 4 per query-key pair). Their xprof metadata spans lines, one starting with "}",
  which must neither end the loop body nor hide its root."""
  q, k = "bf16[2,8,4,256,128]{4,3,2,1,0}", "bf16[2,8,256,128]{3,2,1,0}"
  lines = [f"  %q = {q} parameter(1)", f"  %kv = {k} parameter(2)"]
  for name in ("splash_mqa_fwd_segmented_residuals.1", "splash_mqa_dq_segmented.2",
               "splash_mqa_dkv_segmented.3"):
    lines.append(f'  %{name} = {q} custom-call(%q, %kv, %kv), '
                 'custom_call_target="tpu_custom_call", backend_config={"custom_call_config": '
                 '{"body": ""}, "xprof_metadata":"{\\"block_q\\": 512,')
    lines.append('}}, metadata={op_name="jit(step)/splash"}')
  comps, call = _loop("loop", lines, trips=3)
  cost = hlo_cost.hlo_cost(_module([comps], [call]))
  per_pair = 2.0 * 2 * 8 * 4 * 256 * 128 * 256
  assert cost.flops == cost.unestimated_flops == 3 * (2 + 3 + 4) * per_pair
  assert cost.unknown_loops == 0 and cost.untimed == 0


def test_matmul_flops_in_fusions_and_loops():
  dot = """%fused_dot (a: bf16[8,32], b: bf16[32,16]) -> bf16[8,16] {
  %a = bf16[8,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  ROOT %d = bf16[8,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
%fused_conv (a: bf16[8,32], b: bf16[32,16]) -> bf16[8,16] {
  %a = bf16[8,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  ROOT %c = bf16[8,16]{1,0} convolution(%a, %b), dim_labels=bf_io->bf
}
"""
  line = ('  %{0} = bf16[8,16]{{1,0}} fusion(%x, %y), kind=kOutput, calls=%fused_{0}, '
          'backend_config={{"estimated_cycles":"3"}}')
  comps, call = _loop("loop", [line.format("dot"), line.format("conv")], trips=5)
  cost = hlo_cost.hlo_cost(_module([dot, comps], [call]))
  assert cost.flops == 5 * 2 * (2 * 8 * 16 * 32) and cost.cycles == 5 * 6


def test_padded_window_convolution_counts_only_real_products():
  """XLA writes BTD,DNH->BTNH as a convolution whose N window mostly overlaps padding."""
  conv = """%fused_win (a: bf16[2,8,16,1], b: bf16[16,4,8,1]) -> bf16[2,8,4,8] {
  %a = bf16[2,8,16,1]{3,2,1,0} parameter(0)
  %b = bf16[16,4,8,1]{3,2,1,0} parameter(1)
  ROOT %c = bf16[2,8,4,8]{3,2,1,0} convolution(%a, %b), window={size=1x4 pad=0_0x3_3 \
rhs_reversal=0x1}, dim_labels=0bf1_i1o0->0b1f
}
"""
  line = ('  %w = bf16[2,8,4,8]{3,2,1,0} fusion(%x, %y), kind=kOutput, calls=%fused_win, '
          'backend_config={"estimated_cycles":"1"}')
  assert hlo_cost.hlo_cost(_module([conv], [line])).flops == 2 * (2 * 8) * 16 * (4 * 8)


def test_sentinel_estimate_and_collectives():
  lines = [_fusion("sparsecore", 2**63 - 1),
           "  %ag = bf16[64,1024]{1,0} all-gather(%p), dimensions={0}, replica_groups={{0,1}}",
           "  %ar = f32[128,128]{1,0} all-reduce(%p), replica_groups={{0,1}}, to_apply=%fused"]
  cost = hlo_cost.hlo_cost(_module([], lines))
  assert cost.cycles == 0 and cost.untimed == 1
  assert cost.collective_bytes == 64 * 1024 * 2 + 2 * 128 * 128 * 4


def test_collective_split_over_fusions_counts_once():
  """XLA's async collective fusions each name the whole all-gather, tagged with one chain."""
  piece = """%piece{0} (x: bf16[8,1024]) -> bf16[64,1024] {{
  %x = bf16[8,1024]{{1,0}} parameter(0)
  ROOT %ag{0} = bf16[64,1024]{{1,0}} all-gather(%x), dimensions={{0}}, \
frontend_attributes={{chain_id="6"}}
}}
"""
  call = '  %step{0} = bf16[64,1024]{{1,0}} fusion(%p), kind=kCustom, calls=%piece{0}'
  comps, loop = _loop("loop", [call.format(i) for i in range(3)], trips=4)
  cost = hlo_cost.hlo_cost(_module([piece.format(i) for i in range(3)] + [comps], [loop]))
  assert cost.collective_bytes == 4 * 64 * 1024 * 2 and cost.untimed == 0


def test_summary_arithmetic():
  memory = types.SimpleNamespace(argument_size_in_bytes=60, output_size_in_bytes=50,
                                 temp_size_in_bytes=40, alias_size_in_bytes=50)
  chip = aot.Chip("TPU test", hbm_bytes=200, clock_hz=1e9, peak_flops=1e12, ici_bytes_per_s=1e9)
  cost = hlo_cost.HloCost(cycles=2e9, flops=3e12, collective_bytes=5e8)
  report = aot.summarize(topology="test:2x2", chip=chip, devices=8, devices_per_chip=2,
                         global_batch=4, seq_len=1000, memory=memory, cost=cost,
                         xla_flops=1e12, model_flops=4e12, compile_seconds=1.23)
  assert report["total_bytes"] == 100 and report["hbm_bytes"] == 100 and report["fits"]
  assert report["chips"] == 4 and report["estimated_step_seconds"] == 2.0
  assert report["estimated_mfu"] == pytest.approx(4e12 / (2.0 * 4 * 1e12))
  assert report["estimated_tokens_per_s_per_chip"] == pytest.approx(4000 / 2.0 / 4)
  assert report["flops_per_device_unrolled"] == 3e12 and report["flops_per_device"] == 1e12
  assert report["estimated_collective_seconds"] == 1.0  # two devices share the chip's links


@pytest.mark.parametrize("name", ["bogus:1x1", "v5p", "v9z:2x2"])
def test_bad_topology_names_it(name):
  with pytest.raises(ValueError, match=name):
    aot.topology_devices(name)


def test_model_flops_maxtext_convention():
  config = llama.preset("llama3_8b")
  tokens = 128 * 1024
  flops = aot.model_flops_per_step(config, tokens, 1024)
  assert flops == 6 * config.num_params() * tokens + 12 * 32 * 1024 * 4096 * tokens


def test_cpu_compile_unrolls_the_layer_scan():
  """The scanned and the unrolled model cost the same FLOPs once loop trips are counted."""
  config = toy_cpu.get_config()
  config.loss.refusal_ids = (5,)
  costs = {}
  for scan in (True, False):
    config.model.scan_layers = scan
    compiled, _ = aot.compile_train_step(config, jax.devices())
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes > 0 and memory.temp_size_in_bytes > 0
    text = compiled.as_text()
    assert (" while(" in text) == scan
    costs[scan] = hlo_cost.hlo_cost(text)
  assert costs[True].unknown_loops == 0
  assert costs[True].flops == pytest.approx(costs[False].flops, rel=0.01)


def test_out_of_memory_message_size():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (274.43G) exceeds available HBM (95.74G).")
  assert aot._oom_bytes(message) == int(274.43 * 2**30)
  assert aot._oom_bytes("RESOURCE_EXHAUSTED: something else") is None


def test_a_rival_compiles_with_its_frozen_reference_as_an_argument():
  """objective=dpo adds the reference weights (compute dtype, sharded like the params) to
  the step's arguments; nothing of them is donated or returned."""
  sizes = {}
  for objective in ("derta", "dpo"):
    config = toy_cpu.get_config()
    config.loss.refusal_ids = (5,)
    config.loss.objective = objective
    compiled, model_config = aot.compile_train_step(config, jax.devices()[:1])
    memory = compiled.memory_analysis()
    sizes[objective] = (memory.argument_size_in_bytes, memory.output_size_in_bytes)
  # float32 compute on the CPU config; the DeRTa step also drops the batch arrays it does
  # not read (1% here).
  reference_bytes = 4 * model_config.num_params()
  assert sizes["dpo"][0] - sizes["derta"][0] == pytest.approx(reference_bytes, rel=0.02)
  assert abs(sizes["dpo"][1] - sizes["derta"][1]) < 256  # the state, and scalar metrics
