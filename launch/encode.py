"""Encode images with a DINOv2, an FAE or an FID Inception checkpoint (`starflow2_jax.encode`).

  python -m launch.encode --checkpoint=DIR (--images=FILES_OR_DIR | --pixels=X.npy) --out=DIR

What each kind of checkpoint writes, and how --images and --pixels are read: see
starflow2_jax/encode.py. Existing outputs are never overwritten.
"""
from __future__ import annotations

from absl import flags

from starflow2_jax import entry
from starflow2_jax.encode import encode
from starflow2_jax.errors import UserError

flags.DEFINE_string("checkpoint", None, "A converted DINOv2 or Inception, or an exported FAE checkpoint.")
flags.DEFINE_string("images", None, "Image files (comma-separated) or a directory of images.")
flags.DEFINE_string("pixels", None, ".npy of float32 [N, H, W, 3] model-ready pixels.")
flags.DEFINE_string("out", None, "Directory to write features.npy or latents.npy + reconstructions.png.")
flags.DEFINE_integer("batch_size", 16, "Images per forward pass.")
flags.mark_flags_as_required(["checkpoint", "out"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  for path in encode(FLAGS.checkpoint, FLAGS.out, FLAGS.images, FLAGS.pixels, FLAGS.batch_size):
    print(f"wrote {path}")


if __name__ == "__main__":
  entry.run(main)
