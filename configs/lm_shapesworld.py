"""The STARFlow2 demo's "pretrained VLM": a small Qwen2.5-architecture language model pretrained on
chat-formatted ShapesWorld captions, questions, answers and interleaved documents with the toy tokenizer
(`model_kind: lm`, train/lm_task.py; 1.5 minutes on 2 CPU cores with launch.demo's CPU flag, twice that
without), a scene shown as its scene map inside a vision span: a word per cell of the flow's 4 x 4 token
grid (`SCENE_GRID`), as a vision tower's tokens would sit, so that the frozen model's states at image
positions are about what each cell holds.
With the argument "vision" it is a vision-language model instead: a vision tower reads each scene's
32-px image as 4 x 4 merged image tokens (a few minutes). STARFlow2 keeps the language model frozen
and drops any vision tower: the flow stream's adapter learns to feed it FAE latents (stage 2).

  python -m launch.train --config=configs/lm_shapesworld.py --workdir=/tmp/lm \
      --config.tokenizer=/tmp/tok/tokenizer.json

Held-out text CE (nats/token; perplexity = exp), next-token accuracy and exact answers are written to
WORKDIR/eval_*.json; the export WORKDIR/params_<step>/ is what a STARFlow2 config names as
config.vlm.checkpoint (configs/starflow2_shapesworld.py). Arguments (comma-separated): "smoke" (a few
steps, for tests), "vision".
"""
import ml_collections

from starflow2_jax.errors import UserError
from starflow2_jax.pretzel import toy_tokenizer
from starflow2_jax.train.defaults import base_config
from starflow2_jax.train.lm_task import lm_defaults
from starflow2_jax.train.pretzel_task import TOY_TOKENIZER

# no system turn in the demo's conversations, nor in its STARFlow2 sequences (configs/
# starflow2_shapesworld.py): "You are a helpful assistant." says nothing to a model trained from scratch
# and was 11 tokens of every example, 17% of a stage-1 row
SYSTEM_PROMPT = None
# a row packs up to PACK conversations (longest first, each that still fits). The conversations average
# 45 tokens (10% / 50% / 90% / max: 33 / 34 / 86 / 133, the longest an interleaved document of three
# scenes): rows of 4 in 224 tokens keep ~96% of them, 58 row tokens per conversation (one conversation
# per row of the longest: 133, and the step twice as long)
MAX_LEN = 224
PACK = 4
BATCH = 8  # rows: ~30 conversations a step
# with a vision tower a row holds one conversation (one image): no documents, the longest ~80 tokens
VISION_ROWS = {"max_len": 144, "pack": 1, "batch": 32}
# the scene map's side: the STARFlow2 flow's token grid (configs/starflow2_shapesworld.py: the FAE's 8 x 8
# latents in 2 x 2 patches), so that image position k of a Pretzel sequence is map word k
SCENE_GRID = 4
IMAGE_SIZE = 32  # the demo's images (configs/fae_shapesworld.py)
SHAPES_LAYOUT = "grid"  # the demo's ShapesWorld: shapes in the grid cells captions name (data/shapesworld.py)
OPTIONS = ("smoke", "vision")


def model() -> dict:
  """The Qwen2.5 language model fields (vlm.model.QwenConfig): tiny, its vocabulary the toy tokenizer's."""
  return dict(vocab_size=toy_tokenizer.DEFAULT_VOCAB, hidden_size=64, intermediate_size=192,
              num_layers=2, num_heads=4, num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e4,
              mrope_section=[2, 3, 3], tie_word_embeddings=False, max_position_embeddings=4096,
              dtype="float32", param_dtype="float32", remat="none", scan_layers=True, vision=None)


def vision() -> dict:
  """The vision tower's fields (vlm.vision.VisionConfig): patches of 4 px merged 2 x 2, full attention
  in every block."""
  return dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
              out_hidden_size=model()["hidden_size"], patch_size=4, temporal_patch_size=1,
              spatial_merge_size=2, window_size=IMAGE_SIZE, fullatt_block_indexes=[0, 1], in_channels=3,
              dtype="float32", param_dtype="float32")


def get_config(arg=None):
  options = [p for p in (arg or "").split(",") if p and p != "full"]
  if any(p not in OPTIONS for p in options):
    raise UserError(f"configs/lm_shapesworld.py argument {arg!r}: expected comma-separated options from "
                    f"{OPTIONS} (or 'full')")
  config = base_config()
  config.model_kind = "lm"
  config.tokenizer = TOY_TOKENIZER  # or a tokenizer.json (the demo trains its own)
  config.model = ml_collections.ConfigDict({**model(), "vision": vision() if "vision" in options else None})
  config.lm = lm_defaults()
  config.lm.scene_grid = SCENE_GRID
  if "vision" in options:  # one image per record: no interleaved documents
    config.lm.forms.document = 0.0
  config.data.name = "shapesworld"
  # without a vision tower the image is not used: small renders keep the loader cheap
  config.data.image_size = IMAGE_SIZE if "vision" in options else 8
  config.data.channels = 3
  rows = VISION_ROWS if "vision" in options else {"max_len": MAX_LEN, "pack": PACK, "batch": BATCH}
  config.data.max_len = rows["max_len"]
  config.data.pack = rows["pack"]
  config.data.system_prompt = SYSTEM_PROMPT
  config.data.shapes_layout = SHAPES_LAYOUT
  config.data.shapes_num_train = 20_000
  config.data.shapes_num_test = 256
  config.train.batch_size = rows["batch"]
  config.train.steps = 1000
  config.train.lr = 3e-3
  config.train.warmup = 50
  config.train.weight_decay = 0.0
  config.checkpoint.every = 500
  config.checkpoint.keep = 1
  config.log.every = 50
  config.log.num_samples = 0
  config.log.eval_examples = config.data.shapes_num_test // rows["pack"]  # rows: every test record
  if "smoke" in options:
    config.train.steps = 4
    config.train.warmup = 1
    config.train.batch_size = 8
    config.log.every = 2
    config.log.eval_examples = 16 // rows["pack"]
  return config
