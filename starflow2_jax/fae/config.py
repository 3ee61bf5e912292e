"""The FAE's static description, built from the `config.fae` ConfigDict (STARFLOW2.md section 6).

config.fae fields:
  image_size         pixel side the FAE encodes and decodes (256 paper, 32 toy)
  latent_channels    C of the latent (32 paper)
  dinov2             the trunk: a `Dinov2Config` section; its input_size is the side the images are
                     resized to before the trunk (224 paper: a 16 x 16 patch grid)
  dinov2_checkpoint  a converted DINOv2 (`launch.convert --from=hf_dinov2`) for the trunk ("" = random)
  train_encoder      the trunk trains (toy, phase joint) or is frozen (paper)
  head_heads, head_dim   encoder head attention (24 x 256 paper)
  decoder            feature decoder {width, layers, heads, head_dim, mlp_hidden, norm_eps, rope_base}
  pixel              pixel decoder {width, layers, heads, head_dim, mlp_hidden, norm_eps}
  beta_kl            weight of the KL term (1e-4)
  logvar_offset      added to the head's log-variance output: the initial posterior log-variance (0 =
                     unit variance; negative: the latent carries information from the first step)
  pixel_noise        phase pixel_noisy: feature noise relative to each token's RMS (0.4)
  phase              head | pixel_noisy | pixel_recon | joint
  frozen_from        an FAE checkpoint the parts this phase does not train come from ("" = init)
  stats_images       training images the latent statistics are computed over (10k)
  dtype, attention_impl, remat   how the networks run
"""
from __future__ import annotations

import dataclasses

import ml_collections

from starflow2_jax.errors import UserError, check_known_fields
from starflow2_jax.fae.dinov2 import Dinov2Config

PHASES = ("head", "pixel_noisy", "pixel_recon", "joint")
# The parts of the FAE's parameter tree and, per phase, the ones that train (the rest is frozen).
PARTS = ("trunk", "head", "feature_decoder", "pixel_decoder")
PHASE_PARTS = {"head": ("head", "feature_decoder"), "pixel_noisy": ("pixel_decoder",),
               "pixel_recon": ("pixel_decoder",), "joint": PARTS}
STATS = "latent_stats"  # params[STATS] = {"mean": [C], "std": [C]}


@dataclasses.dataclass(frozen=True)
class StackConfig:
  """A decoder transformer: width, depth, attention heads x head width, MLP hidden, norm eps."""
  width: int
  layers: int
  heads: int
  head_dim: int
  mlp_hidden: int
  norm_eps: float = 1e-6
  rope_base: float = 10000.0  # feature decoder only (2-D axial RoPE)


@dataclasses.dataclass(frozen=True)
class FAEConfig:
  dinov2: Dinov2Config
  image_size: int
  latent_channels: int
  head_heads: int
  head_dim: int
  decoder: StackConfig
  pixel: StackConfig
  beta_kl: float = 1e-4
  logvar_offset: float = 0.0
  pixel_noise: float = 0.4
  phase: str = "joint"
  train_encoder: bool = True
  dinov2_checkpoint: str = ""
  frozen_from: str = ""
  stats_images: int = 10_000
  dtype: str = "float32"
  attention_impl: str | None = None
  remat: str = "none"

  def __post_init__(self):
    if self.phase not in PHASES:
      raise UserError(f"fae.phase={self.phase!r}: expected one of {PHASES}")
    if self.phase == "joint" and not self.train_encoder:
      raise UserError("fae.phase='joint' trains the trunk with the rest: set fae.train_encoder=True, "
                      "or train the frozen-trunk phases head, pixel_noisy, pixel_recon")
    if self.phase != "joint" and self.train_encoder:
      raise UserError(f"fae.phase={self.phase!r} keeps the DINOv2 trunk frozen (paper): set "
                      "fae.train_encoder=False, or use fae.phase='joint'")
    gh, gw = self.grid
    if gh != gw or self.image_size % gh:
      raise UserError(f"fae.image_size={self.image_size} with the trunk's {gh}x{gw} patch grid "
                      f"(dinov2.input_size={self.dinov2.input_hw}, patch_size={self.dinov2.patch_size}):"
                      " the grid must be square and divide image_size (each latent decodes to a "
                      "square pixel patch)")

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict | dict) -> "FAEConfig":
    d = dict(c.to_dict() if isinstance(c, ml_collections.ConfigDict) else c)
    check_known_fields(cls, "fae", d)
    dino = dict(d.pop("dinov2"))
    for k in ("dtype", "attention_impl", "remat"):  # the trunk runs as the FAE does
      if k in d:
        dino[k] = d[k]
    d["dinov2"] = Dinov2Config.from_config(dino)
    d["decoder"] = StackConfig(**dict(d["decoder"]))
    d["pixel"] = StackConfig(**dict(d["pixel"]))
    if d.get("attention_impl") == "auto":
      d["attention_impl"] = None
    return cls(**d)

  @property
  def grid(self) -> tuple[int, int]:
    return self.dinov2.grid

  @property
  def num_latents(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def pixel_patch(self) -> int:
    """The pixel side each latent decodes to (16 paper: 256 px from 16 x 16 latents)."""
    return self.image_size // self.grid[0]

  @property
  def trainable_parts(self) -> tuple[str, ...]:
    return PHASE_PARTS[self.phase]
