"""Model FLOP utilisation: the step's FLOP/s per device over a peak.

The peak is `train.peak_flops` when set, else the chip's dense bf16 peak from `PEAK_BF16_FLOPS` (matched
on `jax.Device.device_kind`), reported as `mfu`; on a chip not in the table (e.g. a CPU) it is a matmul
peak measured at start-up (`measured_matmul_peak`), reported as `mfu_vs_matmul`. With no FLOP count
from XLA there is no MFU at all (never a 0).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# dense bf16 FLOP/s per chip, by a lower-case substring of device_kind (the most specific first)
PEAK_BF16_FLOPS = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("v5", 459e12),
    ("v4", 275e12),
    ("h200", 989e12), ("h100", 989e12),
    ("a100", 312e12),
)
# HBM bytes per chip (JAX device), by a lower-case substring of device_kind (the most specific first)
GIB = 2 ** 30
HBM_BYTES = (
    ("v6 lite", 32 * GIB), ("v6e", 32 * GIB),
    ("v5 lite", 16 * GIB), ("v5e", 16 * GIB),
    ("v5p", 95 * GIB), ("v5", 95 * GIB),
    ("v4", 32 * GIB),
    ("h200", 141 * 10 ** 9), ("h100", 80 * GIB),
)
MATMUL_SIZE = 1024  # M = N = K of the start-up matmul
MATMUL_REPEATS = 5  # timed calls; the fastest is the peak


def chip_peak(device_kind: str) -> float | None:
  """The table's bf16 peak for a device kind (e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3"), or None."""
  kind = device_kind.lower()
  return next((peak for key, peak in PEAK_BF16_FLOPS if key in kind), None)


def chip_hbm(device_kind: str) -> int | None:
  """The table's HBM bytes per chip for a device kind, or None (unknown, e.g. a CPU)."""
  kind = device_kind.lower()
  return next((hbm for key, hbm in HBM_BYTES if key in kind), None)


def measured_matmul_peak(n: int = MATMUL_SIZE, repeats: int = MATMUL_REPEATS) -> float:
  """FLOP/s of the fastest of `repeats` timed float32 [n, n] @ [n, n] products on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def peak(peak_flops: float) -> tuple[str, float]:
  """(metric name, peak FLOP/s per device): train.peak_flops, else the table, else measured."""
  if peak_flops > 0:
    return "mfu", float(peak_flops)
  known = chip_peak(jax.devices()[0].device_kind)
  if known is not None:
    return "mfu", known
  return "mfu_vs_matmul", measured_matmul_peak()
