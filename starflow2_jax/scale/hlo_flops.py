"""Matmul FLOPs of a compiled program, with its loops counted as many times as they run.

XLA's `compiled.cost_analysis()["flops"]` counts the body of a `while` loop once, whatever its trip
count: a 24-layer scanned transformer is counted as one layer, and a `grad_accum` scan as one
micro-batch. This module reads the optimized HLO text instead (`compiled.as_text()`, the per-device
program after SPMD partitioning) and adds up

  dot          2 x output elements x contracted size (the lhs contracting dimensions)
  convolution  2 x multiply-adds, tap by tap: output batch x output features x input features x the
               window taps that land on data (TPU lowers matmuls to convolutions with `dim_labels`,
               batch dims in lhs-dilated windows and pairs of shards in padded windows)

through fusions and calls, multiplying a loop body by its trip count and taking the larger branch of
a conditional. The trip count is the `known_trip_count` XLA records on the loop (CPU, GPU) or else
(TPU) read from the loop: a condition `counter < N` with an integer constant N, the counter's start
in the init tuple (a constant, else 0) and its step in the body (`counter + constant`, else 1; the
TPU's collective matmuls step by 2). A loop without either is counted once and listed in
`unknown_loops`.
Element-wise work is not counted (a few percent of a transformer step).
"""
from __future__ import annotations

import dataclasses
import math
import re

_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"^[a-z]+\d*\[([\d,]*)\]")
_OPERAND = re.compile(r"%?([\w.\-]+)")  # optimized HLO text prefixes names with %, unoptimized not
_CALLS = re.compile(r"\b(?:calls|to_apply|body|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_INT_CONSTANT = re.compile(r"^[su]\d+\[\]")


@dataclasses.dataclass
class HloFlops:
  flops: float  # per device, loops multiplied by their trip counts
  loops: dict[str, int]  # while instruction -> trip count used
  unknown_loops: list[str]  # loops without a known trip count (counted once)


def _dims(type_text: str) -> tuple[int, ...] | None:
  m = _ARRAY.match(type_text.strip())
  if not m:
    return None
  return tuple(int(d) for d in m.group(1).split(",") if d)


def _parse(text: str):
  """-> ({computation: [(name, type, opcode, rest)]}, the ENTRY computation's name,
  {computation: its ROOT instruction's name})."""
  comps: dict[str, list] = {}
  entry, current = None, None
  roots: dict[str, str] = {}
  for line in text.splitlines():
    if current is None:
      m = _COMP.match(line)
      if m and "=" not in line.split("{")[0].split("(")[0]:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      comps[current].append(m.groups())
      if line.lstrip().startswith("ROOT"):
        roots[current] = m.group(1)
  return comps, entry, roots


def _window(rest: str, key: str, n: int, default: int) -> list[int]:
  m = re.search(r"window=\{[^}]*\b" + key + r"=([\d_x]+)", rest)
  if not m:
    return [default] * n
  return [int(x.split("_")[0]) for x in m.group(1).split("x")]


def _taps(i: int, o: int, k: int, stride: int, pad_lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
  """Multiply-adds of one spatial dimension summed over its o outputs: the window taps that land on
  input data (not on padding, not in the holes of an lhs dilation)."""
  last = (i - 1) * lhs_dilate
  return sum(1 for out in range(o) for j in range(k)
             if 0 <= (p := out * stride + j * rhs_dilate - pad_lo) <= last and p % lhs_dilate == 0)


def _conv_flops(out: tuple[int, ...], lhs: tuple[int, ...], rhs: tuple[int, ...], rest: str) -> float:
  """2 x multiply-adds of a convolution, counted tap by tap per spatial dimension: TPU matmuls are
  convolutions whose windows cover batch dims through an lhs dilation (`size=8 stride=7
  lhs_dilate=8`: one tap per output) or pairs of shards through padding (`size=2 pad=1_1`)."""
  m = re.search(r"dim_labels=([\w]+)_([\w]+)->([\w]+)", rest)
  if not m:
    return 0.0
  lhs_l, rhs_l, out_l = m.groups()
  spatial = sorted(c for c in out_l if c.isdigit())
  n = len(spatial)
  size, stride = _window(rest, "size", n, 1), _window(rest, "stride", n, 1)
  lhs_dil, rhs_dil = _window(rest, "lhs_dilate", n, 1), _window(rest, "rhs_dilate", n, 1)
  pads = re.search(r"window=\{[^}]*\bpad=([\d_x\-]+)", rest)
  pad_lo = [int(x.split("_")[0]) for x in pads.group(1).split("x")] if pads else [0] * n
  macs = math.prod(d for d, c in zip(out, out_l) if not c.isdigit()) * rhs[rhs_l.index("i")]
  for k, c in enumerate(spatial):
    macs *= _taps(lhs[lhs_l.index(c)], out[out_l.index(c)], size[k], stride[k], pad_lo[k],
                  lhs_dil[k], rhs_dil[k])
  return 2.0 * macs


def _op_flops(opcode: str, out: tuple[int, ...] | None, rest: str, shapes: dict) -> float:
  if out is None:
    return 0.0
  operands = _OPERAND.findall(rest.split(")")[0])
  if opcode == "dot":
    lhs = shapes.get(operands[0]) if operands else None
    m = _CONTRACT.search(rest)
    if lhs is None or m is None:
      return 0.0
    contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d)
    return 2.0 * math.prod(out) * contracted
  if opcode == "convolution":
    lhs, rhs = (shapes.get(o) for o in (operands + [None, None])[:2])
    return _conv_flops(out, lhs, rhs, rest) if lhs and rhs else 0.0
  return 0.0


def _int_constant(by_name: dict, name: str) -> int | None:
  type_text, opcode, rest = by_name.get(name, ("", "", ""))
  if opcode == "constant" and _INT_CONSTANT.match(type_text.strip()):
    return int(rest.split(")")[0])
  return None


def _tuple_index(by_name: dict, name: str) -> int | None:
  """i of `get-tuple-element(param), index=i`."""
  _, opcode, rest = by_name.get(name, ("", "", ""))
  m = re.search(r"\bindex=(\d+)", rest) if opcode == "get-tuple-element" else None
  return int(m.group(1)) if m else None


def _operands(rest: str) -> list[str]:
  return _OPERAND.findall(rest.split(")")[0])


def _trip_from_condition(comps: dict, roots: dict, cond: str, body: str, init: str | None,
                         caller: dict) -> int | None:
  """Trips of a loop whose condition is `counter < N` (N an integer constant): (N - start) / step,
  with the counter's start read from the loop's init tuple (0 unless a constant there) and its step
  from the body's ROOT tuple (`counter + constant`, 1 otherwise)."""
  c_by = {name: (t, op, rest) for name, t, op, rest in comps.get(cond, [])}
  root = roots.get(cond)
  if root not in c_by or c_by[root][1] != "compare" or "direction=LT" not in c_by[root][2]:
    return None
  lhs, rhs = (_operands(c_by[root][2]) + [None, None])[:2]
  bound, index = _int_constant(c_by, rhs), _tuple_index(c_by, lhs)
  if bound is None or index is None:
    return None
  start, step = 0, 1
  if init in caller and caller[init][1] == "tuple":
    items = _operands(caller[init][2])
    if index < len(items):
      start = _int_constant(caller, items[index]) or 0
  b_by = {name: (t, op, rest) for name, t, op, rest in comps.get(body, [])}
  b_root = roots.get(body)
  if b_root in b_by and b_by[b_root][1] == "tuple":
    items = _operands(b_by[b_root][2])
    if index < len(items) and b_by.get(items[index], ("", ""))[1] == "add":
      a = _operands(b_by[items[index]][2])
      consts = [v for v in (_int_constant(b_by, x) for x in a) if v is not None]
      if consts and any(_tuple_index(b_by, x) == index for x in a):
        step = consts[0]
  return max(0, -(-(bound - start) // max(step, 1)))


def count(hlo_text: str) -> HloFlops:
  """Matmul FLOPs of one run of the ENTRY computation of an optimized HLO module (per device)."""
  comps, entry, roots = _parse(hlo_text)
  loops: dict[str, int] = {}
  unknown: list[str] = []
  memo: dict[str, float] = {}

  def flops(comp: str) -> float:
    if comp in memo:
      return memo[comp]
    memo[comp] = 0.0  # guards against recursion
    shapes = {name: _dims(type_text) for name, type_text, _, _ in comps.get(comp, ())}
    by_name = {name: (type_text, op, rest) for name, type_text, op, rest in comps.get(comp, ())}
    total = 0.0
    for name, type_text, opcode, rest in comps.get(comp, ()):
      total += _op_flops(opcode, shapes[name], rest, shapes)
      if opcode == "while":
        body = re.search(r"\bbody=%?([\w.\-]+)", rest)
        cond = re.search(r"\bcondition=%?([\w.\-]+)", rest)
        trip = _TRIP.search(rest)
        init = (_operands(rest) or [None])[0]
        n = int(trip.group(1)) if trip else (
            _trip_from_condition(comps, roots, cond.group(1), body.group(1), init, by_name)
            if cond and body else None)
        if n is None:
          unknown.append(name)
          n = 1
        loops[name] = n
        total += n * (flops(body.group(1)) if body else 0.0)
      elif opcode == "conditional":
        m = _BRANCHES.search(rest)
        names = _OPERAND.findall(m.group(1)) if m else _CALLS.findall(rest)
        total += max((flops(c) for c in names), default=0.0)
      else:
        total += sum(flops(c) for c in _CALLS.findall(rest))
    memo[comp] = total
    return total

  return HloFlops(flops(entry) if entry else 0.0, loops, unknown)
