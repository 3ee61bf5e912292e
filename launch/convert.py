"""Import published weights into a starflow2_jax parameter checkpoint (params + config).

  python -m launch.convert --from=hf_qwen2_5_vl --checkpoint=/data/Qwen2.5-VL-7B-Instruct \
      --out=/ckpt/qwen2_5_vl_7b [--config=configs/qwen2_5_vl_7b.py] [--dtype=bfloat16]

--config (optional) names the expected model: a mismatch with the source's own config is an error.
"""
from absl import app, flags
from ml_collections import config_flags

from starflow2_jax.convert import hf_qwen2_5_vl

# --from value -> library function (checkpoint, out, *, dtype, expected) -> written directory.
CONVERTERS = {
    "hf_qwen2_5_vl": hf_qwen2_5_vl.convert,
}

flags.DEFINE_enum("from", None, sorted(CONVERTERS), "Source format of --checkpoint.")
flags.DEFINE_string("checkpoint", None, "Source checkpoint (file or directory).")
flags.DEFINE_string("out", None, "New directory to write the converted checkpoint to.")
flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "Parameter dtype (default: the source's).")
config_flags.DEFINE_config_file("config", None, "Expected model config (optional check).")
flags.mark_flags_as_required(["from", "checkpoint", "out"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  out = CONVERTERS[FLAGS["from"].value](FLAGS.checkpoint, FLAGS.out, dtype=FLAGS.dtype,
                                        expected=FLAGS.config)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
