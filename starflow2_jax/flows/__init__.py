"""Autoregressive normalizing flows: TarFlow and STARFlow blocks, deep-shallow stacks, sampling."""
from starflow2_jax.flows.block import Affine, FlowBlock, affine_from_raw
from starflow2_jax.flows.config import FlowConfig
from starflow2_jax.flows.guidance import Guidance, gaussian_rule, linear_rule
from starflow2_jax.flows.likelihood import (bits_per_dim, dequantize, log_prob, loss,
                                            nll_per_sample)
from starflow2_jax.flows.model import FlowModel, FlowOutput, drop_labels
from starflow2_jax.flows.patchify import image_tokens, patchify, token_images, unpatchify
from starflow2_jax.flows.permutations import block_permutations, permute
from starflow2_jax.flows.sampling import (Jacobi, choose_strategies, denoise, noise, rank_blocks,
                                          reverse, reverse_uncached, sample)

__all__ = [
    "Affine", "FlowBlock", "affine_from_raw", "FlowConfig", "Guidance", "gaussian_rule",
    "linear_rule", "bits_per_dim", "dequantize", "log_prob", "loss", "nll_per_sample", "FlowModel",
    "FlowOutput", "drop_labels", "image_tokens", "patchify", "token_images", "unpatchify", "block_permutations", "permute", "Jacobi",
    "choose_strategies", "denoise", "noise", "rank_blocks", "reverse", "reverse_uncached", "sample",
]
