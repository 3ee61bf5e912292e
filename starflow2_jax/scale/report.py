"""Compile a config's train step for a target and report what one step needs and would cost.

  rep = compile_report(config, "v5p-64")     # a Report (and rep.compiled, for --save)
  print(format_report(rep))

Memory (per chip, from XLA's `memory_analysis()` of the per-device program): arguments, outputs,
aliased (donated state written in place), temporaries and code; total = arguments + outputs - aliased
+ temporaries + code, against the chip's HBM (`train.mfu.chip_hbm`). A step that does not fit, in
the compiler's verdict (RESOURCE_EXHAUSTED) or in this total, is reported with its largest buffers,
never raised.

FLOPs: `compiled` = the matmul FLOPs of the optimized per-device HLO with loop trip counts
(`scale.hlo_flops`) times the devices; `xla_cost` = XLA's own cost analysis, which counts every loop
body once (scanned layers, gradient accumulation) and so is a lower bound; `analytical` = 6ND + 2ND +
attention (`scale.model_flops`). The step time at the chip's peak (and at `UTILISATION` of it) is
arithmetic, compiled FLOPs per chip / peak: not a measurement. XLA's own time estimate
(`optimal_seconds` of its cost analysis, TPU) is printed next to it, with the same loop caveat.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import ml_collections

from starflow2_jax.scale import abstract, hlo_flops, model_flops, topology as topology_lib

UTILISATION = 0.5  # the "realistic" fraction of peak the report also prints
LARGEST_BUFFERS = 8  # buffers listed when a step does not fit
COMPILER_LINES = 40  # lines of the compiler's out-of-memory message kept in the report
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory")
GIB = 2 ** 30


@dataclasses.dataclass
class Report:
  config_name: str
  topology: str
  device_kind: str
  devices: int
  mesh: dict[str, int]
  batch_size: int
  params: int
  trainable_params: int
  frozen_params: int
  hbm_bytes: int | None
  memory: dict[str, int] | None  # per chip: arguments, outputs, aliased, temporaries, code, total
  fits: bool | None  # None: the chip's HBM is unknown (a CPU target)
  compiled_flops: float | None  # whole step (all chips), loops counted by their trip counts
  xla_cost_flops: float | None  # XLA's cost analysis, all chips, loop bodies once
  analytical_flops: float
  analytical: dict[str, float]
  peak_flops: float | None  # per chip
  xla_optimal_seconds: float | None
  largest_buffers: list[tuple[str, int]]  # (argument path, bytes per chip), largest first
  compiler_message: str  # the compiler's out-of-memory message, when it gave one
  unknown_loops: int
  flops_source: str  # which HLO the compiled FLOPs were counted on
  lower_seconds: float
  compile_seconds: float
  compiled: Any = dataclasses.field(default=None, repr=False)  # jax.stages.Compiled (None: no fit)
  plan: Any = dataclasses.field(default=None, repr=False)  # the scale.abstract.Plan compiled

  @property
  def flop_ratio(self) -> float | None:
    return self.compiled_flops / self.analytical_flops if self.compiled_flops else None

  def step_seconds(self, utilisation: float = 1.0) -> float | None:
    if not self.compiled_flops or not self.peak_flops:
      return None
    return self.compiled_flops / self.devices / (self.peak_flops * utilisation)

  def examples_per_second(self, utilisation: float = 1.0) -> float | None:
    s = self.step_seconds(utilisation)
    return self.batch_size / s if s else None

  def against(self, hbm_bytes: int | None) -> "Report":
    """This report with the fit judged against `hbm_bytes` per chip (None: unknown)."""
    fits = False if self.memory is None else (self.memory["total"] <= hbm_bytes if hbm_bytes else None)
    return dataclasses.replace(self, hbm_bytes=hbm_bytes, fits=fits,
                               largest_buffers=[] if fits is True else largest_buffers(self.plan.args))

  def to_json(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("compiled", "plan")}
    d.update(flop_ratio=self.flop_ratio, step_seconds_at_peak=self.step_seconds(1.0),
             step_seconds_at_utilisation=self.step_seconds(UTILISATION), utilisation=UTILISATION,
             examples_per_second_at_utilisation=self.examples_per_second(UTILISATION))
    return d


def memory_of(compiled) -> dict[str, int]:
  ma = compiled.memory_analysis()
  mem = {"arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
         "aliased": ma.alias_size_in_bytes, "temporaries": ma.temp_size_in_bytes,
         "code": ma.generated_code_size_in_bytes}
  mem["total"] = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["code"]
  return {k: int(v) for k, v in mem.items()}


ARG_NAMES = ("state", "frozen", "batch", "rng")  # the train step's arguments


def largest_buffers(args: Any, n: int = LARGEST_BUFFERS,
                    names: tuple[str, ...] = ARG_NAMES) -> list[tuple[str, int]]:
  """The n largest per-chip argument buffers (path, bytes of one shard) of a step's abstract sharded
  arguments (`names`: the train step's state, frozen, batch, rng by default)."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(dict(zip(names, args)))[0]:
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    out.append((jax.tree_util.keystr(path), math.prod(shard) * x.dtype.itemsize))
  return sorted(out, key=lambda p: -p[1])[:n]


def count_flops(compiled, lowered, devices: int) -> tuple[hlo_flops.HloFlops, str, int]:
  """(counted FLOPs, source, multiplier to the whole step). The optimized per-device HLO; when the
  backend cannot print it back (libtpu's RET_CHECK on some async instructions), the unoptimized
  global HLO of the lowering: the same program before SPMD partitioning and XLA's passes."""
  try:
    return hlo_flops.count(compiled.as_text()), "optimized per-device HLO", devices
  except Exception as e:  # JaxRuntimeError from the backend
    reason = str(e).splitlines()[0][:120]
    text = lowered.compiler_ir(dialect="hlo").as_hlo_text()
    return hlo_flops.count(text), f"unoptimized global HLO (the optimized one: {reason})", 1


def cost_of(compiled) -> dict:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return dict(ca or {})


def is_oom(e: Exception) -> bool:
  return any(m in str(e) for m in OOM_MARKERS)


def compile_report(config: ml_collections.ConfigDict, target: str, config_name: str = "",
                   hbm_bytes: int | None = None) -> Report:
  """Lower and compile `config`'s train step for `target` (a `scale.topology` name). hbm_bytes: the
  per-chip memory to check against (default: the chip's HBM from `train.mfu`; None for a CPU)."""
  topo = topology_lib.parse(target)
  devices = topology_lib.target_devices(topo)
  t0 = time.perf_counter()
  plan = abstract.build(config, devices)
  lowered = plan.lower()
  t1 = time.perf_counter()
  compiled, message = None, ""
  try:
    compiled = lowered.compile()
  except Exception as e:  # XlaRuntimeError; only an out-of-memory verdict is a report, not a crash
    if not is_oom(e):
      raise
    message = "\n".join(str(e).splitlines()[:COMPILER_LINES])
  t2 = time.perf_counter()
  params = plan.state.params
  counted = model_flops.train_step_flops(plan.config, params, plan.trainable, plan.frozen,
                                         plan.task.tokens_per_example)
  memory = memory_of(compiled) if compiled is not None else None
  n = len(devices)
  hf, flops_source, per_device = None, "", 1
  if compiled is not None:
    hf, flops_source, per_device = count_flops(compiled, lowered, n)
  cost = cost_of(compiled) if compiled is not None else {}
  leaves = jax.tree.leaves(params)
  return Report(
      config_name=config_name, topology=topo.name, device_kind=devices[0].device_kind, devices=n,
      mesh={k: int(v) for k, v in plan.mesh.shape.items()}, batch_size=int(plan.config.train.batch_size),
      params=sum(x.size for x in leaves),
      trainable_params=sum(x.size for x, t in zip(leaves, jax.tree.leaves(plan.trainable)) if t),
      frozen_params=sum(x.size for x in jax.tree.leaves(plan.frozen)) if plan.frozen is not None else 0,
      hbm_bytes=None, memory=memory, fits=None,
      compiled_flops=hf.flops * per_device if hf else None, flops_source=flops_source,
      xla_cost_flops=float(cost["flops"]) * n if "flops" in cost else None,
      analytical_flops=counted.total,
      analytical={"trained": counted.trained, "frozen": counted.frozen,
                  "frozen_backward": counted.frozen_backward, "attention": counted.attention,
                  "tokens": counted.tokens},
      peak_flops=topo.peak_flops, xla_optimal_seconds=cost.get("optimal_seconds"),
      largest_buffers=[],
      compiler_message=message, unknown_loops=len(hf.unknown_loops) if hf else 0,
      lower_seconds=t1 - t0, compile_seconds=t2 - t1, compiled=compiled,
      plan=plan).against(hbm_bytes or topo.hbm_bytes)


def gib(b: float) -> str:
  return f"{b / GIB:.2f} GiB"


def fit_lines(r, advice: str) -> list[str]:
  """The verdict of a report `r` (a train-step or generation report: memory, hbm_bytes, fits,
  largest_buffers, compiler_message) and, when it does not fit, its largest buffers and `advice`."""
  verdict = {True: "FITS", None: "fit unknown (no HBM figure for this chip)"}.get(r.fits, "DOES NOT FIT")
  lines = [f"  {verdict}" + (f" ({r.memory['total'] / r.hbm_bytes:.0%} of HBM)"
                             if r.memory is not None and r.hbm_bytes else "")]
  if r.fits is False:
    lines.append("  largest argument buffers per chip:")
    lines += [f"    {gib(b):>12}  {p}" for p, b in r.largest_buffers]
    if r.compiler_message:
      lines.append("  the compiler says:")
      lines += ["    " + line for line in r.compiler_message.splitlines()]
    lines.append("  to fit: " + advice)
  return lines


def format_report(r: Report) -> str:
  """The human-readable report of `launch.compile`."""
  lines = [f"{r.config_name or 'config'} on {r.topology}: {r.devices} x {r.device_kind}, mesh {r.mesh}, "
           f"global batch {r.batch_size}",
           f"  parameters {r.params / 1e6:,.1f} M ({r.trainable_params / 1e6:,.1f} M train), frozen "
           f"{r.frozen_params / 1e6:,.1f} M; lowered in {r.lower_seconds:.1f} s, compiled in "
           f"{r.compile_seconds:.1f} s"]
  hbm = gib(r.hbm_bytes) if r.hbm_bytes else "unknown HBM"
  if r.memory is not None:
    m = r.memory
    lines.append(f"  memory per chip: arguments {gib(m['arguments'])}, outputs {gib(m['outputs'])} "
                 f"({gib(m['aliased'])} aliased), temporaries {gib(m['temporaries'])}, code "
                 f"{gib(m['code'])}; total {gib(m['total'])} of {hbm}")
  lines += fit_lines(r, "shard more (mesh.shape fsdp / tensor), remat (model.remat=full), a smaller "
                        "train.batch_size with train.grad_accum, or a larger slice")
  a = r.analytical
  back = f", 2ND backward through frozen {a['frozen_backward']:.4g}" if a["frozen_backward"] else ""
  lines.append(f"  analytical FLOPs per step {r.analytical_flops:.4g} (6ND trained {a['trained']:.4g}, "
               f"2ND frozen {a['frozen']:.4g}{back}, attention {a['attention']:.4g}; {a['tokens']:,} "
               "tokens)")
  if r.compiled_flops:
    lines.append(f"  compiled FLOPs per step {r.compiled_flops:.4g} (matmuls of the {r.flops_source}, loops x "
                 "trip counts"
                 f"{'; %d loops of unknown trip count counted once' % r.unknown_loops if r.unknown_loops else ''}"
                 f"); compiled / analytical = {r.flop_ratio:.3f}")
  if r.xla_cost_flops:
    lines.append(f"  XLA cost analysis {r.xla_cost_flops:.4g} FLOPs (counts each loop body once)")
  if r.peak_flops and r.compiled_flops:
    lines.append(f"  arithmetic, not a measurement: at the chip's peak {r.peak_flops / 1e12:.0f} TFLOP/s a "
                 f"step takes {r.step_seconds(1.0):.4g} s ({r.examples_per_second(1.0):,.1f} examples/s); at "
                 f"{UTILISATION:.0%} of peak {r.step_seconds(UTILISATION):.4g} s "
                 f"({r.examples_per_second(UTILISATION):,.1f} examples/s)")
  if r.xla_optimal_seconds and r.xla_optimal_seconds > 0:  # libtpu gives negative ones for some programs
    lines.append(f"  XLA's own time estimate: {r.xla_optimal_seconds:.4g} s per step (loop bodies once)")
  return "\n".join(lines)
