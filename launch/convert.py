"""Import published weights into a starflow2_jax parameter checkpoint (params + config).

  python -m launch.convert --from=hf_qwen2_5_vl --checkpoint=/data/Qwen2.5-VL-7B-Instruct \
      --out=/ckpt/qwen2_5_vl_7b [--config=configs/qwen2_5_vl_7b.py] [--dtype=bfloat16]
  python -m launch.convert --from=tarflow_torch --checkpoint=afhq_model_8_768_8_8_0.07.pth \
      --out=/ckpt/tarflow_afhq256 [--image_size=256] [--patch_size=8] [--config=configs/tarflow_afhq256.py]
  python -m launch.convert --from=hf_dinov2 --checkpoint=/data/dinov2-giant --out=/ckpt/dinov2_g14 \
      [--input_size=224] [--config=configs/fae_dinov2_g14.py]
  python -m launch.convert --from=pytorch_fid_inception \
      --checkpoint=pt_inception-2015-12-05-6726825d.pth --out=/ckpt/inception_fid

--config (optional) names the expected model: a mismatch with the source's own shapes is an error.
"""
from absl import flags
from ml_collections import config_flags

from starflow2_jax import entry
from starflow2_jax.convert import hf_dinov2, hf_qwen2_5_vl, pytorch_fid_inception, tarflow_torch
from starflow2_jax.errors import UserError

flags.DEFINE_enum("from", None, ["hf_qwen2_5_vl", "tarflow_torch", "hf_dinov2", "pytorch_fid_inception"],
                  "Source format of --checkpoint.")
flags.DEFINE_string("checkpoint", None, "Source checkpoint (file or directory).")
flags.DEFINE_string("out", None, "New directory to write the converted checkpoint to.")
flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"],
                  "hf_qwen2_5_vl, hf_dinov2: parameter dtype (default: the source's).")
flags.DEFINE_integer("image_size", 256, "tarflow_torch: image side (shapes cannot tell it; AFHQ-256).")
flags.DEFINE_integer("patch_size", 8, "tarflow_torch: patch size (AFHQ-256 release: 8).")
flags.DEFINE_integer("input_size", None, "hf_dinov2: square input side in pixels the position table is "
                     "resized for (default: --config's fae.dinov2.input_size, else the native size).")
config_flags.DEFINE_config_file("config", None, "Expected model config (optional check).")
flags.mark_flags_as_required(["from", "checkpoint", "out"])
FLAGS = flags.FLAGS

# --from value -> library call with the flags it needs; returns the written directory.
CONVERTERS = {
    "hf_qwen2_5_vl": lambda: hf_qwen2_5_vl.convert(
        FLAGS.checkpoint, FLAGS.out, dtype=FLAGS.dtype, expected=FLAGS.config),
    "tarflow_torch": lambda: tarflow_torch.convert(
        FLAGS.checkpoint, FLAGS.out, image_size=FLAGS.image_size, patch_size=FLAGS.patch_size,
        expected=FLAGS.config),
    "hf_dinov2": lambda: hf_dinov2.convert(
        FLAGS.checkpoint, FLAGS.out, dtype=FLAGS.dtype, expected=FLAGS.config,
        input_size=None if FLAGS.input_size is None else (FLAGS.input_size, FLAGS.input_size)),
    "pytorch_fid_inception": lambda: pytorch_fid_inception.convert(FLAGS.checkpoint, FLAGS.out),
}


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  print(f"wrote {CONVERTERS[FLAGS['from'].value]()}")


if __name__ == "__main__":
  entry.run(main)
