"""PretzelConfig: the static description of a STARFlow2 model (STARFLOW2.md 4, 8.3, 9).

It composes
  * the frozen VLM stream: a `vlm.model.QwenConfig` (Qwen2.5-VL language model);
  * the image latent space of the frozen FAE: `latent_grid` (h, w), `latent_channels` C, and the flow's
    `latent_patch` p, so an image is N = (h/p)(w/p) tokens of D_tok = C p^2 channels (STARFlow layout);
  * the trainable flow stream (`config.model`): `shallow_blocks` x `shallow_layers` image-only STARFlow
    blocks (permutations shallow_0 Id, shallow_1 Flip, ...; own SOS each; normalised 2-D RoPE) and the
    deep stream of `deep_layers` layers (no SOS, M-RoPE over the VLM's (t, h, w) ids or 1-D RoPE, final
    RMSNorm), all of width `width` with heads of `head_dim`;
  * the couplings: P_txt (VLM -> flow at text positions), W_vlm, W_D, the visual adapter, `skip_taps`;
  * the tokenizer's vocabulary size (`text_vocab`: logits rows at or past it are never targets) and its
    special ids (`specials`, read with `pretzel.tokens.special_tokens`, never hard-coded).

Experiment-config sections read here:
  config.model   the flow-stream fields of `FLOW_FIELDS` below
  config.vlm     {checkpoint: "", model: {QwenConfig fields}}
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from starflow2_jax.errors import UserError
from starflow2_jax.flows.config import FlowConfig
from starflow2_jax.nn import rope as rope_lib
from starflow2_jax.nn.attention import REMAT_POLICIES, TransformerConfig
from starflow2_jax.nn.attention_ops import IMPLEMENTATIONS
from starflow2_jax.vlm.model import TOKEN_FIELDS, QwenConfig

DEEP_ROPES = ("mrope", "1d")


def _dtype(field: str, name: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise UserError(f"{field}={name!r} is not a dtype: use float32, bfloat16 or float64") from e


@dataclasses.dataclass(frozen=True)
class PretzelConfig:
  """Static (hashable) model description. Field defaults are the paper's (STARFLOW2.md 8.3)."""
  vlm: QwenConfig
  latent_grid: tuple[int, int] = (16, 16)  # the FAE latent grid (h, w)
  latent_channels: int = 32  # the FAE latent channels C
  text_vocab: int = 151665  # the tokenizer's vocabulary (rows >= it are embedding padding)
  specials: Any = None  # pretzel.tokens.SpecialTokens of the tokenizer (None: not needed by the model)
  # the flow stream (config.model)
  width: int = 3072
  head_dim: int = 64
  mlp_ratio: int = 4
  deep_layers: int = 24
  shallow_blocks: int = 2
  shallow_layers: int = 4
  norm_eps: float = 1e-5
  soft_clip: float = 4.0
  latent_patch: int = 1
  noise_std: float = 0.3  # on normalised FAE latents (STARFLOW2.md 2.6)
  deep_rope: str = "mrope"  # mrope (over the VLM's (t, h, w) ids) | 1d (running position)
  deep_rope_sections: tuple[int, ...] = (8, 12, 12)
  deep_rope_base: float = 10000.0
  shallow_rope_base: float = 10000.0
  adapter_hidden: int = 0  # 0: the VLM width (3584 in the paper)
  skip_taps: tuple[tuple[int, int], ...] = ()  # (VLM layer i in 1..L, deep layer j in 1..deep_layers)
  # research option (not in the paper): a learned [N, width] table of the token grid's cells added to
  # the deep stream's input at image positions (absolute positions for small flow streams)
  image_pos_table: bool = False
  stage1_vlm_prefix: int = 0  # stage 1: run the VLM on the first n positions only (0: all)
  dtype: str = "float32"  # flow trunk and adapter compute dtype (flow maths stay float32)
  param_dtype: str = "float32"
  attention_impl: str | None = None
  remat: str = "none"
  scan_layers: bool = True

  def __post_init__(self):
    def fail(field, expected, found, fix):
      raise UserError(f"model.{field}: expected {expected}, found {found!r}; {fix}")
    if self.deep_rope not in DEEP_ROPES:
      fail("deep_rope", f"one of {DEEP_ROPES}", self.deep_rope, "pick one of them")
    if self.remat not in REMAT_POLICIES:
      fail("remat", f"one of {REMAT_POLICIES}", self.remat, "pick one of them")
    if self.attention_impl not in (None, *IMPLEMENTATIONS):
      fail("attention_impl", f"None or one of {IMPLEMENTATIONS}", self.attention_impl, "pick one")
    if self.width % self.head_dim:
      fail("width", f"a multiple of model.head_dim={self.head_dim}", self.width, "change either")
    if min(self.deep_layers, self.shallow_layers) < 1 or self.shallow_blocks < 0:
      fail("deep_layers / shallow_layers / shallow_blocks", "layers >= 1 and blocks >= 0",
           (self.deep_layers, self.shallow_layers, self.shallow_blocks), "fix the counts")
    h, w = self.latent_grid
    if h % self.latent_patch or w % self.latent_patch:
      fail("latent_patch", f"a divisor of the FAE latent grid {h}x{w}", self.latent_patch,
           "choose a patch that divides the grid")
    if sum(self.deep_rope_sections) != self.head_dim // 2:
      fail("deep_rope_sections", f"sections summing to head_dim/2 = {self.head_dim // 2}",
           list(self.deep_rope_sections), "rescale them (the paper uses [8, 12, 12] for head_dim 64)")
    for i, j in self.skip_taps:
      if not (1 <= i <= self.vlm.num_layers and 1 <= j <= self.deep_layers):
        fail("skip_taps", f"pairs (VLM layer 1..{self.vlm.num_layers}, deep layer "
             f"1..{self.deep_layers})", [list(t) for t in self.skip_taps], "fix the layer numbers")
    if len(set(self.skip_taps)) != len(self.skip_taps):
      fail("skip_taps", "distinct pairs", [list(t) for t in self.skip_taps], "drop the repeats")
    if self.stage1_vlm_prefix < 0:
      fail("stage1_vlm_prefix", "0 (the whole sequence) or a positive length", self.stage1_vlm_prefix,
           "set it to 0 or to the longest prompt before an image")
    if self.text_vocab > self.vlm.vocab_size:
      raise UserError(f"the tokenizer has {self.text_vocab} tokens, but the VLM's vocab_size is "
                      f"{self.vlm.vocab_size}; use the tokenizer of this VLM")
    _dtype("model.dtype", self.dtype), _dtype("model.param_dtype", self.param_dtype)

  # -- derived shapes -----------------------------------------------------------------------------
  @property
  def token_grid(self) -> tuple[int, int]:
    """The grid of flow tokens of one image: (h/p, w/p)."""
    return self.latent_grid[0] // self.latent_patch, self.latent_grid[1] // self.latent_patch

  @property
  def num_latents(self) -> int:
    """N: latent positions of one image span."""
    return self.token_grid[0] * self.token_grid[1]

  @property
  def token_dim(self) -> int:
    """D_tok = C p^2."""
    return self.latent_channels * self.latent_patch ** 2

  @property
  def vlm_width(self) -> int:
    return self.vlm.hidden_size

  @property
  def adapter_width(self) -> int:
    return self.adapter_hidden or self.vlm.hidden_size

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def flow_dtype(self):
    """The dtype of the flow state and all affine maths: float32 (float64 when params are)."""
    return jnp.promote_types(self.params_dtype, jnp.float32)

  def shallow_flow(self) -> FlowConfig:
    """The shallow blocks as a STARFlow stack (block i < shallow_blocks of it; the last entry of
    layers_per_block stands for the deep block, so the starflow2 permutation rule gives shallow_0 Id,
    shallow_1 Flip, ... anchored at the deep block)."""
    p = self.latent_patch
    return FlowConfig(
        image_size=(self.latent_grid[0], self.latent_grid[1]), channels=self.latent_channels,
        patch_size=p, layout="starflow", parametrisation="starflow", width=self.width,
        head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
        layers_per_block=(self.shallow_layers,) * self.shallow_blocks + (self.deep_layers,),
        permutation_rule="starflow2", conditioning="deep", positions="rope2d",
        rope_base=self.shallow_rope_base, soft_clip=self.soft_clip, norm_eps=self.norm_eps,
        noise_std=self.noise_std, dtype=self.dtype, param_dtype=self.param_dtype,
        attention_impl=self.attention_impl, remat=self.remat, scan_layers=self.scan_layers)

  def deep_trunk(self) -> TransformerConfig:
    """The deep stream's trunk: STARFlow layers (LayerNorm, exact GELU, fused qkv, biases), RoPE in the
    rotate-half layout (M-RoPE or 1-D)."""
    return TransformerConfig(
        width=self.width, num_layers=self.deep_layers, num_heads=self.width // self.head_dim,
        head_dim=self.head_dim, mlp_hidden=self.mlp_ratio * self.width, norm_eps=self.norm_eps,
        rope_layout="half", attention_impl=self.attention_impl, remat=self.remat,
        scan_layers=self.scan_layers, dtype=self.compute_dtype, param_dtype=self.params_dtype)

  def deep_rope_spec(self) -> rope_lib.RopeSpec:
    if self.deep_rope == "1d":
      return rope_lib.rope_1d(self.head_dim, self.deep_rope_base)
    return rope_lib.mrope(self.head_dim, self.deep_rope_sections, self.deep_rope_base)

  def vlm_taps(self) -> tuple[int, ...]:
    """The raw VLM residuals the taps read (layers < L; layer L is the final-normed y_vlm)."""
    return tuple(sorted({i for i, _ in self.skip_taps if i < self.vlm.num_layers}))


FLOW_FIELDS = tuple(f.name for f in dataclasses.fields(PretzelConfig)
                    if f.name not in ("vlm", "latent_grid", "latent_channels", "text_vocab", "specials"))


def qwen_config(vlm: ml_collections.ConfigDict) -> QwenConfig:
  """config.vlm.model -> QwenConfig (the tokenizer-layout fields of a converted checkpoint ignored)."""
  model = {k: v for k, v in dict(vlm.model).items() if k not in TOKEN_FIELDS}
  model.pop("vision", None)  # STARFlow2 never runs Qwen's vision tower (STARFLOW2.md 4.1)
  return QwenConfig.from_config(ml_collections.ConfigDict(model))


def from_config(config: ml_collections.ConfigDict, *, vlm: QwenConfig, latent_grid: tuple[int, int],
                latent_channels: int, text_vocab: int, specials: Any = None) -> PretzelConfig:
  """The experiment config's `model` section plus the pieces read from the frozen components: the VLM
  config, the FAE's latent grid and channels, the tokenizer's vocabulary size and special ids."""
  d = dict(config.model.to_dict() if hasattr(config.model, "to_dict") else config.model)
  unknown = sorted(set(d) - set(FLOW_FIELDS))
  if unknown:
    raise UserError(f"config.model: unknown field(s) {unknown}; the known fields are "
                    f"{sorted(FLOW_FIELDS)}; fix the spelling or drop them")
  if "deep_rope_sections" in d:
    d["deep_rope_sections"] = tuple(int(s) for s in d["deep_rope_sections"])
  if "skip_taps" in d:
    taps = d["skip_taps"]
    if any(len(t) != 2 for t in taps):
      raise UserError(f"model.skip_taps: expected a list of [vlm_layer, deep_layer] pairs, found {taps}")
    d["skip_taps"] = tuple((int(i), int(j)) for i, j in taps)
  positions = config.get("vlm", {}).get("image_positions", "mrope")
  if d.get("image_pos_table") and positions != "mrope":
    raise UserError(f"model.image_pos_table reads each latent's grid cell from its M-RoPE ids, but "
                    f"vlm.image_positions={positions!r} gives every latent the same cell; set "
                    "vlm.image_positions=mrope or model.image_pos_table=False")
  return PretzelConfig(vlm=vlm, latent_grid=tuple(int(s) for s in latent_grid),
                       latent_channels=int(latent_channels), text_vocab=int(text_vocab),
                       specials=specials, **d)
