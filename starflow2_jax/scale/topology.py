"""Named compile targets: Cloud TPU slices (built with libtpu on any machine) and this host's devices.

  parse("v5p-64")      -> Topology(generation="v5p", chips=32, shape=(2, 4, 4))
  parse("v5p:2x4x4")   -> the same slice, named by its chip grid
  parse("v5e-256")     -> 256 chips, (16, 16);   parse("v4-128") -> 64 chips, (4, 4, 4)
  parse("cpu") / parse("cpu:8")  -> this host's CPU devices (all, or the first 8): tests, tiny configs
  target_devices(topology) -> the slice's devices (abstract TPU devices: compile only, never run)

Cloud TPU names count TensorCores for v4 and v5p (two per chip: v5p-64 is 32 chips) and chips for v5e
and v6e. A slice's chips form a 3-D torus (v4, v5p) or a 2-D grid (v5e, v6e) in the standard shapes
(sides powers of two, as even as possible, the smallest first). JAX sees one device per chip (v4 and
v5p as megacore chips). Per-chip HBM and bf16 peak come from `train.mfu`; the HBM bandwidth (decode
steps, `scale.generation`) from Cloud TPU's published figures here.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax

from starflow2_jax.errors import UserError
from starflow2_jax.train import mfu


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # the Cloud TPU name prefix
  libtpu_name: str  # the name libtpu's topology descriptions use
  dims: int  # 3: torus of v4 / v5p, 2: grid of v5e / v6e
  cores_per_chip: int  # TensorCores counted by the slice name (v4, v5p: 2; v5e, v6e: chips)
  chip_config: str  # libtpu chip config: megacore chips as one device, or "default"
  device_kind: str  # jax.Device.device_kind of the chips (for the train.mfu tables)
  hbm_bandwidth: float  # HBM bytes/s per chip (Cloud TPU's published figures)


GB = 1e9
GENERATIONS = {g.name: g for g in (
    Generation("v4", "v4", 3, 2, "megacore", "TPU v4", 1200 * GB),
    Generation("v5p", "v5p", 3, 2, "megacore", "TPU v5", 2765 * GB),
    Generation("v5e", "v5e", 2, 1, "default", "TPU v5 lite", 819 * GB),
    Generation("v6e", "v6e", 2, 1, "default", "TPU v6 lite", 1640 * GB),
)}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}  # other names Cloud TPU uses
HOST_CHIPS = (2, 2, 1)  # chips per host of multi-host slices (4-chip hosts)
CPU = "cpu"


@dataclasses.dataclass(frozen=True)
class Topology:
  """A compile target. `generation` None: this host's CPU devices (`chips` of them, 0 = all)."""
  name: str
  generation: Generation | None
  chips: int
  shape: tuple[int, ...]

  @property
  def is_tpu(self) -> bool:
    return self.generation is not None

  @property
  def platform(self) -> str:
    return "tpu" if self.is_tpu else CPU

  @property
  def device_kind(self) -> str:
    return self.generation.device_kind if self.is_tpu else jax.devices(CPU)[0].device_kind

  @property
  def hbm_bytes(self) -> int | None:
    """HBM per chip (None: unknown, e.g. a CPU)."""
    return mfu.chip_hbm(self.device_kind)

  @property
  def peak_flops(self) -> float | None:
    """Dense bf16 FLOP/s per chip (None: unknown)."""
    return mfu.chip_peak(self.device_kind)

  @property
  def hbm_bandwidth(self) -> float | None:
    """HBM bytes/s per chip (None: unknown, e.g. a CPU)."""
    return self.generation.hbm_bandwidth if self.is_tpu else None

  @property
  def libtpu_topology(self) -> str:
    return f"{self.generation.libtpu_name}:{'x'.join(map(str, self.shape))}"


def standard_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The standard slice shape of `chips` (a power of two) chips in `dims` dimensions: sides powers of
  two, as even as possible, ascending, sides of 1 last (16 chips: (2, 2, 4) or (4, 4); 32: (2, 4, 4) or (4, 8))."""
  k = chips.bit_length() - 1
  if chips < 1 or 1 << k != chips:
    raise ValueError(chips)
  sides = sorted(1 << (k // dims + (1 if i >= dims - k % dims else 0)) for i in range(dims))
  return tuple(s for s in sides if s > 1) + tuple(s for s in sides if s == 1)  # v5p-8: (2, 2, 1)


def _generation(name: str, spec: str) -> Generation:
  gen = GENERATIONS.get(ALIASES.get(name, name))
  if gen is None:
    raise UserError(f"--topology={spec!r}: unknown TPU generation {name!r}; expected one of "
                    f"{sorted(GENERATIONS) + sorted(ALIASES)} (e.g. v5p-64, v5e:4x4) or 'cpu[:N]'")
  return gen


def parse(spec: str) -> Topology:
  """A target from a Cloud TPU slice name (`v5p-64`), a chip grid (`v5p:2x4x4`) or `cpu[:N]`."""
  s = spec.strip().lower()
  if s == CPU or s.startswith(CPU + ":"):
    n = s[len(CPU) + 1:]
    if n and not n.isdigit():
      raise UserError(f"--topology={spec!r}: expected 'cpu' or 'cpu:N' with N devices")
    return Topology(s, None, int(n or 0), ())
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", s)
  if m:
    gen = _generation(m.group(1), spec)
    count = int(m.group(2))
    chips, rest = divmod(count, gen.cores_per_chip)
    if rest or chips < 1 or chips & (chips - 1):
      unit = "TensorCores (two per chip)" if gen.cores_per_chip == 2 else "chips"
      raise UserError(f"--topology={spec!r}: {gen.name} slice names count {unit}; expected "
                      f"{gen.name}-N with N/{gen.cores_per_chip} chips a power of two "
                      f"(e.g. {gen.name}-{8 * gen.cores_per_chip}), or an explicit grid like "
                      f"{gen.name}:{'x'.join(['2'] * gen.dims)}")
    return Topology(s, gen, chips, standard_shape(chips, gen.dims))
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", s)
  if m:
    gen = _generation(m.group(1), spec)
    shape = tuple(int(x) for x in m.group(2).split("x"))
    if len(shape) != gen.dims or min(shape) < 1:
      raise UserError(f"--topology={spec!r}: {gen.name} chips form a {gen.dims}-D grid; expected "
                      f"{gen.name}:{'x'.join(['N'] * gen.dims)}")
    return Topology(s, gen, math.prod(shape), shape)
  raise UserError(f"--topology={spec!r}: expected a Cloud TPU name (v5p-64, v5e-256, v4-128, v6e-64), "
                  "a chip grid (v5p:2x4x4, v5e:16x16) or 'cpu[:N]'")


def target_devices(topology: Topology) -> list:
  """The target's devices: abstract TPU devices from libtpu (compile only), or this host's CPUs."""
  if not topology.is_tpu:
    devices = jax.devices(CPU)
    n = topology.chips or len(devices)
    if n > len(devices):
      raise UserError(f"--topology={topology.name}: {n} CPU devices asked, this process has "
                      f"{len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    return devices[:n]
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.libtpu_topology,
        chip_config_name=topology.generation.chip_config,
        chips_per_host_bounds=tuple(min(h, s) for h, s in zip(HOST_CHIPS, topology.shape + (1,))),
        num_slices=1)
  except Exception as e:  # libtpu missing or too old: a RuntimeError / XlaRuntimeError from the plugin
    raise UserError(f"--topology={topology.name}: cannot build the TPU topology "
                    f"{topology.libtpu_topology} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                    "Compiling for TPU needs libtpu: pip install -e '.[tpu]'") from e
  return list(desc.devices)
