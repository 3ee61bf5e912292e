"""Token-order permutations of flow blocks (STARFLOW2.md 2.7). Both are involutions."""
from __future__ import annotations

import jax

PERMUTATIONS = ("identity", "flip")
RULES = ("tarflow", "starflow_r2l", "starflow_l2r", "starflow2")


def permute(x: jax.Array, kind: str, axis: int = 1) -> jax.Array:
  """Apply (= invert) the permutation along the token axis."""
  if kind == "identity":
    return x
  if kind == "flip":
    return jax.numpy.flip(x, axis=axis)
  raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {kind!r}")


def block_permutations(num_blocks: int, rule: str) -> tuple[str, ...]:
  """Permutation of each block, blocks counted from the data side (block 0 first in forward order).

  tarflow / starflow_r2l: Identity for even i, Flip for odd i.
  starflow_l2r: Flip for even i, Identity for odd i (the STARFlow 3B config).
  starflow2: anchored at the deep (last) block: k = num_blocks-1-i, Identity for even k.
  """
  if rule in ("tarflow", "starflow_r2l"):
    flip = [i % 2 == 1 for i in range(num_blocks)]
  elif rule == "starflow_l2r":
    flip = [i % 2 == 0 for i in range(num_blocks)]
  elif rule == "starflow2":
    flip = [(num_blocks - 1 - i) % 2 == 1 for i in range(num_blocks)]
  else:
    raise ValueError(f"permutation rule must be one of {RULES}, got {rule!r}")
  return tuple("flip" if f else "identity" for f in flip)
