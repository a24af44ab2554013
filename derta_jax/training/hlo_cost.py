"""Compiled HLO text -> per-device cost: the TPU compiler's cycle estimates, FLOPs, collectives.

Adds up the compiler's own per-instruction estimates ("estimated_cycles" in the backend
config of each fusion, copy, ...), with every while-loop body counted as often as the loop
runs (trip counts read from the loop condition). Collectives carry no estimate; their bytes
are summed separately. Pure functions of the text, so tests use hand-written HLO.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  attrs: str


@dataclasses.dataclass(frozen=True)
class Computation:
  instructions: dict[str, Instruction]
  root: str


_HEADER = re.compile(r"(ENTRY\s+)?%?([^\s(]+)\s*\(.*->.*\{\s*$")
_ASSIGN = re.compile(r"\s+(ROOT\s+)?%?([^\s=]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([\w-]+)\(")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z\d]*)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
         "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
         "c64": 64, "c128": 128}
_COLLECTIVES = {"all-gather", "all-gather-start", "all-reduce", "all-reduce-start",
                "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute",
                "collective-permute-start", "collective-broadcast"}
_FLIP = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "NE": "NE"}


def _close(text: str, start: int) -> int:
  """Index after the bracket that closes the one at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += (text[i] in "([{") - (text[i] in ")]}")
    if depth == 0:
      return i + 1
  raise ValueError(f"unbalanced brackets in HLO line: {text[:200]!r}")


def _split_top(text: str) -> list[str]:
  parts, depth, start = [], 0, 0
  for i, c in enumerate(text):
    depth += (c in "([{") - (c in ")]}")
    if c == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return [p.strip() for p in parts + [text[start:]] if p.strip()]


def _instruction(line: str) -> tuple[bool, Instruction] | None:
  assign = _ASSIGN.match(line)
  if assign is None:
    return None
  pos = assign.end()
  end = _close(line, pos) if line[pos] == "(" else line.index(" ", pos)
  opcode = _OPCODE.match(line, end)
  args_end = _close(line, opcode.end() - 1)
  operands = tuple(p.split()[-1].lstrip("%")
                   for p in _split_top(line[opcode.end():args_end - 1]))
  return bool(assign.group(1)), Instruction(assign.group(2), line[pos:end], opcode.group(1),
                                            operands, line[args_end:])


def _logical_lines(hlo_text: str) -> list[str]:
  """Lines with instructions rejoined: a string attribute may hold newlines (Pallas
  kernels' xprof metadata), and its continuation can even start with "}"."""
  lines: list[str] = []
  for line in hlo_text.splitlines():
    starts_item = (not line or line == "}" or not line.startswith((" ", "}"))
                   or _ASSIGN.match(line) is not None)
    if lines and not starts_item:
      lines[-1] += "\n" + line
    else:
      lines.append(line)
  return lines


def parse_hlo(hlo_text: str) -> tuple[dict[str, Computation], str]:
  """(computations by name, entry name) of an HLO module's text."""
  comps, entry, current, root = {}, None, None, None
  for line in _logical_lines(hlo_text):
    header = _HEADER.match(line)
    if header:
      current, root = {}, None
      name = header.group(2)
      entry = name if header.group(1) else entry
    elif current is not None and line == "}":
      comps[name] = Computation(current, root or next(reversed(current)))
      current = None
    elif current is not None and (parsed := _instruction(line)):
      is_root, ins = parsed
      current[ins.name] = ins
      root = ins.name if is_root else root
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _attr(ins: Instruction, key: str) -> str | None:
  match = re.search(rf"\b{key}=%?([^\s,]+)", ins.attrs)
  return match.group(1) if match else None


def _number(ins: Instruction, key: str) -> float | None:
  match = re.search(rf'"{key}":\s*"?(\d+(?:\.\d+)?)', ins.attrs)
  return float(match.group(1)) if match else None


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape)]


def _largest_bytes(shape: str) -> float:
  return max((math.prod(d) * _BITS.get(t, 32) / 8 for t, d in _arrays(shape)), default=0.0)


def _window_taps(attrs: str, lhs, lhs_labels: str, out, out_labels: str) -> int:
  """Window taps per output element that land on input rather than padding, over all spatial
  dims (XLA writes some batched matmuls as convolutions over padded, reversed windows)."""
  window = re.search(r"window=\{([^}]*)\}", attrs)
  # e.g. "size=1x32 pad=0_0x31_31" -> {"size": [(1,), (32,)], "pad": [(0, 0), (31, 31)]}
  fields = {key: [tuple(int(x) for x in dim.split("_")) for dim in value.split("x")]
            for key, value in (f.split("=") for f in window.group(1).split())} if window else {}
  taps = 1
  for d, (size,) in enumerate(fields.get("size", [])):
    (stride,), (lhs_dilation,), (rhs_dilation,) = (
        fields[key][d] if key in fields else (1,) for key in ("stride", "lhs_dilate", "rhs_dilate"))
    low = fields["pad"][d][0] if "pad" in fields else 0
    positions_OxK = (np.arange(out[out_labels.index(str(d))])[:, None] * stride
                     + np.arange(size)[None, :] * rhs_dilation - low)
    span = (lhs[lhs_labels.index(str(d))] - 1) * lhs_dilation
    taps *= int(np.sum((positions_OxK >= 0) & (positions_OxK <= span)
                       & (positions_OxK % lhs_dilation == 0)))
  return taps


def _matmul_flops(comp: Computation, ins: Instruction) -> float:
  """2 x products, for dot and convolution."""
  out = _arrays(ins.shape)[0][1]
  lhs, rhs = (_arrays(comp.instructions[o].shape)[0][1] for o in ins.operands[:2])
  if ins.opcode == "dot":
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs).group(1)
    return 2.0 * math.prod(out) * math.prod(lhs[int(d)] for d in dims.split(",") if d)
  lhs_labels, rhs_labels, out_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)",
                                                 ins.attrs).groups()
  # Each output (batch, feature) element takes i inputs at every window tap.
  return (2.0 * out[out_labels.index("b")] * out[out_labels.index("f")]
          * rhs[rhs_labels.index("i")]
          * _window_taps(ins.attrs, lhs, lhs_labels, out, out_labels))


# Matmuls per call of the splash-attention kernels (jax.experimental.pallas), which carry
# neither a cycle estimate nor a cost_estimate: the forward computes QK^T and PV, the dq
# kernel QK^T, dO V^T and dS K, the dkv kernel QK^T, P^T dO, dO V^T and dS^T Q.
_SPLASH_MATMULS = (("_fwd", 2), ("_dq_", 3), ("_dkv_", 4))


def _splash_flops(comp: Computation, ins: Instruction) -> float:
  """FLOPs of a splash kernel call, every (query, key) block counted: an upper bound, as
  the causal kernel skips the blocks above the diagonal. 0.0 for any other kernel."""
  name = ins.name + (re.search(r'op_name="([^"]*)"', ins.attrs) or [None, ""])[1]
  if "splash_m" not in name:
    return 0.0
  matmuls = next((n for key, n in _SPLASH_MATMULS if key in name), 0)
  shapes = [_arrays(comp.instructions[o].shape)[0][1] for o in ins.operands
            if o in comp.instructions and _arrays(comp.instructions[o].shape)]
  # Queries [..., G, T, H] (one more dim than keys [..., S, H]); keys' S from the 4-d ones.
  rank = max(len(d) for d in shapes)
  queries = max((d for d in shapes if len(d) == rank), key=math.prod)
  keys = [d for d in shapes if len(d) == rank - 1 and d[-1] == queries[-1]]
  if not keys:
    return 0.0
  return 2.0 * matmuls * math.prod(queries) * max(d[-2] for d in keys)


def _scalar(comps, comp_name, name, outer=None):
  """A loop counter's pieces: ("const", v), ("element", tuple index), ("add", elem, const)."""
  comp = comps[comp_name]
  ins = comp.instructions[name]
  while ins.opcode in ("copy", "bitcast", "convert", "reshape"):
    ins = comp.instructions[ins.operands[0]]
  if ins.opcode == "constant":
    try:
      return ("const", int(ins.operands[0]))
    except ValueError:
      return None
  if ins.opcode == "parameter" and outer is not None:  # inside a fusion: the caller's operand
    return _scalar(comps, outer[0], outer[1][int(ins.operands[0])])
  if (ins.opcode == "get-tuple-element"
      and comp.instructions[ins.operands[0]].opcode == "parameter"):
    return ("element", int(_attr(ins, "index")))
  if ins.opcode == "fusion":
    fused = _attr(ins, "calls")
    return _scalar(comps, fused, comps[fused].root, (comp_name, ins.operands))
  if ins.opcode in ("add", "compare"):
    args = tuple(_scalar(comps, comp_name, o, outer) for o in ins.operands)
    if ins.opcode == "compare":
      return ("compare", _attr(ins, "direction"), *args)
    consts = [a[1] for a in args if a and a[0] == "const"]
    elems = [a for a in args if a and a[0] == "element"]
    return ("add", elems[0][1], consts[0]) if len(consts) == 1 and len(elems) == 1 else None
  return None


def trip_count(comps: dict[str, Computation], caller: str, loop: Instruction) -> int | None:
  """How often a while loop runs: XLA's known_trip_count, else `i < n` with i += step."""
  known = re.search(r'"known_trip_count":\{"n":"?(\d+)', loop.attrs)
  if known:
    return int(known.group(1))
  cond, body = _attr(loop, "condition"), _attr(loop, "body")
  test = _scalar(comps, cond, comps[cond].root)
  if not test or test[0] != "compare" or None in test[2:]:
    return None
  direction, lhs, rhs = test[1:]
  if lhs[0] == "const":
    direction, lhs, rhs = _FLIP[direction], rhs, lhs
  if lhs[0] != "element" or rhs[0] != "const" or direction not in ("LT", "LE", "NE"):
    return None
  index, limit = lhs[1], rhs[1] + (direction == "LE")
  init_tuple = comps[caller].instructions[loop.operands[0]]
  body_root = comps[body].instructions[comps[body].root]
  if init_tuple.opcode != "tuple" or body_root.opcode != "tuple":
    return None
  init = _scalar(comps, caller, init_tuple.operands[index])
  step = _scalar(comps, body, body_root.operands[index])
  if not init or init[0] != "const" or not step or step[:2] != ("add", index) or step[2] < 1:
    return None
  return max(0, -(-(limit - init[1]) // step[2]))


@dataclasses.dataclass
class HloCost:
  """Per-device totals of a compiled program, loop bodies counted once per iteration."""

  cycles: float = 0.0  # sum of the compiler's estimated_cycles
  flops: float = 0.0  # dot, convolution and custom-call FLOPs
  unestimated_flops: float = 0.0  # FLOPs in fusions and custom calls with no cycle estimate
  collective_bytes: float = 0.0  # what ring collectives send: a buffer, twice for all-reduce
  untimed: int = 0  # instructions with no estimate, no FLOPs and a result of >= 4 KiB
  unknown_loops: int = 0  # while loops of unknown trip count: counted once
  # Bytes of collectives that XLA spreads over several fusions, each of which names the whole
  # collective with one chain_id: counted once per chain.
  chains: dict[str, float] = dataclasses.field(default_factory=dict)

  def __add__(self, other: HloCost) -> HloCost:
    sums = {f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in dataclasses.fields(self) if f.name != "chains"}
    return HloCost(**sums, chains={**self.chains, **other.chains})

  def settled(self) -> HloCost:
    """With the chains of one computation folded into collective_bytes."""
    return dataclasses.replace(self, chains={},
                               collective_bytes=self.collective_bytes + sum(self.chains.values()))

  def times(self, k: float) -> HloCost:
    """Floats scaled by k (a loop's trips); the counts of problems stay counts."""
    s = self.settled()
    return dataclasses.replace(s, cycles=s.cycles * k, flops=s.flops * k,
                               unestimated_flops=s.unestimated_flops * k,
                               collective_bytes=s.collective_bytes * k)


# Instructions that name data or start/finish asynchronous work (copies, slices,
# collectives) without costing time of their own, or whose cost is their callee's.
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while",
         "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier"}


def _is_free(ins: Instruction) -> bool:
  if ins.opcode == "custom-call":  # XLA's own targets (AllocateBuffer, ...) are bookkeeping
    return (_attr(ins, "custom_call_target") or "").strip('"') != "tpu_custom_call"
  return ins.opcode in _FREE or ins.opcode.endswith(("-start", "-update", "-done"))


def _estimated_cycles(ins: Instruction) -> float | None:
  cycles = _number(ins, "estimated_cycles")
  # INT64_MAX marks "no estimate" (seen on SparseCore offloads).
  return None if cycles is None or cycles >= 2.0**62 else cycles


def _computation_cost(comps, name, memo) -> HloCost:
  """One run of computation `name`; `memo` holds the computations already costed."""
  if name in memo:
    return memo[name]
  comp, total = comps[name], HloCost()
  for ins in comp.instructions.values():
    own = _estimated_cycles(ins)
    cost = HloCost(cycles=own or 0.0)
    if ins.opcode in ("dot", "convolution"):
      cost.flops = _matmul_flops(comp, ins)
    elif ins.opcode == "custom-call" and own is None:
      # A Pallas kernel's cost_estimate, else our count for the splash kernels.
      cost.flops = cost.unestimated_flops = _number(ins, "flops") or _splash_flops(comp, ins)
    elif ins.opcode in _COLLECTIVES:
      sent = _largest_bytes(ins.shape) * (1 + ins.opcode.startswith("all-reduce"))
      chain = re.search(r'chain_id="(\w+)"', ins.attrs)
      if chain:
        cost.chains = {chain.group(1): sent}
      else:
        cost.collective_bytes = sent
    if ins.opcode == "while":
      trips = trip_count(comps, name, ins)
      cost.unknown_loops = int(trips is None)
      trips = 1 if trips is None else trips
      cost += (_computation_cost(comps, _attr(ins, "body"), memo).times(trips)
               + _computation_cost(comps, _attr(ins, "condition"), memo).times(trips + 1))
    elif ins.opcode == "conditional":
      branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
      names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else
               [_attr(ins, "true_computation"), _attr(ins, "false_computation")])
      cost += max((_computation_cost(comps, b, memo).settled() for b in names),
                  key=lambda c: c.cycles)
    elif ins.opcode in ("fusion", "call", "async-start"):
      inner = _computation_cost(comps, _attr(ins, "to_apply" if ins.opcode == "call"
                                             else "calls"), memo)
      if own is not None:  # the estimate covers everything the instruction calls
        inner = dataclasses.replace(inner, cycles=0.0, unestimated_flops=0.0, untimed=0)
      elif ins.opcode == "fusion":  # timed at peak FLOP/s; counted once if untimed
        inner = dataclasses.replace(inner, unestimated_flops=inner.flops, untimed=0)
      cost += inner
    if (own is None and not cost.flops and not cost.collective_bytes and not cost.chains
        and not _is_free(ins) and _largest_bytes(ins.shape) >= 4096):
      cost.untimed += 1
    total += cost
  memo[name] = total
  return total


def hlo_cost(hlo_text: str) -> HloCost:
  """The cost of one run of the entry computation of compiled HLO text."""
  comps, entry = parse_hlo(hlo_text)
  return _computation_cost(comps, entry, {}).settled()
