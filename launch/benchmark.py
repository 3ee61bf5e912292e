"""Sampling and training-step benchmark of a STARFlow deep-shallow stack, measured in one run.

  python -m launch.benchmark [--width=256] [--tokens=256] [--batch=1] [--repeats=3]
      [--parts=sampling,jacobi,flops] [--dtype=float32|bfloat16] [--out=FILE.json] [--quick]

Parts (each prints a table of median times over --repeats timed calls, after compilation):
  sampling  cached sequential sampling (`flows.reverse`, KV cache, one token per step) vs
            `flows.reverse_uncached` (the block's full causal forward recomputed at every token).
  jacobi    Jacobi (`flows.Jacobi`) vs cached sequential sampling, with the production init (zero
            proj_out kernels: a near-identity flow) and with proj_out kernels ~ N(0, head_std^2).
  flops     achieved FLOP/s of a jitted forward+backward (`jax.value_and_grad` of `flows.loss`) at
            --flops_width, as a fraction of the matmul peak measured in the same run (the fastest
            square `jnp.dot` of --peak_sizes, in the trunk dtype). FLOPs: XLA's cost analysis of
            the compiled step, cross-checked against 3 x (2 x kernel params x B T + 4 x B T^2 x
            width per layer).

The model is the STARFlow stack of the flows API (starflow parametrisation and layout, 2-D RoPE,
starflow2 permutations, class conditioning of the deep block) on a square grid of --tokens 2x2
patches of a 4-channel latent, so each token has 16 channels. --dtype sets the trunk compute dtype;
parameters and all flow maths (affine heads, log-dets, sampling state) stay float32. The script runs
on the default device (jax.devices()[0]) of whatever backend JAX picks: CPU, GPU or TPU alike.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from starflow2_jax import flows

_WIDTH = flags.DEFINE_integer("width", 256, "transformer width of the sampling and Jacobi models")
_TOKENS = flags.DEFINE_integer("tokens", 256, "tokens per image (a perfect square)")
_LAYERS = flags.DEFINE_list("layers", ["2", "2", "4"], "layers per flow block, data side first")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "attention head dimension")
_BATCH = flags.DEFINE_integer("batch", 1, "images per sampling call")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per measurement (median reported)")
_PARTS = flags.DEFINE_list("parts", ["sampling", "jacobi", "flops"], "parts to run")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "trunk compute dtype")
_JACOBI_BLOCK = flags.DEFINE_integer("jacobi_block", 16, "Jacobi chunk length (tokens)")
_JACOBI_THRESHOLD = flags.DEFINE_float("jacobi_threshold", 1e-3, "Jacobi relative-change threshold")
_JACOBI_MAX_ITER = flags.DEFINE_integer("jacobi_max_iter", 32, "most Jacobi iterations per chunk")
_HEAD_STD = flags.DEFINE_float("head_std", 0.05, "std of the randomised proj_out kernels (jacobi)")
_FLOPS_WIDTH = flags.DEFINE_integer("flops_width", 512, "width of the forward+backward model")
_FLOPS_BATCH = flags.DEFINE_integer("flops_batch", 4, "images per forward+backward step")
_PEAK_SIZES = flags.DEFINE_list("peak_sizes", ["1024", "2048", "4096"],
                                "M = N = K of the peak matmuls (the fastest size is the peak)")
_OUT = flags.DEFINE_string("out", None, "write the figures as JSON to this new file")
_QUICK = flags.DEFINE_bool("quick", False, "smoke test: width 64, 16 tokens, one 1-layer block, "
                           "peak sizes 256 and 512, 2 repeats (overrides size and repeat flags)")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the parameters and the noise")

PARTS = ("sampling", "jacobi", "flops")
MIN_PEAK_CALL_S = 0.2  # chain matmuls so that one call of the peak kernel lasts about this long


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one benchmark run measures (the flags after --quick has been applied)."""
  width: int = 256
  tokens: int = 256
  layers: tuple[int, ...] = (2, 2, 4)
  head_dim: int = 64
  batch: int = 1
  repeats: int = 3
  parts: tuple[str, ...] = PARTS
  dtype: str = "float32"
  jacobi_block: int = 16
  jacobi_threshold: float = 1e-3
  jacobi_max_iter: int = 32
  head_std: float = 0.05
  flops_width: int = 512
  flops_batch: int = 4
  peak_sizes: tuple[int, ...] = (1024, 2048, 4096)
  seed: int = 0

  def __post_init__(self):
    unknown = sorted(set(self.parts) - set(PARTS))
    if unknown:
      raise ValueError(f"--parts: unknown part(s) {unknown}; known: {list(PARTS)}")
    if math.isqrt(self.tokens) ** 2 != self.tokens:
      raise ValueError(f"--tokens must be a perfect square (a square grid), got {self.tokens}")
    if self.repeats < 1:
      raise ValueError(f"--repeats must be >= 1, got {self.repeats}")

  @classmethod
  def quick(cls, **kw) -> "Settings":
    """Tiny sizes for a smoke test (tests/test_benchmark.py); `kw` overrides any field."""
    base = dict(width=64, tokens=16, layers=(1,), head_dim=32, batch=1, repeats=2, jacobi_block=4,
                flops_width=64, flops_batch=2, peak_sizes=(256, 512))
    base.update(kw)
    return cls(**base)


def flow_config(s: Settings, width: int):
  """The benchmarked STARFlow stack: s.tokens tokens of 2x2x4 patches, `width` wide."""
  side = 2 * math.isqrt(s.tokens)
  return flows.FlowConfig(
      image_size=(side, side), channels=4, patch_size=2, width=width, head_dim=s.head_dim,
      layers_per_block=s.layers, parametrisation="starflow", layout="starflow", positions="rope2d",
      permutation_rule="starflow2", conditioning="deep", num_classes=10, dtype=s.dtype)


# -- timing ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
  """Wall-clock seconds of `repeats` calls of one compiled function (after compilation)."""
  compile_s: float
  times_s: list[float]

  @property
  def median(self) -> float:
    return statistics.median(self.times_s)

  def row(self, name: str) -> str:
    t = self.times_s
    spread = (max(t) - min(t)) / self.median if self.median > 0 else 0.0
    return (f"  {name:<34s} {self.median * 1e3:11.2f} ms   [min {min(t) * 1e3:.2f}, max "
            f"{max(t) * 1e3:.2f}, spread {100 * spread:.0f}%]  compile {self.compile_s:.1f} s")

  def to_json(self) -> dict:
    return {"median_s": self.median, "times_s": self.times_s, "compile_s": self.compile_s}


@dataclasses.dataclass
class Call:
  """A compiled function and its arguments. warmup=False skips the untimed first call (for calls
  of many seconds: the executable is compiled already, the first call only allocates buffers)."""
  fn: Any
  args: tuple
  compile_s: float
  warmup: bool = True


def compile_call(fn, *args, warmup: bool = True) -> Call:
  """AOT-compile jax.jit(fn) for `args` (.lower().compile()), recording the compile time."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return Call(compiled, args, time.perf_counter() - t0, warmup)


def time_calls(calls: dict[str, Call], repeats: int) -> tuple[dict[str, Timing], dict[str, Any]]:
  """Time `repeats` rounds; each round calls every function once, in turn, to block_until_ready,
  so load from other processes falls on all of them alike. -> (Timings, last round's outputs)."""
  for call in calls.values():
    if call.warmup:
      jax.block_until_ready(call.fn(*call.args))
  times = {name: [] for name in calls}
  outs = {}
  for _ in range(repeats):
    for name, call in calls.items():
      t0 = time.perf_counter()
      outs[name] = jax.block_until_ready(call.fn(*call.args))
      times[name].append(time.perf_counter() - t0)
  return {name: Timing(calls[name].compile_s, t) for name, t in times.items()}, outs


def ratios(num: Timing, den: Timing) -> dict:
  """num / den: ratio of medians, and the median, min and max of the per-round ratios."""
  per_round = [a / b for a, b in zip(num.times_s, den.times_s)]
  return {"of_medians": num.median / den.median, "per_round_median": statistics.median(per_round),
          "per_round_min": min(per_round), "per_round_max": max(per_round)}


def ratio_text(r: dict) -> str:
  """`ratios` as one line."""
  return (f"{r['of_medians']:.2f}x (per-round median {r['per_round_median']:.2f}x, range "
          f"{r['per_round_min']:.2f}-{r['per_round_max']:.2f}x)")


# -- models ----------------------------------------------------------------------------------------
def build_model(cfg, batch: int, seed: int):
  """-> (model, float32 variables, tokens [B, T, D] ~ N(0, 1), labels [B])."""
  model = flows.FlowModel(cfg)
  k_x, k_init = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k_x, (batch, cfg.num_tokens, cfg.token_dim), jnp.float32)
  labels = jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes
  variables = nn.unbox(jax.jit(model.init)(k_init, x, labels))
  return model, variables, x, labels


def randomise_heads(variables, std: float, seed: int):
  """Replace every proj_out kernel by N(0, std^2) draws (the production init is zero)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for key, (path, leaf) in zip(keys, leaves):
    name = jax.tree_util.keystr(path)
    if "proj_out" in name and "kernel" in name:
      leaf = std * jax.random.normal(key, leaf.shape, leaf.dtype)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def differences(x, ref) -> dict:
  """max |x - ref| and the relative RMS difference |x - ref|_2 / |ref|_2 (float64)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return {"max_abs": float(np.max(np.abs(x - ref))),
          "rel_rms": float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))}


def describe(cfg, batch: int) -> str:
  """One line naming the model size."""
  return (f"width {cfg.width}, {cfg.num_tokens} tokens, layers {cfg.layers_per_block}, "
          f"batch {batch}")


# -- parts -----------------------------------------------------------------------------------------
def bench_sampling(s: Settings, cfg, model, variables, z, labels, sequential: Call) -> dict:
  """Cached sequential sampling vs recomputing the full causal forward at every token.
  z: noise [B, T, D]; labels [B]; sequential: the compiled `flows.reverse` (x only)."""
  uncached = compile_call(lambda v, z, l: flows.reverse_uncached(model, v, z, l), variables, z,
                          labels, warmup=False)
  t, out = time_calls({"cached": sequential, "uncached": uncached}, s.repeats)
  r = ratios(t["uncached"], t["cached"])
  diff = differences(out["cached"], out["uncached"])
  steps = cfg.num_tokens * cfg.num_blocks
  print(f"\n[sampling] {describe(cfg, s.batch)}, production init; {steps} token steps over "
        f"{cfg.num_blocks} blocks")
  print(t["cached"].row("cached sequential (KV cache)"))
  print(t["uncached"].row("uncached (full forward per token)"))
  print("  (the whole uncached sampler is timed, without an untimed warm-up call)")
  print(f"  uncached / cached = {ratio_text(r)}")
  print(f"  cached: {t['cached'].median / steps * 1e3:.3f} ms per token step; max|x_cached - "
        f"x_uncached| = {diff['max_abs']:.2e}")
  return {"cached": t["cached"].to_json(), "uncached": t["uncached"].to_json(),
          "uncached_over_cached": r, "difference": diff}


def bench_jacobi(s: Settings, cfg, model, variables, z, labels, sequential: Call) -> dict:
  """Jacobi vs cached sequential sampling, production init and randomised proj_out kernels."""
  jac = flows.Jacobi(block_size=s.jacobi_block, threshold=s.jacobi_threshold,
                     max_iter=s.jacobi_max_iter)
  jacobi = compile_call(lambda v, z, l: flows.reverse(model, v, z, l, jacobi=jac), variables, z,
                        labels)
  print(f"\n[jacobi] {describe(cfg, s.batch)}; chunks of {jac.block_size} tokens, threshold "
        f"{jac.threshold:g} on the relative mean-square change, at most {jac.max_iter} iterations "
        f"(+1 exact-cache pass per chunk)")
  figures = {"block_size": jac.block_size, "threshold": jac.threshold, "max_iter": jac.max_iter}
  models = {"production_init": variables,
            f"random_heads_std{s.head_std:g}": randomise_heads(variables, s.head_std, s.seed + 1)}
  for name, v in models.items():
    t, out = time_calls({"sequential": dataclasses.replace(sequential, args=(v, z, labels)),
                         "jacobi": dataclasses.replace(jacobi, args=(v, z, labels))}, s.repeats)
    x_jac, info = out["jacobi"]
    iters = np.asarray(info["jacobi_iters"])  # [num_blocks, num_chunks]
    r = ratios(t["sequential"], t["jacobi"])
    diff = differences(x_jac, out["sequential"])
    print(f"  -- {name}")
    print(t["sequential"].row("sequential (KV cache)"))
    print(t["jacobi"].row("jacobi"))
    per_block = ", ".join(f"{m:.2f}" for m in iters.mean(axis=1))
    print(f"  sequential / jacobi = {ratio_text(r)}")
    print(f"  mean iterations per chunk {iters.mean():.2f} (per block, data side first: "
          f"{per_block}; max {iters.max()}); jacobi vs sequential sample: max abs difference "
          f"{diff['max_abs']:.2e}, relative RMS {diff['rel_rms']:.2e}")
    figures[name] = {"sequential": t["sequential"].to_json(), "jacobi": t["jacobi"].to_json(),
                     "sequential_over_jacobi": r, "mean_iters": float(iters.mean()),
                     "mean_iters_per_block": iters.mean(axis=1).tolist(),
                     "max_iters": int(iters.max()), "difference": diff}
  return figures


def analytic_train_flops(cfg, variables, batch: int) -> float:
  """3 x forward FLOPs: every Dense kernel [in, out] costs 2 in out per token, and each layer's
  attention 4 T width per token (scores and values over all T keys: the masked kernel is dense)."""
  kernels = sum(leaf.size for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
                if "kernel" in jax.tree_util.keystr(path))
  rows = batch * cfg.num_tokens
  attention = 4 * rows * cfg.num_tokens * cfg.width * sum(cfg.layers_per_block)
  return 3.0 * (2 * kernels * rows + attention)


def matmul_call(n: int, dtype, seed: int) -> tuple[Call, float]:
  """A call of [n, n] @ [n, n] products chained inside one jit so that the call lasts about
  MIN_PEAK_CALL_S (so dispatch overhead is negligible on fast devices) -> (Call, FLOPs per call)."""
  k_a, k_b = jax.random.split(jax.random.key(seed))
  a = jax.random.normal(k_a, (n, n), dtype)
  b = (jax.random.normal(k_b, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)  # |a b^k| ~ |a|

  def chain(a, b, length):
    return jax.lax.fori_loop(0, length, lambda _, y: jnp.dot(y, b), a)

  call = compile_call(functools.partial(chain, length=1), a, b)
  t, _ = time_calls({"one": call}, 1)
  length = max(1, math.ceil(MIN_PEAK_CALL_S / t["one"].median))
  if length > 1:
    call = compile_call(functools.partial(chain, length=length), a, b)
  return call, length * 2.0 * n ** 3


def bench_flops(s: Settings) -> dict:
  """Achieved forward+backward FLOP/s as a fraction of the measured matmul peak."""
  dt = jnp.dtype(s.dtype)
  print(f"\n[flops] {dt.name} trunk; matmul peak: the fastest square {dt.name} jnp.dot of sizes "
        f"{list(s.peak_sizes)} (products chained to about {MIN_PEAK_CALL_S} s per call)")
  matmuls = {n: matmul_call(n, dt, s.seed) for n in s.peak_sizes}
  sweep, _ = time_calls({n: call for n, (call, _) in matmuls.items()}, s.repeats)
  rates = {n: matmuls[n][1] / sweep[n].median for n in s.peak_sizes}
  for n in s.peak_sizes:
    print(sweep[n].row(f"{n}^3: {rates[n] / 1e9:.1f} GFLOP/s"))
  best = max(rates, key=rates.get)

  cfg = flow_config(s, s.flops_width)
  model, variables, x, labels = build_model(cfg, s.flops_batch, s.seed)
  params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables))
  step = compile_call(lambda v, x, l: jax.value_and_grad(
      lambda v: flows.loss(model.apply(v, x, l)))(v), variables, x, labels)
  cost = step.fn.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost["flops"])
  analytic = analytic_train_flops(cfg, variables, s.flops_batch)
  # the peak kernel again, interleaved with the step, so both see the same background load
  t, _ = time_calls({"peak": matmuls[best][0], "step": step}, s.repeats)
  peak = matmuls[best][1] / t["peak"].median
  achieved = xla_flops / t["step"].median
  per_round = [(xla_flops / ts) / (matmuls[best][1] / tp)
               for ts, tp in zip(t["step"].times_s, t["peak"].times_s)]
  print(f"  forward+backward: {describe(cfg, s.flops_batch)}, {params / 1e6:.2f} M params; "
        f"interleaved with the {best}^3 peak kernel")
  print(t["peak"].row(f"{best}^3: {peak / 1e9:.1f} GFLOP/s"))
  print(t["step"].row("value_and_grad(loss)"))
  print(f"  FLOPs per step: XLA cost analysis {xla_flops / 1e9:.2f} G, analytic "
        f"{analytic / 1e9:.2f} G (XLA / analytic = {xla_flops / analytic:.3f})")
  print(f"  achieved {achieved / 1e9:.1f} GFLOP/s (XLA count) = {achieved / peak:.3f} of the "
        f"measured peak {peak / 1e9:.1f} GFLOP/s ({analytic / t['step'].median / peak:.3f} with "
        f"the analytic count; per round {min(per_round):.3f}-{max(per_round):.3f})")
  return {"peak": {"dtype": dt.name, "size": best, "flop_per_s": peak,
                   "timing": t["peak"].to_json(),
                   "sweep_flop_per_s": {str(n): r for n, r in rates.items()}},
          "train_step": {"width": cfg.width, "tokens": cfg.num_tokens, "batch": s.flops_batch,
                         "params": params, "timing": t["step"].to_json(), "xla_flops": xla_flops,
                         "analytic_flops": analytic, "flop_per_s": achieved,
                         "fraction_of_peak": achieved / peak,
                         "fraction_of_peak_analytic": analytic / t["step"].median / peak,
                         "fraction_per_round": per_round}}


# -- driver ----------------------------------------------------------------------------------------
def header() -> dict:
  """Print and return the device and host description (load average: other processes' share)."""
  dev = jax.devices()[0]
  info = {"backend": jax.default_backend(), "device": str(dev), "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__, "cpu_count": os.cpu_count(),
          "load_avg_1m": os.getloadavg()[0]}
  print(f"device {info['device_kind']} ({info['device']}, {info['backend']}, "
        f"{info['device_count']} device(s), all timed work on device 0); jax {info['jax']}; "
        f"{info['cpu_count']} CPUs, load average {info['load_avg_1m']:.2f} at start")
  return info


def run(s: Settings) -> dict:
  """Run the requested parts; prints the tables and returns every figure (JSON-ready)."""
  figures = {"settings": dataclasses.asdict(s), "host": header()}
  print(f"times: median of {s.repeats} timed calls after compilation")
  if "sampling" in s.parts or "jacobi" in s.parts:
    cfg = flow_config(s, s.width)
    model, variables, z, labels = build_model(cfg, s.batch, s.seed)
    sequential = compile_call(lambda v, z, l: flows.reverse(model, v, z, l)[0], variables, z,
                              labels)
    for part, bench in (("sampling", bench_sampling), ("jacobi", bench_jacobi)):
      if part in s.parts:
        figures[part] = bench(s, cfg, model, variables, z, labels, sequential)
  if "flops" in s.parts:
    figures["flops"] = bench_flops(s)
  figures["host"]["load_avg_1m_end"] = os.getloadavg()[0]
  print(f"\nload average {figures['host']['load_avg_1m_end']:.2f} at the end")
  return figures


def settings_from_flags() -> Settings:
  """Settings from the parsed flags (--quick replaces the size and repeat flags)."""
  kw = dict(parts=tuple(_PARTS.value), dtype=_DTYPE.value, seed=_SEED.value,
            jacobi_threshold=_JACOBI_THRESHOLD.value, jacobi_max_iter=_JACOBI_MAX_ITER.value,
            head_std=_HEAD_STD.value)
  if _QUICK.value:
    return Settings.quick(**kw)
  return Settings(width=_WIDTH.value, tokens=_TOKENS.value,
                  layers=tuple(int(n) for n in _LAYERS.value),
                  head_dim=_HEAD_DIM.value, batch=_BATCH.value, repeats=_REPEATS.value,
                  jacobi_block=_JACOBI_BLOCK.value, flops_width=_FLOPS_WIDTH.value,
                  flops_batch=_FLOPS_BATCH.value,
                  peak_sizes=tuple(int(n) for n in _PEAK_SIZES.value), **kw)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _OUT.value and os.path.exists(_OUT.value):
    raise app.UsageError(f"--out={_OUT.value} exists: refusing to overwrite it")
  figures = run(settings_from_flags())
  if _OUT.value:
    with open(_OUT.value, "x") as f:
      json.dump(figures, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
