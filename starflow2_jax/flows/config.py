"""FlowConfig: the static description of an autoregressive flow (TarFlow, STARFlow, STARFlow2 streams).

Built from the `config.model` ConfigDict of an experiment (`FlowConfig.from_config`); unknown or
ill-typed fields fail with a message naming the field.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from starflow2_jax.errors import UserError
from starflow2_jax.flows.patchify import LAYOUTS
from starflow2_jax.flows.permutations import RULES, block_permutations
from starflow2_jax.nn.attention import REMAT_POLICIES
from starflow2_jax.nn.attention_ops import IMPLEMENTATIONS

PARAMETRISATIONS = ("tarflow", "starflow")
CONDITIONING = ("all", "deep")
POSITIONS = ("learned", "rope2d")
DEQUANT = ("gaussian", "uniform")

# STARFlow's softplus offset log(e - 1) ~ 0.5413: softplus(a + SOFTPLUS_SHIFT) = 1 at a = 0. The
# reference code uses the full-precision value (INV_SOFTPLUS_1 = 0.541324854612918).
SOFTPLUS_SHIFT = math.log(math.e - 1.0)


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise UserError(f"unknown dtype {name!r}: use float32, bfloat16 or float64") from e


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """A stack of autoregressive affine flow blocks over patch tokens.

  Blocks are listed from the data side (block 0) to the noise side; `layers_per_block[-1]` is the deep
  block in a deep-shallow (STARFlow) stack. T = (H/p)(W/p) tokens of D = C p^2 channels.
  """
  image_size: tuple[int, int] = (32, 32)  # (H, W)
  channels: int = 3
  patch_size: int = 4
  layout: str = "tarflow"  # token channel layout: tarflow (c,p1,p2) | starflow (p1,p2,c)
  parametrisation: str = "tarflow"  # tarflow (shift + exp scale) | starflow (SOS + softplus scale)
  width: int = 256
  head_dim: int = 64
  mlp_ratio: int = 4
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  permutation_rule: str = "tarflow"  # see permutations.block_permutations
  conditioning: str = "all"  # all blocks (TarFlow) | deep block only (STARFlow)
  num_classes: int = 0  # 0 = no class conditioning
  label_drop: float = 0.0  # training-time probability of replacing a label by -1 (mean embedding)
  context_dim: int = 0  # width of a causal context prefix of the deep block (0 = none)
  positions: str = "learned"  # learned absolute table (TarFlow) | rope2d (STARFlow normalised 2-D RoPE)
  rope_base: float = 10000.0
  pt_seq_len: float = 0.0  # STARFlow RoPE position scale; 0 = the grid side sqrt(h*w)
  soft_clip: float = 4.0  # STARFlow soft clip c of a and mu
  norm_eps: float = 1e-5
  noise_std: float = 0.05  # training noise sigma (gaussian dequantisation)
  dequant: str = "gaussian"  # gaussian (x + sigma eps) | uniform (TarFlow BPD models)
  latent_norm_reg: float = 0.0  # STARFlow regulariser on the non-final block outputs
  dtype: str = "float32"  # trunk compute dtype; flow maths stay float32
  param_dtype: str = "float32"
  attention_impl: str | None = None  # None = auto (per platform) | nn.attention_ops.IMPLEMENTATIONS
  remat: str = "none"  # rematerialisation inside each trunk's layer scan: none | dots_saveable | full
  scan_layers: bool = True  # False: the layer scans fully unrolled (same stacked parameters)

  def __post_init__(self):
    def check(field, value, allowed):
      if value not in allowed:
        raise UserError(f"model.{field} must be one of {tuple(allowed)}, got {value!r}")
    check("layout", self.layout, LAYOUTS)
    check("parametrisation", self.parametrisation, PARAMETRISATIONS)
    check("conditioning", self.conditioning, CONDITIONING)
    check("positions", self.positions, POSITIONS)
    check("permutation_rule", self.permutation_rule, RULES)
    check("dequant", self.dequant, DEQUANT)
    check("remat", self.remat, REMAT_POLICIES)
    check("attention_impl", self.attention_impl, (None, *IMPLEMENTATIONS))
    h, w = self.image_size
    if h % self.patch_size or w % self.patch_size:
      raise UserError(f"model.image_size {h}x{w} is not divisible by model.patch_size "
                      f"{self.patch_size}")
    if self.width % self.head_dim:
      raise UserError(f"model.width {self.width} is not divisible by model.head_dim {self.head_dim}")
    if not self.layers_per_block or min(self.layers_per_block) < 1:
      raise UserError(f"model.layers_per_block must be a non-empty list of positive ints, got "
                      f"{self.layers_per_block}")
    if self.context_dim and self.parametrisation != "starflow":
      raise UserError("model.context_dim (a causal text prefix) needs parametrisation='starflow'")
    if not 0.0 <= self.label_drop < 1.0:
      raise UserError(f"model.label_drop must be in [0, 1), got {self.label_drop}")
    _dtype(self.dtype), _dtype(self.param_dtype)

  @classmethod
  def from_config(cls, cfg: Any) -> "FlowConfig":
    """From a ConfigDict / dict. `image_size` may be an int (square) or [H, W]."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise UserError(f"unknown model config field(s) {unknown}; known fields: {sorted(names)}")
    size = d.get("image_size", cls.image_size)
    d["image_size"] = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if "layers_per_block" in d:
      d["layers_per_block"] = tuple(int(n) for n in d["layers_per_block"])
    return cls(**d)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["image_size"] = list(self.image_size)
    d["layers_per_block"] = list(self.layers_per_block)
    return d

  # Derived shapes ------------------------------------------------------------------------------
  @property
  def grid(self) -> tuple[int, int]:
    return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def token_dim(self) -> int:
    return self.channels * self.patch_size ** 2

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (*self.image_size, self.channels)

  @property
  def num_blocks(self) -> int:
    return len(self.layers_per_block)

  @property
  def permutations(self) -> tuple[str, ...]:
    return block_permutations(self.num_blocks, self.permutation_rule)

  def is_conditional(self, block: int) -> bool:
    """Does block `block` see labels / the context prefix (and get guided)?"""
    if not (self.num_classes or self.context_dim):
      return False
    return self.conditioning == "all" or block == self.num_blocks - 1

  def has_context(self, block: int) -> bool:
    return bool(self.context_dim) and block == self.num_blocks - 1

  @property
  def rope_pt(self) -> float:
    return self.pt_seq_len or math.sqrt(self.num_tokens)

  def check_images(self, images) -> None:
    """Raise a ValueError naming the config fields unless images is [B, H, W, C] of this model."""
    if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
      h, w, c = self.image_shape
      raise UserError(
          f"images: expected shape [B, {h}, {w}, {c}] (model.image_size={list(self.image_size)}, "
          f"model.channels={c}), got {list(images.shape)}")

  @property
  def compute_dtype(self):
    return _dtype(self.dtype)

  @property
  def params_dtype(self):
    return _dtype(self.param_dtype)

  @property
  def flow_dtype(self):
    """The dtype of the flow state and all affine maths: float32 (float64 when params are float64)."""
    return jnp.promote_types(self.params_dtype, jnp.float32)
