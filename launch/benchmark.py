"""The benchmark table: training, sampling and decoding speed of this project, measured in one run.

  python -m launch.benchmark [--width=256] [--tokens=256] [--batch=1] [--repeats=3]
      [--parts=sampling,jacobi,strategies,flops,decode,generation,attention,reference]
      [--reference_tarflow=PATH] [--dtype=float32|bfloat16] [--out=FILE.json] [--quick]

Parts (each prints a table of median times over --repeats timed calls, after compilation; the run
ends with one summary table of the headline figures and writes every figure to --out as JSON):
  sampling  cached sequential sampling (`flows.reverse`, KV cache, one token per step) vs
            `flows.reverse_uncached` (the block's full causal forward recomputed at every token).
  jacobi    Jacobi (`flows.Jacobi`) vs cached sequential sampling, with the production init (zero
            proj_out kernels: a near-identity flow) and with proj_out kernels ~ N(0, head_std^2).
  strategies  per-block sampling strategies (GS-Jacobi, arXiv 2505.12849) on the AFHQ-shaped
            class-conditional TarFlow (--strategies_image px, patch --strategies_patch,
            --strategies_blocks blocks of --strategies_layers layers, --strategies_width wide,
            random proj_out ~ N(0, --strategies_head_std^2), the noise-side block's optionally
            ~ N(0, --strategies_slow_block_std^2)): sequential, plain Jacobi (one segment
            of all tokens), GS-Jacobi segments of --jacobi_block tokens, and per-block (a calibration
            run ranks the blocks by Jacobi iterations, `flows.rank_blocks`; those above
            --sequential_above are sampled sequentially, the rest in segments). Speed-ups over
            sequential and each sample's difference from the sequential one. With
            --strategies_checkpoint=DIR the model is that trained flow checkpoint instead (e.g. the
            README's digits TarFlow; noise N(0, 1), labels 0, 1, ...), where blocks do differ;
            --strategies_init picks Jacobi's initial guess (flows.Jacobi.init).
  flops     achieved FLOP/s of a jitted forward+backward (`jax.value_and_grad` of `flows.loss`) for
            each of --flops_widths (three model sizes), as a fraction of the matmul peak measured in
            the same run (the fastest square `jnp.dot` of --peak_sizes, in the trunk dtype; MFU).
            FLOPs: the matmuls of the compiled step's HLO with each loop counted as many times as
            it runs (`scale.hlo_flops`; XLA's cost analysis counts a scanned layer stack's body
            once), cross-checked against 3 x (2 x kernel params x B T + 4 x B T^2 x width per layer).
  decode    greedy text decoding tokens/s of the VLM stream (`vlm.generate` on a random Qwen2.5
            language model of --decode_width / --decode_layers / --decode_vocab) per batch of
            --decode_batches: rows x (N - 1) / (time of N new tokens - time of 1).
  attention forward and forward+backward GFLOP/s of `nn.attention_ops.dot_product_attention`
            per implementation usable on this platform, causal float32 [B, T, H, Dh] of
            --attention_shapes: "xla" is the kernel before attention_ops (jax.nn's XLA path),
            "auto" the platform's default now. FLOPs: 4 B H T S Dh forward (masked entries
            included), 3x that forward+backward.
  reference the train step (forward + backward + clipped AdamW, `train.step.make_train_step` on a
            fixed batch), 4 samples and 4 guided samples of Apple's PyTorch TarFlow
            (`transformer_flow.py` imported from --reference_tarflow, a local clone of
            apple/ml-tarflow; never part of this project) against this project on the same model:
            the torch model's weights (proj_out ~ N(0, (--ref_head_std / width)^2)) converted with
            `convert.tarflow_torch`, --ref_image_size images of --ref_patch patches, --width wide,
            --ref_blocks blocks of --ref_layers layers, 10 classes, batch --ref_batch. Torch runs
            with as many threads as XLA's CPU pool (the CPUs this process may use). Rows are
            interleaved; the table gives medians and reference / ours ratios, and the losses and
            samples of both (which agree to float32 round-off). A roofline follows: the analytic
            train-step FLOPs over a float32 matmul peak timed in the same rounds (the largest of
            --peak_sizes) bound the step time from below; it says what fraction of that peak each
            side reaches, and what fraction REF_TRAIN_TARGET x the reference's speed would need.
  generation STARFlow2 generation latency per image: whole text-to-image requests of --batch captions
            through `generate.api.Generator.run` (the interleaved generation loop: VLM prefill, the
            image span's flow tokens, shallow inversion, score denoising, FAE decode) on the tiny
            STARFlow2 of configs/starflow2_tiny.py (stage 3, seeded random weights), the image span
            decoded sequentially and with Jacobi (--jacobi_block, capped at the span's tokens).
            Per image = request time / --batch. `starflow2_jax.generate.bench` times the loop alone
            for any STARFlow2 config.
The table also lists the peak host memory of the run.

The model is the STARFlow stack of the flows API (starflow parametrisation and layout, 2-D RoPE,
starflow2 permutations, class conditioning of the deep block) on a square grid of --tokens 2x2
patches of a 4-channel latent, so each token has 16 channels. --dtype sets the trunk compute dtype;
parameters and all flow maths (affine heads, log-dets, sampling state) stay float32. The script runs
on the default device (jax.devices()[0]) of whatever backend JAX picks: CPU, GPU or TPU alike.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import json
import math
import os
import resource
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from starflow2_jax import entry, flows, parallel
from starflow2_jax.convert import tarflow_torch
from starflow2_jax.errors import UserError
from starflow2_jax.eval import metrics
from starflow2_jax.flows import cli as flow_cli, sampling
from starflow2_jax.nn import attention_ops
from starflow2_jax.scale import hlo_flops
from starflow2_jax.train import defaults, optimizer, state as train_state, step as train_step, tasks
from starflow2_jax.vlm import generate as gen
from starflow2_jax.vlm.model import Qwen2_5_VL, QwenConfig

_WIDTH = flags.DEFINE_integer("width", 256, "transformer width of the sampling and Jacobi models")
_TOKENS = flags.DEFINE_integer("tokens", 256, "tokens per image (a perfect square)")
_LAYERS = flags.DEFINE_list("layers", ["2", "2", "4"], "layers per flow block, data side first")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "attention head dimension")
_BATCH = flags.DEFINE_integer("batch", 1, "images per sampling call")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per measurement (median reported)")
_PARTS = flags.DEFINE_list("parts", ["sampling", "jacobi", "strategies", "flops", "decode", "generation"],
                           "parts to run: sampling, jacobi, strategies, flops, decode, generation, "
                           "attention, reference")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "trunk compute dtype")
_JACOBI_BLOCK = flags.DEFINE_integer("jacobi_block", 16, "Jacobi chunk length (tokens)")
_JACOBI_THRESHOLD = flags.DEFINE_float("jacobi_threshold", 1e-3, "Jacobi relative-change threshold")
_JACOBI_MAX_ITER = flags.DEFINE_integer("jacobi_max_iter", 32, "most Jacobi iterations per chunk")
_HEAD_STD = flags.DEFINE_float("head_std", 0.05, "std of the randomised proj_out kernels (jacobi)")
_STRAT_IMAGE = flags.DEFINE_integer("strategies_image", 256, "strategies: image side (AFHQ: 256)")
_STRAT_PATCH = flags.DEFINE_integer("strategies_patch", 8, "strategies: patch size (AFHQ: 8)")
_STRAT_BLOCKS = flags.DEFINE_integer("strategies_blocks", 8, "strategies: flow blocks (AFHQ: 8)")
_STRAT_LAYERS = flags.DEFINE_integer("strategies_layers", 8, "strategies: layers per block (AFHQ: 8)")
_STRAT_WIDTH = flags.DEFINE_integer("strategies_width", 128, "strategies: width (AFHQ: 768)")
_STRAT_HEAD_STD = flags.DEFINE_float("strategies_head_std", 0.01, "strategies: proj_out kernels ~ "
                                     "N(0, std^2) (the production init is zero: an identity flow)")
_SLOW_STD = flags.DEFINE_float("strategies_slow_block_std", 0.0, "strategies: proj_out std of the "
                               "noise-side block alone (0: --strategies_head_std); a larger value makes "
                               "that block converge slowly under Jacobi, as the first-inverted block of "
                               "trained TarFlows does (GS-Jacobi, arXiv 2505.12849)")
_STRAT_CKPT = flags.DEFINE_string("strategies_checkpoint", None, "strategies: a trained flow parameter "
                                  "checkpoint to sample instead of the AFHQ-shaped random TarFlow")
_STRAT_INIT = flags.DEFINE_enum("strategies_init", "noise", list(sampling.INITS),
                                "strategies: Jacobi's initial guess (flows.Jacobi.init)")
_SEQ_ABOVE = flags.DEFINE_float("sequential_above", 0.5, "strategies: a block whose Jacobi needs more "
                                "than this fraction of --jacobi_max_iter per chunk is sampled "
                                "sequentially")
_FLOPS_WIDTHS = flags.DEFINE_list("flops_widths", ["256", "512", "1024"],
                                  "widths of the forward+backward models (three model sizes)")
_DECODE_WIDTH = flags.DEFINE_integer("decode_width", 512, "decode: hidden size of the Qwen2.5 LM")
_DECODE_LAYERS = flags.DEFINE_integer("decode_layers", 8, "decode: layers of the Qwen2.5 LM")
_DECODE_VOCAB = flags.DEFINE_integer("decode_vocab", 32768, "decode: vocabulary size")
_DECODE_PROMPT = flags.DEFINE_integer("decode_prompt", 32, "decode: prompt tokens per row")
_DECODE_NEW = flags.DEFINE_integer("decode_new", 64, "decode: new tokens per row")
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["1", "8"], "decode: rows per call")
_FLOPS_BATCH = flags.DEFINE_integer("flops_batch", 4, "images per forward+backward step")
_PEAK_SIZES = flags.DEFINE_list("peak_sizes", ["1024", "2048", "4096"],
                                "M = N = K of the peak matmuls (the fastest size is the peak)")
_ATTENTION_SHAPES = flags.DEFINE_list("attention_shapes", ["16x256x4x64", "16x256x8x64"],
                                      "BxTxHxDh query shapes of the attention part (S = T)")
_REFERENCE = flags.DEFINE_string("reference_tarflow", None,
                                 "a local clone of apple/ml-tarflow (holds transformer_flow.py)")
_REF_IMAGE = flags.DEFINE_integer("ref_image_size", 32, "image side of the reference comparison")
_REF_PATCH = flags.DEFINE_integer("ref_patch", 2, "patch size of the reference comparison")
_REF_BLOCKS = flags.DEFINE_integer("ref_blocks", 4, "flow blocks of the reference comparison")
_REF_LAYERS = flags.DEFINE_integer("ref_layers", 2, "layers per block of the reference comparison")
_REF_BATCH = flags.DEFINE_integer("ref_batch", 16, "train-step batch of the reference comparison")
_REF_SAMPLES = flags.DEFINE_integer("ref_samples", 4, "images per sampling call (reference part)")
_GUIDANCE = flags.DEFINE_float("guidance", 1.0, "guidance weight of the guided samples (reference)")
_REF_HEAD_STD = flags.DEFINE_float("ref_head_std", 0.5, "reference part: proj_out kernels ~ N(0, "
                                   "(ref_head_std / width)^2), a finite flow at any width")
_REF_BEFORE = flags.DEFINE_bool("ref_before", False, "reference part: also time this project with "
                                "attention_impl=xla (the attention kernel before attention_ops)")
_OUT = flags.DEFINE_string("out", None, "write the figures as JSON to this new file")
_QUICK = flags.DEFINE_bool("quick", False, "smoke test: width 64, 16 tokens, one 1-layer block, "
                           "peak sizes 256 and 512, tiny attention and reference shapes, 2 repeats "
                           "(overrides size and repeat flags)")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the parameters and the noise")

PARTS = ("sampling", "jacobi", "strategies", "flops", "decode", "generation", "attention", "reference")
DEFAULT_PARTS = ("sampling", "jacobi", "strategies", "flops", "decode", "generation")
GENERATION_CAPTION = "a small red circle"
REF_CLASSES = 10  # class-conditional TarFlow, as apple/ml-tarflow's ImageNet / AFHQ models
REF_CHANNELS = 3
REF_TRAIN_TARGET = 1.5  # the train-step speed asked of this project against the reference (issue 7)
REF_HEAD_DIM = 64  # transformer_flow.py's MetaBlock default (Model does not pass another)
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
  parts: tuple[str, ...] = DEFAULT_PARTS
  dtype: str = "float32"
  jacobi_block: int = 16
  jacobi_threshold: float = 1e-3
  jacobi_max_iter: int = 32
  head_std: float = 0.05
  strategies_image: int = 256
  strategies_patch: int = 8
  strategies_blocks: int = 8
  strategies_layers: int = 8
  strategies_width: int = 128
  strategies_head_std: float = 0.01
  strategies_slow_block_std: float = 0.0
  strategies_checkpoint: str | None = None
  strategies_init: str = "noise"
  sequential_above: float = 0.5
  flops_widths: tuple[int, ...] = (256, 512, 1024)
  flops_batch: int = 4
  decode_width: int = 512
  decode_layers: int = 8
  decode_vocab: int = 32768
  decode_prompt: int = 32
  decode_new: int = 64
  decode_batches: tuple[int, ...] = (1, 8)
  peak_sizes: tuple[int, ...] = (1024, 2048, 4096)
  attention_shapes: tuple[tuple[int, int, int, int], ...] = ((16, 256, 4, 64), (16, 256, 8, 64))
  reference_tarflow: str | None = None
  ref_image_size: int = 32
  ref_patch: int = 2
  ref_blocks: int = 4
  ref_layers: int = 2
  ref_batch: int = 16
  ref_samples: int = 4
  guidance: float = 1.0
  ref_before: bool = False
  ref_head_std: float = 0.5
  seed: int = 0

  def __post_init__(self):
    unknown = sorted(set(self.parts) - set(PARTS))
    if unknown:
      raise UserError(f"--parts: unknown part(s) {unknown}; known: {list(PARTS)}")
    if math.isqrt(self.tokens) ** 2 != self.tokens:
      raise UserError(f"--tokens must be a perfect square (a square grid), got {self.tokens}")
    if self.repeats < 1:
      raise UserError(f"--repeats must be >= 1, got {self.repeats}")
    if "reference" in self.parts and not self.reference_tarflow:
      raise UserError("--parts=reference needs --reference_tarflow=PATH, a local clone of "
                      "apple/ml-tarflow (the directory holding transformer_flow.py)")
    if "reference" in self.parts and self.width % REF_HEAD_DIM:
      raise UserError(f"--width must be a multiple of {REF_HEAD_DIM} for the reference part "
                      f"(TarFlow's head size), got {self.width}")

  @classmethod
  def quick(cls, **kw) -> "Settings":
    """Tiny sizes for a smoke test (tests/test_benchmark.py); `kw` overrides any field."""
    base = dict(width=64, tokens=16, layers=(2,), head_dim=32, batch=1, repeats=2, jacobi_block=4,
                strategies_image=16, strategies_patch=4, strategies_blocks=2, strategies_layers=1,
                strategies_width=64,
                flops_widths=(32, 64, 96), flops_batch=2, peak_sizes=(256, 512), decode_width=64,
                decode_layers=2, decode_vocab=256, decode_prompt=4, decode_new=4, decode_batches=(2,),
                attention_shapes=((2, 16, 2, 32),), ref_image_size=8, ref_blocks=2, ref_layers=1,
                ref_batch=2, ref_samples=2)
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


def strategies_config(s: Settings):
  """The AFHQ-shaped class-conditional TarFlow (apple/ml-tarflow's AFHQ-256 release: 256 px, patch 8,
  8 blocks of 8 layers, 3 classes) at width s.strategies_width."""
  return flows.FlowConfig(
      image_size=(s.strategies_image,) * 2, channels=3, patch_size=s.strategies_patch,
      width=s.strategies_width, head_dim=s.head_dim,
      layers_per_block=(s.strategies_layers,) * s.strategies_blocks, num_classes=3, dtype=s.dtype)


def checkpoint_model(path: str, batch: int, seed: int):
  """build_model's (model, variables, z, labels) of a trained flow parameter checkpoint (or training
  workdir: its newest params_<step>)."""
  model, params, _ = flow_cli.load_flow(metrics.resolve_checkpoint(path))
  cfg = model.cfg
  z = jax.random.normal(jax.random.key(seed), (batch, cfg.num_tokens, cfg.token_dim), jnp.float32)
  labels = jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes if cfg.num_classes else None
  return model, {"params": jax.device_put(params)}, z, labels


def bench_strategies(s: Settings) -> dict:
  """Sequential vs plain Jacobi (one segment of all tokens) vs GS-Jacobi segments vs per-block
  strategies (sequential where a calibration run ranks a block slow, segments elsewhere)."""
  if s.strategies_checkpoint:
    model, variables, z, labels = checkpoint_model(s.strategies_checkpoint, s.batch, s.seed)
    cfg = model.cfg
  else:
    cfg = strategies_config(s)
    model, variables, z, labels = build_model(cfg, s.batch, s.seed)
    variables = randomise_heads(variables, s.strategies_head_std, s.seed + 2)
  if s.strategies_slow_block_std and not s.strategies_checkpoint:
    deep = f"blocks_{cfg.num_blocks - 1}"
    variables["params"][deep] = randomise_heads(variables["params"][deep], s.strategies_slow_block_std,
                                                s.seed + 3)
  common = dict(threshold=s.jacobi_threshold, max_iter=s.jacobi_max_iter, init=s.strategies_init)
  segments = flows.Jacobi(block_size=s.jacobi_block, **common)
  plain = flows.Jacobi(block_size=cfg.num_tokens, **common)
  t0 = time.perf_counter()
  ranks = np.asarray(jax.jit(functools.partial(flows.rank_blocks, model, jacobi=segments))(
      variables, z, labels))
  calibrate_s = time.perf_counter() - t0
  mixed = flows.choose_strategies(ranks, segments, s.sequential_above)
  # no block ranked slow: per-block is the segments strategy (one executable for both)
  per_block = segments if all(m == segments for m in mixed) else mixed
  variants = {"sequential": None, "plain_jacobi": plain, "segments": segments, "per_block": per_block}
  compiled = {}  # one executable per distinct strategy (timed under each name)
  calls = {}
  for name, j in variants.items():
    if j not in compiled:
      compiled[j] = compile_call(lambda v, z, l, j=j: flows.reverse(model, v, z, l, jacobi=j), variables,
                                 z, labels, warmup=False)
    calls[name] = compiled[j]
  t, out = time_calls(calls, s.repeats)
  seq_x = out["sequential"][0]
  finite = bool(np.all(np.isfinite(np.asarray(seq_x))))
  if s.strategies_checkpoint:
    what = (f"trained flow {s.strategies_checkpoint}: {cfg.image_size[0]} px, patch {cfg.patch_size} "
            f"({cfg.num_tokens} tokens x {cfg.token_dim}), {cfg.num_blocks} blocks x "
            f"{list(cfg.layers_per_block)} layers, width {cfg.width}, batch {s.batch}")
  else:
    what = (f"AFHQ-shaped TarFlow: {s.strategies_image} px, patch {s.strategies_patch} "
            f"({cfg.num_tokens} tokens x {cfg.token_dim}), {cfg.num_blocks} blocks x "
            f"{s.strategies_layers} layers, width {cfg.width}, batch {s.batch}, proj_out ~ "
            f"N(0, {s.strategies_head_std:g}^2)"
            + (f" (noise-side block N(0, {s.strategies_slow_block_std:g}^2))"
               if s.strategies_slow_block_std else ""))
  print(f"\n[strategies] {what}; threshold {s.jacobi_threshold:g}, max_iter {s.jacobi_max_iter}, "
        f"segments of {segments.block_size}, init {s.strategies_init}")
  print(f"  ranking (fraction of max_iter per segment, data side first): "
        f"{', '.join(f'{r:.2f}' for r in ranks)} (calibration run {calibrate_s:.1f} s incl. compile)"
        f"; per-block: {['seq' if m is None else 'jacobi' for m in mixed]}")
  if not finite:  # exp-scale TarFlow heads too large: every comparison below would be meaningless
    print("  WARNING: the sequential sample is not finite; lower --strategies_head_std / "
          "--strategies_slow_block_std")
  figures = {"config": {"tokens": cfg.num_tokens, "token_dim": cfg.token_dim, "blocks": cfg.num_blocks,
                        "layers": list(cfg.layers_per_block), "width": cfg.width,
                        "checkpoint": s.strategies_checkpoint, "init": s.strategies_init},
             "finite": finite,
             "ranks": ranks.tolist(), "per_block_sequential": [m is None for m in mixed]}
  for name in variants:
    x, info = out[name]
    iters = info.get("block_iters")
    mean_iters = [None if it is None else float(np.mean(np.asarray(it))) for it in iters] if iters \
        else None
    r = ratios(t["sequential"], t[name])
    diff = differences(x, seq_x)
    print(t[name].row(name))
    print(f"    speed-up over sequential {ratio_text(r)}; vs sequential sample max abs "
          f"{diff['max_abs']:.2e}, rel RMS {diff['rel_rms']:.2e}"
          + (f"; mean iterations per block {[None if m is None else round(m, 1) for m in mean_iters]}"
             if mean_iters else ""))
    figures[name] = {"timing": t[name].to_json(), "speedup_over_sequential": r, "difference": diff,
                     "mean_iters_per_block": mean_iters}
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
  """Achieved forward+backward FLOP/s as a fraction of the measured matmul peak, per model size."""
  dt = jnp.dtype(s.dtype)
  print(f"\n[flops] {dt.name} trunk; matmul peak: the fastest square {dt.name} jnp.dot of sizes "
        f"{list(s.peak_sizes)} (products chained to about {MIN_PEAK_CALL_S} s per call)")
  matmuls = {n: matmul_call(n, dt, s.seed) for n in s.peak_sizes}
  sweep, _ = time_calls({n: call for n, (call, _) in matmuls.items()}, s.repeats)
  rates = {n: matmuls[n][1] / sweep[n].median for n in s.peak_sizes}
  for n in s.peak_sizes:
    print(sweep[n].row(f"{n}^3: {rates[n] / 1e9:.1f} GFLOP/s"))
  best = max(rates, key=rates.get)

  steps = {width: train_step_figures(s, width, matmuls[best]) for width in s.flops_widths}
  return {"peak": {"dtype": dt.name, "size": best, "flop_per_s": rates[best],
                   "sweep_flop_per_s": {str(n): r for n, r in rates.items()}},
          "train_steps": {str(w): f for w, f in steps.items()}}


def train_step_figures(s: Settings, width: int, peak_call: tuple[Call, float]) -> dict:
  """One model size: forward+backward time and its fraction of the peak timed alongside it."""
  cfg = flow_config(s, width)
  model, variables, x, labels = build_model(cfg, s.flops_batch, s.seed)
  params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables))
  step = compile_call(lambda v, x, l: jax.value_and_grad(
      lambda v: flows.loss(model.apply(v, x, l)))(v), variables, x, labels)
  xla_flops = hlo_flops.count(step.fn.as_text()).flops  # loops x their trip counts
  cost = step.fn.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  cost_flops = float(cost["flops"])  # each loop body once
  analytic = analytic_train_flops(cfg, variables, s.flops_batch)
  # the peak kernel again, interleaved with the step, so both see the same background load
  t, _ = time_calls({"peak": peak_call[0], "step": step}, s.repeats)
  peak = peak_call[1] / t["peak"].median
  achieved = xla_flops / t["step"].median
  per_round = [(xla_flops / ts) / (peak_call[1] / tp)
               for ts, tp in zip(t["step"].times_s, t["peak"].times_s)]
  print(f"  forward+backward: {describe(cfg, s.flops_batch)}, {params / 1e6:.2f} M params; "
        f"interleaved with the peak kernel")
  print(t["peak"].row(f"peak kernel: {peak / 1e9:.1f} GFLOP/s"))
  print(t["step"].row("value_and_grad(loss)"))
  print(f"  FLOPs per step: compiled HLO {xla_flops / 1e9:.2f} G (loops x trip counts; XLA's cost "
        f"analysis, loop bodies once: {cost_flops / 1e9:.2f} G), analytic {analytic / 1e9:.2f} G "
        f"(compiled / analytic = {xla_flops / analytic:.3f})")
  print(f"  achieved {achieved / 1e9:.1f} GFLOP/s (compiled count) = {achieved / peak:.3f} of the "
        f"measured peak {peak / 1e9:.1f} GFLOP/s ({analytic / t['step'].median / peak:.3f} with "
        f"the analytic count; per round {min(per_round):.3f}-{max(per_round):.3f})")
  return {"width": cfg.width, "tokens": cfg.num_tokens, "batch": s.flops_batch, "params": params,
          "timing": t["step"].to_json(), "peak_timing": t["peak"].to_json(), "peak_flop_per_s": peak,
          "xla_flops": xla_flops, "xla_cost_analysis_flops": cost_flops, "analytic_flops": analytic,
          "flop_per_s": achieved,
          "fraction_of_peak": achieved / peak,
          "fraction_of_peak_analytic": analytic / t["step"].median / peak,
          "fraction_per_round": per_round}


# -- decode ------------------------------------------------------------------------------------------
def bench_decode(s: Settings) -> dict:
  """Greedy text decoding of the VLM stream (a random Qwen2.5 language model, `vlm.generate`): decode
  tokens/s = rows x (N - 1) new tokens / (time of N new tokens - time of 1, i.e. without prefill)."""
  cfg = QwenConfig(vocab_size=s.decode_vocab, hidden_size=s.decode_width,
                   intermediate_size=4 * s.decode_width, num_layers=s.decode_layers,
                   num_heads=max(1, s.decode_width // s.head_dim),
                   num_kv_heads=max(1, s.decode_width // s.head_dim // 4),
                   mrope_section=mrope_sections(s.head_dim), dtype=s.dtype)
  model = Qwen2_5_VL(cfg)
  params = nn.unbox(jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32),
                                                 positions=jnp.zeros((1, 1, 3), jnp.int32)))(
      jax.random.key(s.seed))["params"])
  print(f"\n[decode] Qwen2.5 LM: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads "
        f"({cfg.num_kv_heads} KV), vocab {cfg.vocab_size}; prompt {s.decode_prompt}, greedy")
  figures = {}
  for rows in s.decode_batches:
    ids = jax.random.randint(jax.random.key(s.seed + rows), (rows, s.decode_prompt), 3, cfg.vocab_size)
    valid = jnp.ones(ids.shape, bool)
    pos = jnp.broadcast_to(jnp.arange(s.decode_prompt)[None, :, None], (rows, s.decode_prompt, 3))
    nxt = jnp.full((rows,), s.decode_prompt, jnp.int32)
    calls = {n: compile_call(lambda p, i, v, q, x, n=n: gen.generate(
        model, p, i, v, q, x, jax.random.key(0), gen.SamplingConfig(max_new_tokens=n))["tokens"],
        params, ids, valid, pos, nxt) for n in (1, s.decode_new)}
    t, _ = time_calls(calls, s.repeats)
    decode_s = t[s.decode_new].median - t[1].median
    with_prefill = decode_s <= 0  # timing noise above the decode time (tiny models): a lower bound
    rate = rows * s.decode_new / t[s.decode_new].median if with_prefill else \
        rows * (s.decode_new - 1) / decode_s
    print(t[1].row(f"batch {rows}: prefill + 1 token"))
    print(t[s.decode_new].row(f"batch {rows}: prefill + {s.decode_new} tokens"))
    print(f"    decode {rate:.1f} tokens/s" + (" (prefill included: the decode time is below the timing "
                                               "noise)" if with_prefill else
                                               f" ({decode_s / (s.decode_new - 1) * 1e3:.2f} ms per step)"))
    figures[str(rows)] = {"prefill_1": t[1].to_json(), "new_tokens": s.decode_new,
                          "full": t[s.decode_new].to_json(), "decode_tokens_per_s": rate,
                          "includes_prefill": with_prefill}
  return figures


def bench_generation(s: Settings, gen=None) -> dict:
  """Latency per image of whole STARFlow2 text-to-image requests (module docstring, part generation);
  gen: a loaded `generate.api.Generator` (None: the tiny config's)."""
  if gen is None:
    from configs import starflow2_tiny  # the repository's config folder (launch runs from its root)
    from starflow2_jax.generate.api import Generator
    gen = Generator.build(starflow2_tiny.get_config("stage=3"))
  n = gen.cfg.num_latents
  block = min(s.jacobi_block, n)
  print(f"\n[generation] tiny STARFlow2 (configs/starflow2_tiny.py stage 3, random weights): "
        f"{n} latent tokens per image, batch {s.batch}, Jacobi segments of {block} tokens")
  captions = [GENERATION_CAPTION] * s.batch
  overrides = {"sequential": {"jacobi_block": 0},
               "jacobi": {"jacobi_block": block, "jacobi_threshold": s.jacobi_threshold,
                          "jacobi_max_iter": s.jacobi_max_iter}}
  calls = {}
  for name, o in overrides.items():
    t0 = time.perf_counter()
    gen.run("text_to_image", captions, seed=s.seed, **o)  # compiles this request's functions
    calls[name] = Call(functools.partial(gen.run, "text_to_image", captions, seed=s.seed, **o), (),
                       time.perf_counter() - t0, warmup=False)
  t, outs = time_calls(calls, s.repeats)
  figures = {"batch": s.batch, "latent_tokens": n, "jacobi_block": block,
             "jacobi_iters": outs["jacobi"]["jacobi_iters"]}
  for name in overrides:
    print(t[name].row(f"{name}: request of {s.batch} image(s)"))
    figures[name] = {**t[name].to_json(), "per_image_s": t[name].median / s.batch,
                     "images": sum(len(r) for r in outs[name]["images"])}
  figures["sequential_over_jacobi"] = ratios(t["sequential"], t["jacobi"])
  print(f"  per image: sequential {figures['sequential']['per_image_s'] * 1e3:.1f} ms, Jacobi "
        f"{figures['jacobi']['per_image_s'] * 1e3:.1f} ms (iterations per segment "
        f"{figures['jacobi_iters']})")
  return figures


def mrope_sections(head_dim: int) -> tuple[int, int, int]:
  """Qwen2.5-VL's M-RoPE split (16, 24, 24 of 64 frequency pairs at head_dim 128) scaled to head_dim."""
  half = head_dim // 2
  t = half // 4
  h = (half - t) // 2
  return (t, h, half - t - h)


# -- attention -------------------------------------------------------------------------------------
def attention_impls() -> tuple[str, ...]:
  """The implementations to time on this platform: "xla" (before attention_ops), the platform's
  own kernels, and "auto" (the default now)."""
  own = {"cpu": ("cpu",), "gpu": ("cudnn",), "tpu": ("pallas_tpu",)}.get(jax.default_backend(), ())
  return ("xla", *own, "auto")


def bench_attention(s: Settings) -> dict:
  """Forward and forward+backward GFLOP/s of causal attention per implementation and shape."""
  print(f"\n[attention] causal float32 self-attention, forward and forward+backward (vjp of all of "
        f"q, k, v); FLOPs 4 B H T S Dh forward, x3 forward+backward")
  figures = {}
  for shape in s.attention_shapes:
    b, t, h, d = shape
    keys = jax.random.split(jax.random.key(s.seed), 4)
    q, k, v, cot = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    flops = 4.0 * b * h * t * t * d
    calls = {}
    for impl in attention_impls():
      fwd = functools.partial(attention_ops.dot_product_attention, mask=mask, implementation=impl)
      calls[(impl, "fwd")] = compile_call(fwd, q, k, v)
      calls[(impl, "fwd+bwd")] = compile_call(lambda q, k, v, c, fwd=fwd: jax.vjp(fwd, q, k, v)[1](c),
                                              q, k, v, cot)
    t_all, _ = time_calls(calls, s.repeats)
    print(f"  [B, T, H, Dh] = {list(shape)}")
    rows = {}
    for impl in attention_impls():
      tf, tb = t_all[(impl, "fwd")], t_all[(impl, "fwd+bwd")]
      rows[impl] = {"fwd": tf.to_json(), "fwd_gflop_per_s": flops / tf.median / 1e9,
                    "fwd_bwd": tb.to_json(), "fwd_bwd_gflop_per_s": 3 * flops / tb.median / 1e9}
      name = impl + (f" (= {attention_ops.resolve_implementation(None, q)})" if impl == "auto" else "")
      print(f"    {name:<12s} forward {tf.median * 1e3:8.2f} ms {rows[impl]['fwd_gflop_per_s']:7.1f} "
            f"GFLOP/s   forward+backward {tb.median * 1e3:8.2f} ms "
            f"{rows[impl]['fwd_bwd_gflop_per_s']:7.1f} GFLOP/s")
    for kind in ("fwd", "fwd+bwd"):
      r = ratios(t_all[("xla", kind)], t_all[("auto", kind)])
      print(f"    {kind}: xla / auto = {ratio_text(r)}")
    figures["x".join(map(str, shape))] = rows
  return figures


# -- reference: apple/ml-tarflow side by side --------------------------------------------------------
def load_reference(path: str):
  """Import `transformer_flow.py` of a local apple/ml-tarflow clone at `path` (at run time only)."""
  file = os.path.join(os.path.abspath(os.path.expanduser(path)), "transformer_flow.py")
  if not os.path.isfile(file):
    raise UserError(f"--reference_tarflow={path}: no transformer_flow.py there; pass the directory "
                    "of a local clone of https://github.com/apple/ml-tarflow")
  try:
    import torch  # noqa: F401  (the reference's only dependency)
  except ImportError as e:
    raise UserError("--parts=reference needs torch: pip install -e '.[convert]'") from e
  spec = importlib.util.spec_from_file_location("ml_tarflow_transformer_flow", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def cpu_threads() -> int:
  """The CPUs this process may use: the size of XLA's CPU thread pool."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def jax_train_step(fcfg, params, images, labels):
  """This project's train step (`train.step.make_train_step`, the task's loss, the AdamW optimizer of
  `train.optimizer`, default train settings) on one device, from `params`, on the fixed batch
  (uint8 images [B, H, W, C], labels [B]). -> a no-argument function taking one step."""
  config = defaults.base_config()
  config.model = fcfg.to_dict()
  config.data.image_size, config.data.channels = fcfg.image_size[0], fcfg.channels
  config.train.batch_size = images.shape[0]
  mesh = parallel.make_mesh({"shape": {"data": 1, "fsdp": 1, "tensor": 1}}, jax.devices()[:1])
  rules = parallel.logical_rules(config)
  task = tasks.build_task(config, mesh, rules)
  tx, _, trainable = optimizer.for_task(config.train, task, jax.random.key(0))
  state, state_sh = train_state.init_sharded(task.init_fn, tx, jax.random.key(0), mesh, rules, False)
  state = state.replace(params=jax.device_put(params, state_sh.params))
  step = train_step.make_train_step(task.loss_fn, tx, optimizer.learning_rate_schedule(config.train),
                                    config.train, mesh, rules, state_sh, task.frozen_shardings,
                                    objective=task.objective,
                                    trainable=trainable)
  batch = {"image": jax.device_put(images, parallel.batch_sharding(mesh, images.ndim)),
           "label": jax.device_put(labels, parallel.batch_sharding(mesh))}
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], task.frozen, batch, jax.random.key(1))
    return metrics

  return run


def torch_train_step(model, images, labels, noise_std: float):
  """The reference's train step on the fixed batch: Gaussian dequantisation, forward, TarFlow's
  loss, backward, global-norm clipping and AdamW with this project's default settings."""
  import torch
  tc = defaults.train_defaults()
  opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.b1, tc.b2), eps=tc.eps,
                          weight_decay=tc.weight_decay)

  def run():
    opt.zero_grad(set_to_none=True)
    x = images + noise_std * torch.randn_like(images)
    z, _, logdets = model(x, labels)
    loss = model.get_loss(z, logdets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
    opt.step()
    return loss.item()

  return run


def bench_reference(s: Settings) -> dict:
  """Apple's PyTorch TarFlow vs this project: train step, samples, guided samples (medians).
  With s.ref_before, also this project with attention_impl="xla" (the kernel before attention_ops)."""
  import torch
  tf = load_reference(s.reference_tarflow)
  threads = cpu_threads()
  torch.set_num_threads(threads)
  torch.manual_seed(s.seed)
  ref = tf.Model(in_channels=REF_CHANNELS, img_size=s.ref_image_size, patch_size=s.ref_patch,
                 channels=s.width, num_blocks=s.ref_blocks, layers_per_block=s.ref_layers,
                 num_classes=REF_CLASSES)
  with torch.no_grad():  # a non-trivial flow: proj_out starts at zero in both projects
    for block in ref.blocks:
      block.proj_out.weight.normal_(0.0, s.ref_head_std / s.width)
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  variables, fcfg = tarflow_torch.params_from_state_dict(sd, s.ref_image_size, s.ref_patch)
  model = flows.FlowModel(fcfg)
  rng = np.random.default_rng(s.seed)
  images = rng.integers(0, 256, (s.ref_batch, *fcfg.image_shape), dtype=np.uint8)
  labels = np.arange(s.ref_batch, dtype=np.int32) % REF_CLASSES
  x_ref = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
  y_ref = torch.from_numpy(labels.astype(np.int64))

  # the same loss on the same (noise-free) batch: both sides run one model
  tokens = flows.patchify(jnp.asarray(x_ref.permute(0, 2, 3, 1).numpy()), fcfg.patch_size,
                          fcfg.layout)
  ours_loss = float(flows.loss(jax.jit(model.apply)(variables, tokens, jnp.asarray(labels))))
  with torch.no_grad():
    z, _, logdets = ref(x_ref, y_ref)
    ref_loss = float(ref.get_loss(z, logdets))

  n = s.ref_samples
  z = flows.noise(jax.random.key(s.seed), n, fcfg.num_tokens, fcfg.token_dim)
  y = jnp.asarray(labels[:n])
  z_ref, y_ref_n = torch.from_numpy(np.array(z)), y_ref[:n]

  def torch_sampler(guidance):
    def run():
      with torch.inference_mode():
        return ref.reverse(z_ref.clone(), y_ref_n, guidance=guidance)
    return run

  def sampler(cfg, w):
    m = flows.FlowModel(cfg)
    return compile_call(lambda v, z, y: flows.unpatchify(
        flows.reverse(m, v, z, y, guidance=w)[0], cfg.patch_size, cfg.layout, cfg.image_shape),
        variables, z, y)

  def train(cfg):
    t0 = time.perf_counter()
    run = jax_train_step(cfg, variables["params"], jnp.asarray(images), jnp.asarray(labels))
    jax.block_until_ready(run())  # compiles
    return Call(run, (), time.perf_counter() - t0)

  torch_call = lambda fn: Call(fn, (), 0.0)  # noqa: E731
  peak_size = max(s.peak_sizes)
  peak_call, peak_flops = matmul_call(peak_size, jnp.float32, s.seed)
  variants = {"ours": fcfg}
  if s.ref_before:
    variants["ours_xla"] = dataclasses.replace(fcfg, attention_impl="xla")
  calls = {}
  for key, w in (("train", None), ("sample", 0.0), ("guided", s.guidance)):
    for name, cfg in variants.items():
      calls[(key, name)] = train(cfg) if w is None else sampler(cfg, w)
    calls[(key, "reference")] = torch_call(
        torch_train_step(copy.deepcopy(ref), x_ref, y_ref, fcfg.noise_std) if w is None
        else torch_sampler(w))  # the train step's own copy: its updates leave the samplers' model
  calls[("peak", "matmul")] = peak_call
  t, out = time_calls(calls, s.repeats)
  rows = {"train": f"train step (batch {s.ref_batch})", "sample": f"{n} samples",
          "guided": f"{n} samples, guidance {s.guidance:g}"}
  attention = attention_ops.resolve_implementation(None, jnp.zeros((1, 1, 1, 1), fcfg.compute_dtype))
  print(f"\n[reference] apple/ml-tarflow ({os.path.abspath(s.reference_tarflow)}, torch "
        f"{torch.__version__}, {threads} threads; XLA: {threads} CPUs) vs this project "
        f"(attention {attention}): {s.ref_image_size}x{s.ref_image_size}x{REF_CHANNELS} images, "
        f"patch {s.ref_patch}, {fcfg.num_tokens} tokens of {fcfg.token_dim}, width {s.width}, "
        f"{s.ref_blocks} blocks x {s.ref_layers} layers, {REF_CLASSES} classes; train: AdamW")
  print(f"  {'':<30s} {'ours':>11s} {'reference':>11s}   reference / ours")
  figures = {"attention": attention, "torch_threads": threads, "width": s.width}
  for key, name in rows.items():
    ours, theirs = t[(key, "ours")], t[(key, "reference")]
    r = ratios(theirs, ours)
    print(f"  {name:<30s} {ours.median * 1e3:8.1f} ms {theirs.median * 1e3:8.1f} ms   {ratio_text(r)}")
    figures[key] = {"ours": ours.to_json(), "reference": theirs.to_json(), "reference_over_ours": r}
    if s.ref_before:
      before = t[(key, "ours_xla")]
      r_before = ratios(theirs, before)
      print(f"  {'  ours with attention xla':<30s} {before.median * 1e3:8.1f} ms {'':>11s}   "
            f"{ratio_text(r_before)}")
      figures[key].update(ours_xla=before.to_json(), reference_over_ours_xla=r_before)
  samples = {key: differences(out[(key, "ours")],
                              out[(key, "reference")].permute(0, 2, 3, 1).numpy())
             for key in ("sample", "guided")}
  print(f"  same model: loss ours {ours_loss:.6f}, reference {ref_loss:.6f}; samples max |ours - "
        f"reference| {samples['sample']['max_abs']:.2e} (guided {samples['guided']['max_abs']:.2e})")
  figures.update(loss={"ours": ours_loss, "reference": ref_loss}, sample_difference=samples)
  figures["roofline"] = train_roofline(
      analytic_train_flops(fcfg, variables, s.ref_batch), peak_flops, peak_size,
      t[("peak", "matmul")], t[("train", "ours")], t[("train", "reference")])
  return figures


def train_roofline(flops: float, peak_flops: float, peak_size: int, peak: Timing, ours: Timing,
                   reference: Timing) -> dict:
  """The fastest train step the measured matmul peak allows (analytic FLOPs / peak FLOP/s), the
  fraction of that peak each side reaches, and the fraction REF_TRAIN_TARGET x the reference needs."""
  rate = peak_flops / peak.median
  floor = flops / rate
  f = {"analytic_flops": flops, "peak_flop_per_s": rate, "peak_size": peak_size, "floor_s": floor,
       "ours_fraction_of_peak": floor / ours.median,
       "reference_fraction_of_peak": floor / reference.median,
       "target": REF_TRAIN_TARGET,
       "target_fraction_of_peak": REF_TRAIN_TARGET * floor / reference.median}
  print(f"  roofline: {flops / 1e9:.1f} GFLOP per train step (analytic: kernels and attention, no "
        f"optimizer or elementwise work) at the float32 matmul peak of {rate / 1e9:.1f} GFLOP/s "
        f"({peak_size}^3, timed in the same rounds) = {floor * 1e3:.0f} ms at the least. The "
        f"reference runs at {f['reference_fraction_of_peak']:.2f} of that peak, ours at "
        f"{f['ours_fraction_of_peak']:.2f}; {REF_TRAIN_TARGET:g}x the reference's speed would need "
        f"the whole step at {f['target_fraction_of_peak']:.2f} of it.")
  return f


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
  if "strategies" in s.parts:
    figures["strategies"] = bench_strategies(s)
  if "flops" in s.parts:
    figures["flops"] = bench_flops(s)
  if "decode" in s.parts:
    figures["decode"] = bench_decode(s)
  if "generation" in s.parts:
    figures["generation"] = bench_generation(s)
  if "attention" in s.parts:
    figures["attention"] = bench_attention(s)
  if "reference" in s.parts:
    figures["reference"] = bench_reference(s)
  figures["host"]["load_avg_1m_end"] = os.getloadavg()[0]
  figures["host"]["peak_host_memory_bytes"] = peak_host_memory()
  print(f"\nload average {figures['host']['load_avg_1m_end']:.2f} at the end")
  print_table(figures)
  return figures


def peak_host_memory() -> int:
  """Peak resident memory of this process in bytes (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def print_table(figures: dict) -> None:
  """The one table of this run's headline figures (medians)."""
  rows = []
  for width, f in figures.get("flops", {}).get("train_steps", {}).items():
    rows.append((f"train step (fwd+bwd), width {width}, {f['params'] / 1e6:.1f} M params",
                 f"{f['timing']['median_s'] * 1e3:.1f} ms", f"MFU {f['fraction_of_peak']:.3f}"))
  if "sampling" in figures:
    for name in ("cached", "uncached"):
      rows.append((f"sampling, {name} sequential", f"{figures['sampling'][name]['median_s'] * 1e3:.1f} ms",
                   ""))
  for name, f in figures.get("jacobi", {}).items():
    if isinstance(f, dict) and "jacobi" in f:
      rows.append((f"sampling, jacobi ({name})", f"{f['jacobi']['median_s'] * 1e3:.1f} ms",
                   f"{f['sequential_over_jacobi']['of_medians']:.2f}x vs sequential"))
  strategies = figures.get("strategies", {})
  model = "trained-flow" if strategies.get("config", {}).get("checkpoint") else "AFHQ-shaped"
  for name in ("sequential", "plain_jacobi", "segments", "per_block"):
    f = strategies.get(name)
    if f:
      rows.append((f"{model} sampling, {name}", f"{f['timing']['median_s'] * 1e3:.1f} ms",
                   f"{f['speedup_over_sequential']['of_medians']:.2f}x vs sequential"))
  for batch, f in figures.get("decode", {}).items():
    rows.append((f"text decoding, batch {batch}", f"{f['decode_tokens_per_s']:.1f} tokens/s", ""))
  for name in ("sequential", "jacobi"):
    f = figures.get("generation", {}).get(name)
    if f:
      rows.append((f"STARFlow2 generation per image, {name}", f"{f['per_image_s'] * 1e3:.1f} ms",
                   f"tiny config, batch {figures['generation']['batch']}"))
  for shape, impls in figures.get("attention", {}).items():
    for impl, f in impls.items():
      rows.append((f"attention {shape}, {impl}", f"{f['fwd_gflop_per_s']:.1f} GFLOP/s",
                   f"fwd+bwd {f['fwd_bwd_gflop_per_s']:.1f} GFLOP/s"))
  for key, what in (("train", "train step"), ("sample", "sampling"), ("guided", "guided sampling")):
    f = figures.get("reference", {}).get(key)
    if f:
      rows.append((f"apple/ml-tarflow {what} (same model)", f"{f['ours']['median_s'] * 1e3:.1f} ms",
                   f"reference {f['reference']['median_s'] * 1e3:.1f} ms = "
                   f"{f['reference_over_ours']['of_medians']:.2f}x ours"))
  roof = figures.get("reference", {}).get("roofline")
  if roof:
    rows.append(("train step at the matmul peak (roofline)", f"{roof['floor_s'] * 1e3:.1f} ms",
                 f"reference at {roof['reference_fraction_of_peak']:.2f} of peak, ours at "
                 f"{roof['ours_fraction_of_peak']:.2f}; {roof['target']:g}x the reference needs "
                 f"{roof['target_fraction_of_peak']:.2f}"))
  rows.append(("peak host memory", f"{figures['host']['peak_host_memory_bytes'] / 2 ** 30:.2f} GiB", ""))
  width = max(len(r[0]) for r in rows)
  print("\n[table]")
  for name, value, note in rows:
    print(f"  {name:<{width}s}  {value:>16s}  {note}")


def settings_from_flags() -> Settings:
  """Settings from the parsed flags (--quick replaces the size and repeat flags)."""
  kw = dict(parts=tuple(_PARTS.value), dtype=_DTYPE.value, seed=_SEED.value,
            jacobi_threshold=_JACOBI_THRESHOLD.value, jacobi_max_iter=_JACOBI_MAX_ITER.value,
            head_std=_HEAD_STD.value, strategies_head_std=_STRAT_HEAD_STD.value,
            strategies_slow_block_std=_SLOW_STD.value, strategies_checkpoint=_STRAT_CKPT.value,
            strategies_init=_STRAT_INIT.value,
            sequential_above=_SEQ_ABOVE.value, reference_tarflow=_REFERENCE.value, guidance=_GUIDANCE.value,
            ref_before=_REF_BEFORE.value, ref_head_std=_REF_HEAD_STD.value)
  if _QUICK.value:
    return Settings.quick(**kw)
  return Settings(width=_WIDTH.value, tokens=_TOKENS.value,
                  layers=tuple(int(n) for n in _LAYERS.value),
                  head_dim=_HEAD_DIM.value, batch=_BATCH.value, repeats=_REPEATS.value,
                  jacobi_block=_JACOBI_BLOCK.value, strategies_image=_STRAT_IMAGE.value,
                  strategies_patch=_STRAT_PATCH.value, strategies_blocks=_STRAT_BLOCKS.value,
                  strategies_layers=_STRAT_LAYERS.value, strategies_width=_STRAT_WIDTH.value,
                  flops_widths=tuple(int(n) for n in _FLOPS_WIDTHS.value),
                  decode_width=_DECODE_WIDTH.value, decode_layers=_DECODE_LAYERS.value,
                  decode_vocab=_DECODE_VOCAB.value, decode_prompt=_DECODE_PROMPT.value,
                  decode_new=_DECODE_NEW.value,
                  decode_batches=tuple(int(n) for n in _DECODE_BATCHES.value),
                  flops_batch=_FLOPS_BATCH.value,
                  peak_sizes=tuple(int(n) for n in _PEAK_SIZES.value),
                  attention_shapes=tuple(parse_shape(x) for x in _ATTENTION_SHAPES.value),
                  ref_image_size=_REF_IMAGE.value, ref_patch=_REF_PATCH.value,
                  ref_blocks=_REF_BLOCKS.value, ref_layers=_REF_LAYERS.value,
                  ref_batch=_REF_BATCH.value, ref_samples=_REF_SAMPLES.value, **kw)


def parse_shape(text: str) -> tuple[int, int, int, int]:
  """"16x256x4x64" -> (16, 256, 4, 64)."""
  try:
    shape = tuple(int(n) for n in text.split("x"))
  except ValueError:
    shape = ()
  if len(shape) != 4 or min(shape) < 1:
    raise UserError(f"--attention_shapes: {text!r} is not BxTxHxDh with positive sizes, e.g. "
                    "16x256x4x64")
  return shape


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
  entry.run(main)
