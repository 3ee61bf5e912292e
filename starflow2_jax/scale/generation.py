"""The STARFlow2 generation step ahead of time: one decode step of `generate.step.joint_step` (both
streams, both KV caches) compiled for a target from abstract, sharded values (nothing is allocated).

  plan = build(config, devices, conversations=0)   # 0: one conversation per batch shard
  rep = compile_report(config, "v5p-64")            # GenerationReport; format_report(rep)

What is compiled, and why the step rather than the whole `generate.loop.jitted_generate`: the loop's
`while_loop` stops on sampled stop tokens (and Jacobi convergence), so its trip count is data-dependent
and its FLOPs cannot be counted by trip counts (`scale.hlo_flops` counts such a loop once); and the loop
builds its caches inside, so no caller can give them a sharding. Every generated position (text token,
latent, <|vision_end|>) is one such step, so the step is the unit of generation cost; the loop's carry
adds only [B, M]-sized bookkeeping next to the caches.

Shapes. B conversations (`conversations`, default one per data x fsdp shard), R = 2B rows with
classifier-free guidance (config.sample.guidance > 0: [cond; uncond] rows) else B; S = the cache length
(`generate.api.sample_settings`: sample.cache_len, default data.max_len); one new position per row.
Arguments: the trainable Pretzel params (as trained, param_dtype), the frozen VLM language model, the
`generate.step.Caches` pytree (VLM [L_vlm, R, S, Hkv, Dh] and deep [L_deep, R, S, H, Dh] K/V buffers,
donated: written in place as the loop does), tokens / is_image / valid / running [R, 1], u [R, 1, D],
positions [R, 1, 3]. Every sharding comes from the one rules table (`parallel.logical_rules`: cache batch
over data x fsdp, KV heads over tensor; the step inputs' rows as the cache batch).

FLOPs. `compiled`: the matmuls of the lowered step (`scale.hlo_flops` on the unoptimized global HLO,
scanned layers times their trip counts). Not the optimized program's: with a few rows per chip, XLA's
TPU passes rewrite the matrix-vector products as element-wise reductions, which are no matmuls to the
counter (2% of the paper config's step at one row per chip); the part still matmuls there is `mxu`.
`analytical`: 2 N R for the kernels that run per position (the VLM language model with its LM head,
the adapter, the deep stream, the skips; the shallow blocks only run when the generated latents are
inverted, outside the loop) plus attention 4 S (VLM heads x head_dim x layers + deep width x layers) R
over the full cache (dense, as compiled).
Per generated token and conversation: step / B; per image: (N + 1) steps / B (its N latents and the
forced <|vision_end|>; the prompt's prefill and the decoding of the latents are not included).
Time (arithmetic, not a measurement): a step takes at least the larger of its compiled FLOPs per chip
at a fraction of the chip's peak and one read of its arguments (params, frozen VLM, caches) from HBM
at the chip's bandwidth (`scale.topology`); a decode step is usually bound by the second.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from starflow2_jax import parallel
from starflow2_jax.errors import UserError
from starflow2_jax.generate import api as gen_api
from starflow2_jax.generate.step import Caches, joint_step
from starflow2_jax.nn import attention_ops
from starflow2_jax.pretzel import config as pconfig, model as pmodel, stages
from starflow2_jax.pretzel.tokens import special_tokens
from starflow2_jax.scale import abstract, hlo_flops, model_flops, report as report_lib, topology as topo_lib
from starflow2_jax.train import pretzel_task
from starflow2_jax.vlm import tokenizer as tok_lib

MODEL_KIND = "starflow2"
STEP_POSITIONS = 1  # new positions per row in a decode step
POSITION_IDS = 3  # M-RoPE ids per position
ARG_NAMES = ("params", "vlm_params", "caches", "tokens", "u", "is_image", "positions", "valid", "running")
ROWS = "cache_batch"  # the logical name the step inputs' rows share with the caches' batch
NOT_IN_DECODE = ("shallow",)  # parameter groups the decode step does not run


@dataclasses.dataclass
class GenerationPlan:
  """The abstract, sharded decode step of a STARFlow2 config on `mesh`."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: Any
  cfg: pconfig.PretzelConfig
  step: Any  # the jitted decode step (with .lower)
  args: tuple  # ShapeDtypeStructs with shardings, in ARG_NAMES order
  conversations: int  # B
  rows: int  # R (2B guided)
  cache_len: int  # S

  def lower(self) -> jax.stages.Lowered:
    with parallel.sharding_context(self.mesh, self.rules), \
        attention_ops.target_platform(self.mesh.devices.flat[0].platform):
      return self.step.lower(*self.args)


def _rows_abstract(mesh, rules, shape, dtype) -> jax.ShapeDtypeStruct:
  """A step input [R, ...] sharded like the caches' batch (replicated where the mesh does not divide R)."""
  names = (ROWS,) + (None,) * (len(shape) - 1)
  boxed = nn.Partitioned(jax.ShapeDtypeStruct(shape, dtype), names=names)
  sharding = parallel.logical_to_shardings(boxed, mesh, rules)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def build(config: ml_collections.ConfigDict, devices: list, conversations: int = 0) -> GenerationPlan:
  """The decode step of a STARFlow2 `config` on a mesh over `devices` (config.mesh decides its shape).
  conversations: B (0: one per data x fsdp shard of the mesh)."""
  if config.get("model_kind") != MODEL_KIND:
    raise UserError(f"model_kind={config.get('model_kind')!r}: the generation step is compiled for "
                    f"{MODEL_KIND!r} configs only; drop the generation option for this config")
  if conversations < 0:
    raise UserError(f"generation batch {conversations}: expected a positive number of conversations, "
                    "or 0 for one per data x fsdp shard")
  config = abstract.with_train_defaults(config)
  mesh = parallel.make_mesh(config.mesh, devices)
  rules = parallel.logical_rules(config)
  seed = int(config.train.seed)
  # the frozen VLM exactly as training builds it (on a compile-only mesh: ShapeDtypeStructs)
  vlm, vlm_params, qcfg = pretzel_task.frozen_vlm(config, mesh, rules, [seed, pretzel_task.VLM_STREAM])
  fae = pretzel_task.fae_of(config)
  tokenizer = tok_lib.load_tokenizer(pretzel_task.tokenizer_path(config.tokenizer))
  cfg = pconfig.from_config(config, vlm=qcfg, latent_grid=fae.grid, latent_channels=fae.channels,
                            text_vocab=tokenizer.get_vocab_size(with_added_tokens=True),
                            specials=special_tokens(tokenizer))
  model = pmodel.Pretzel(cfg)
  boxed = jax.eval_shape(lambda r: pmodel.init_params(model, r), jax.random.key(seed))
  params = abstract.with_shardings(nn.unbox(boxed), parallel.logical_to_shardings(boxed, mesh, rules))
  settings = gen_api.sample_settings(config)
  b = conversations or parallel.batch_shards(mesh)
  rows = 2 * b if settings["guidance"] > 0 else b
  length = settings["cache_len"]
  caches = jax.eval_shape(lambda: Caches.init(cfg, rows, length))
  cache_sh = Caches(vlm=caches.vlm.shardings(mesh, rules), deep=caches.deep.shardings(mesh, rules))
  caches = abstract.with_shardings(caches, cache_sh)
  t = STEP_POSITIONS
  inputs = [_rows_abstract(mesh, rules, shape, dtype) for shape, dtype in (
      ((rows, t), jnp.int32), ((rows, t, cfg.token_dim), cfg.flow_dtype), ((rows, t), jnp.bool_),
      ((rows, t, POSITION_IDS), jnp.int32), ((rows, t), jnp.bool_), ((rows, t), jnp.int32))]
  out_sh = (cache_sh, _rows_abstract(mesh, rules, (rows, t, cfg.vlm.vocab_size), jnp.float32).sharding,
            _rows_abstract(mesh, rules, (rows, t, 2 * cfg.token_dim), cfg.flow_dtype).sharding)

  def decode_step(params, vlm_params, caches, tokens, u, is_image, positions, valid, running):
    return joint_step(model, params, vlm, vlm_params, caches, tokens, u, is_image, positions, valid,
                      running)

  step = jax.jit(decode_step, donate_argnums=(ARG_NAMES.index("caches"),), out_shardings=out_sh)
  return GenerationPlan(config, mesh, rules, cfg, step, (params, vlm_params, caches, *inputs), b, rows,
                        length)


def analytical_step_flops(plan: GenerationPlan) -> dict[str, float]:
  """{"matmuls", "attention", "total"}: the module docstring's analytical FLOPs of one decode step."""
  params, vlm_params = plan.args[0], plan.args[1]
  running = {k: v for k, v in params.items() if stages.group_of(k) not in NOT_IN_DECODE}
  n = model_flops.kernel_params(running) + model_flops.kernel_params(vlm_params)
  q, deep = plan.cfg.vlm, plan.cfg.deep_trunk()
  per_key = q.num_heads * q.head_dim * q.num_layers + deep.num_heads * deep.head_dim * deep.num_layers
  r = plan.rows * STEP_POSITIONS
  matmuls = float(model_flops.FORWARD_PER_PARAM_TOKEN * n * r)
  attention = float(model_flops.ATTENTION_FORWARD_PER_KEY * plan.cache_len * per_key * r)
  return {"matmuls": matmuls, "attention": attention, "total": matmuls + attention}


@dataclasses.dataclass
class GenerationReport:
  config_name: str
  topology: str
  device_kind: str
  devices: int
  mesh: dict[str, int]
  conversations: int
  rows: int
  cache_len: int
  num_latents: int
  hbm_bytes: int | None
  memory: dict[str, int] | None  # per chip (report.memory_of)
  fits: bool | None
  compiled_flops: float | None  # one decode step, all chips (the lowered program's matmuls)
  mxu_flops: float | None  # the part still matmuls in the optimized program (None: not printable)
  analytical: dict[str, float]
  peak_flops: float | None
  hbm_bandwidth: float | None  # bytes/s per chip
  largest_buffers: list[tuple[str, int]]
  compiler_message: str
  lower_seconds: float
  compile_seconds: float
  compiled: Any = dataclasses.field(default=None, repr=False)
  plan: Any = dataclasses.field(default=None, repr=False)

  @property
  def flop_ratio(self) -> float | None:
    return self.compiled_flops / self.analytical["total"] if self.compiled_flops else None

  @property
  def flops_per_token(self) -> float | None:
    """Compiled FLOPs per generated position of one conversation (its guidance row included)."""
    return self.compiled_flops / self.conversations if self.compiled_flops else None

  @property
  def flops_per_image(self) -> float | None:
    """N latents and the forced <|vision_end|> of one conversation's image (no prefill, no decoding)."""
    return self.flops_per_token * (self.num_latents + 1) if self.compiled_flops else None

  def compute_seconds(self, utilisation: float = 1.0) -> float | None:
    if not self.compiled_flops or not self.peak_flops:
      return None
    return self.compiled_flops / self.devices / (self.peak_flops * utilisation)

  def read_seconds(self) -> float | None:
    """One read of the step's arguments (per chip) from HBM."""
    if self.memory is None or not self.hbm_bandwidth:
      return None
    return self.memory["arguments"] / self.hbm_bandwidth

  def step_seconds(self, utilisation: float = 1.0) -> float | None:
    """The floor: the larger of the compute time at `utilisation` of peak and the HBM read."""
    times = [t for t in (self.compute_seconds(utilisation), self.read_seconds()) if t]
    return max(times) if times else None

  def images_per_second(self, utilisation: float = 1.0) -> float | None:
    s = self.step_seconds(utilisation)
    return self.conversations / (s * (self.num_latents + 1)) if s else None

  def to_json(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
         if f.name not in ("compiled", "plan")}
    u = report_lib.UTILISATION
    d.update(flop_ratio=self.flop_ratio, flops_per_token=self.flops_per_token,
             flops_per_image=self.flops_per_image, compute_seconds_at_utilisation=self.compute_seconds(u),
             read_seconds=self.read_seconds(), step_seconds_at_peak=self.step_seconds(1.0),
             step_seconds_at_utilisation=self.step_seconds(u), utilisation=u,
             images_per_second_at_utilisation=self.images_per_second(u))
    return d


def compile_report(config: ml_collections.ConfigDict, target: str, config_name: str = "",
                   conversations: int = 0, hbm_bytes: int | None = None) -> GenerationReport:
  """Lower and compile the decode step of `config` for `target` (a `scale.topology` name); an
  out-of-memory verdict of the compiler is a report (fits False), not an error."""
  topo = topo_lib.parse(target)
  devices = topo_lib.target_devices(topo)
  t0 = time.perf_counter()
  plan = build(config, devices, conversations)
  lowered = plan.lower()
  t1 = time.perf_counter()
  compiled, message = None, ""
  try:
    compiled = lowered.compile()
  except Exception as e:  # XlaRuntimeError; only an out-of-memory verdict is reported
    if not report_lib.is_oom(e):
      raise
    message = "\n".join(str(e).splitlines()[:report_lib.COMPILER_LINES])
  t2 = time.perf_counter()
  n = len(devices)
  memory = report_lib.memory_of(compiled) if compiled is not None else None
  mxu = None
  if compiled is not None:
    try:
      mxu = hlo_flops.count(compiled.as_text()).flops * n
    except Exception:  # JaxRuntimeError: libtpu cannot print some programs back (report.count_flops)
      pass  # the optimized count stays unknown
  program = hlo_flops.count(lowered.compiler_ir(dialect="hlo").as_hlo_text()).flops
  hbm = hbm_bytes or topo.hbm_bytes
  fits = False if memory is None else (memory["total"] <= hbm if hbm else None)
  return GenerationReport(
      config_name=config_name, topology=topo.name, device_kind=devices[0].device_kind, devices=n,
      mesh={k: int(v) for k, v in plan.mesh.shape.items()}, conversations=plan.conversations,
      rows=plan.rows, cache_len=plan.cache_len, num_latents=plan.cfg.num_latents, hbm_bytes=hbm,
      memory=memory, fits=fits, compiled_flops=program if compiled is not None else None, mxu_flops=mxu,
      analytical=analytical_step_flops(plan), peak_flops=topo.peak_flops,
      hbm_bandwidth=topo.hbm_bandwidth,
      largest_buffers=[] if fits is not False else report_lib.largest_buffers(plan.args, names=ARG_NAMES),
      compiler_message=message, lower_seconds=t1 - t0, compile_seconds=t2 - t1,
      compiled=compiled, plan=plan)


def format_report(r: GenerationReport) -> str:
  """The generation part of `launch.compile`'s report."""
  gib = report_lib.gib
  guided = " (guided: [cond; uncond])" if r.rows == 2 * r.conversations else ""
  lines = [f"{r.config_name or 'config'} generation on {r.topology}: {r.devices} x {r.device_kind}, mesh "
           f"{r.mesh}; one decode step of generate.step.joint_step",
           f"  {r.conversations} conversations, {r.rows} rows{guided}, cache {r.cache_len} positions, "
           f"N = {r.num_latents} latents per image; lowered in {r.lower_seconds:.1f} s, compiled in "
           f"{r.compile_seconds:.1f} s"]
  hbm = gib(r.hbm_bytes) if r.hbm_bytes else "unknown HBM"
  if r.memory is not None:
    m = r.memory
    lines.append(f"  memory per chip: arguments {gib(m['arguments'])} (params, frozen VLM, caches), outputs "
                 f"{gib(m['outputs'])} ({gib(m['aliased'])} aliased), temporaries {gib(m['temporaries'])}; "
                 f"total {gib(m['total'])} of {hbm}")
  lines += report_lib.fit_lines(r, "fewer conversations (--gen_batch), a shorter sample.cache_len, more "
                                  "tensor / fsdp sharding (mesh.shape), or a larger slice")
  a = r.analytical
  lines.append(f"  analytical FLOPs per step {a['total']:.4g} (2ND matmuls {a['matmuls']:.4g}, attention "
               f"over the cache {a['attention']:.4g})")
  if r.compiled_flops:
    mxu = f"; {r.mxu_flops:.4g} of them still matmuls after optimization" if r.mxu_flops else ""
    lines.append(f"  compiled FLOPs per step {r.compiled_flops:.4g} (matmuls of the lowered program{mxu}); "
                 f"compiled / analytical = {r.flop_ratio:.3f}")
    lines.append(f"  per generated token {r.flops_per_token:.4g} FLOPs, per image {r.flops_per_image:.4g} "
                 "(N + 1 steps; prefill and decoding not included)")
  u = report_lib.UTILISATION
  if r.step_seconds(u):
    compute, read = r.compute_seconds(u), r.read_seconds()
    parts = ([f"compute at {u:.0%} of peak {compute:.3g} s"] if compute else []) + (
        [f"reading {gib(r.memory['arguments'])} from HBM {read:.3g} s"] if read else [])
    lines.append(f"  arithmetic, not a measurement: a step takes at least {r.step_seconds(u):.3g} s "
                 f"({', '.join(parts)}): {r.images_per_second(u):,.2f} images/s")
  return "\n".join(lines)
