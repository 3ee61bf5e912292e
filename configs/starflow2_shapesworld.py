"""The STARFlow2 of the demo (`python -m launch.demo`): ShapesWorld at 32 px, the toy FAE's 8 x 8 x 8
latents (configs/fae_shapesworld.py), the demo's pretrained language model as the frozen VLM
(configs/lm_shapesworld.py), a flow stream small enough for 2 CPU cores, and (colour, kind)
combinations kept out of the training split (`EXCLUDED`) to test compositional generalisation.

  python -m launch.train --config=configs/starflow2_shapesworld.py:stage=1 --workdir=DIR/stage1 \
      --config.tokenizer=DIR/tokenizer --config.vlm.checkpoint=DIR/lm --config.fae.checkpoint=DIR/fae
  python -m launch.train --config=configs/starflow2_shapesworld.py:stage=2 --workdir=DIR/stage2 \
      --config.tokenizer=DIR/tokenizer --config.vlm.checkpoint=DIR/lm --config.fae.checkpoint=DIR/fae \
      --config.init_from=DIR/stage1
  (stage=3 likewise with --config.init_from=DIR/stage2)

The argument is "stage=N" or "stage=N,smoke" (a few steps of a flow with one shallow block and one
deep layer, for tests). Each stage's data mixture is what its loss reads: stage 1 (L_NF) text-to-image
and interleaved documents, stage 2 (L_NTP through the adapter) understanding, stage 3 all of them.
Held-out latent NLL (nats/dim) and text CE are written to WORKDIR/eval_*.json.
"""
import ml_collections

from configs import fae_shapesworld, lm_shapesworld
from starflow2_jax.errors import UserError
from starflow2_jax.pretzel import examples, stages
from starflow2_jax.train.defaults import base_config
from starflow2_jax.train.pretzel_task import TOY_TOKENIZER, loss_defaults
from starflow2_jax.vlm.config import experiment_config

EXCLUDED = (("red", "circle"), ("blue", "triangle"))  # never in a training scene; held out they are
LATENT_PATCH = 2  # the FAE's 8 x 8 latents as 4 x 4 = 16 flow tokens of 2 x 2 x 8 = 32 channels
# the frozen language model read each scene as a map of this token grid
assert fae_shapesworld.IMAGE_SIZE // fae_shapesworld.PATCH // LATENT_PATCH == lm_shapesworld.SCENE_GRID
MAX_IMAGES = 3  # an interleaved document of a three-shape scene shows three images
# a row: two text-to-image or understanding examples (33-54 tokens each without a system turn:
# templates, text naming grid cells, an image span of 16 latents + 2), or one interleaved document of up
# to three image spans (the longest, 133 tokens, have their text cut); 1.6 examples a stage-1 row, as
# in 128-token rows with the system turn
MAX_LEN = 112
PACK = 2
MIXTURES = {
    1: {"text_to_image": 3.0, "understanding": 0.0, "editing": 0.0, "interleaved": 1.0},
    2: {"text_to_image": 0.0, "understanding": 1.0, "editing": 0.0, "interleaved": 0.0},
    3: {"text_to_image": 2.0, "understanding": 2.0, "editing": 0.0, "interleaved": 1.0},
}
# stage 2 trains the small adapter alone (cheap steps: no deep stream), at a high learning rate (adapter
# 512 wide, lr 1e-2: QA kind 57%; 48% at 128 and 3e-3). More steps did not help reliably (3,000 steps:
# kind 60% on one stage-1 run, 43% on another; ~40 kind questions). Stage 1 runs at lr 3e-3: held-out
# latent NLL 0.462 nats/dim after 800 steps (0.517 at 1e-3; 8-channel FAE, grid layout); with the deep
# stream's image position table 0.441, and 0.373 after 2,400 steps (single-object prompt following,
# stage 1 alone: colour 45% -> 87%, position 3% -> 32%, all-correct 3% -> 26%).
# Stage 3 keeps what stage 1 learnt only when the frozen language model already knows the text of every
# stage-3 example: with a language model that never read the interleaved documents, stage 3's text CE
# was 3-4 nats/token and its gradient undid stage 1 at any lr (256 single-object captions, all-correct
# 37% -> 20% at lr 3e-4, 24% at 3e-5); with the documents in its pretraining (lm.forms.document) 37% ->
# 39% (held-out NLL 0.375 -> 0.369, text CE 0.35).
# Measured with the scene-map language model (configs/lm_shapesworld.py): stage 1 at 2,400 / 3,000
# steps: held-out NLL 0.370 / 0.358, single-object all-correct 54% / 65% (256 captions); stage 2 at
# 1,000 / 1,500 / 3,000 steps: QA kind 42% / 51% / 53%. The whole demo (no system turn), stage 1 at
# 3,000 / 3,500 steps: stage-3 NLL 0.354 / 0.348, single-object all-correct 58% / 66% (256 captions),
# 17.1 / 19.6 min on the 2-core machine where it ran slowest.
STEPS = {1: 3500, 2: 1500, 3: 400}
LR = {1: 3e-3, 2: 1e-2, 3: 3e-4}
GUIDANCE = 2.0  # classifier-free guidance of generated images (the null prompt: caption dropout 0.1)
# generation: a document of three images (3 x 18 positions) with its text after a prompt of ~40 tokens
SAMPLE_CACHE_LEN = 192
SAMPLE_MAX_NEW_TOKENS = 128
SMOKE_STEPS = 3
SMOKE_SHALLOW_BLOCKS = 1
SMOKE_DEEP_LAYERS = 1


def flow_model() -> ml_collections.ConfigDict:
  """The flow stream (pretzel.config.PretzelConfig fields). `image_pos_table` (not in the paper) gives
  the deep stream each latent's grid cell: without it, samples of this small stream after 800 steps are
  scattered fragments (single-object colour 23%, position 3%); with it, whole shapes (colour 45%)."""
  return ml_collections.ConfigDict({
      "width": 96, "head_dim": 32, "mlp_ratio": 4, "deep_layers": 3, "shallow_blocks": 2,
      "shallow_layers": 1, "latent_patch": LATENT_PATCH, "noise_std": 0.3, "deep_rope": "mrope",
      "deep_rope_sections": [4, 6, 6], "adapter_hidden": 512, "skip_taps": (),
      "stage1_vlm_prefix": 0, "image_pos_table": True, "dtype": "float32", "param_dtype": "float32",
      "attention_impl": "auto", "remat": "none"})


def _parse(arg):
  parts = [p for p in (arg or "").split(",") if p]
  smoke = "smoke" in parts
  rest = [p for p in parts if p != "smoke"]
  if len(rest) > 1:
    raise UserError(f"config argument {arg!r}: expected 'stage=N' or 'stage=N,smoke', e.g. "
                    "--config=configs/starflow2_shapesworld.py:stage=2")
  return stages.stage_from_arg(rest[0] if rest else None), smoke


def get_config(arg=None):
  stage, smoke = _parse(arg)
  config = base_config()
  config.model_kind = "starflow2"
  config.tokenizer = TOY_TOKENIZER  # the demo passes its own tokenizer.json
  config.vlm = ml_collections.ConfigDict({
      "checkpoint": "",  # the lm run's workdir export (configs/lm_shapesworld.py); "": random
      "image_positions": "mrope",
      "model": experiment_config(lm_shapesworld.model(), None).model})
  config.fae = fae_shapesworld.fae_config()
  config.fae.checkpoint = ""  # the FAE run's export (configs/fae_shapesworld.py); "": random
  config.model = flow_model()
  config.loss = loss_defaults()
  config.data = examples.default_data_config()
  config.data.image_size = fae_shapesworld.IMAGE_SIZE
  config.data.max_len = MAX_LEN
  config.data.system_prompt = lm_shapesworld.SYSTEM_PROMPT  # the language model's chat template
  config.data.max_images = MAX_IMAGES
  config.data.pack = PACK
  config.data.mixture = dict(MIXTURES[stage])
  config.data.shapes_num_train = 20_000
  config.data.shapes_num_test = 128
  config.data.shapes_exclude = [list(e) for e in EXCLUDED]
  config.data.shapes_layout = lm_shapesworld.SHAPES_LAYOUT
  config.train.batch_size = 16
  config.train.steps = STEPS[stage]
  config.train.lr = LR[stage]
  config.train.warmup = 50
  config.train.weight_decay = 0.0
  config.checkpoint.every = 200
  config.checkpoint.keep = 1
  config.log.every = 50
  config.log.num_samples = 0
  # stage 2's data has no flow-loss image (held-out latent NLL undefined): its loss is its metric
  config.log.eval_examples = 0 if stage == 2 else 64
  config.sample.guidance = GUIDANCE
  config.sample.cache_len = SAMPLE_CACHE_LEN
  config.sample.max_new_tokens = SAMPLE_MAX_NEW_TOKENS
  if smoke:
    config.train.steps = SMOKE_STEPS
    config.train.warmup = 1
    config.train.batch_size = 8
    # one shallow block and one deep layer: fewer programs to compile in every stage and in generation
    config.model.shallow_blocks = SMOKE_SHALLOW_BLOCKS
    config.model.deep_layers = SMOKE_DEEP_LAYERS
    config.log.every = 1
    config.log.eval_examples = 8 if stage == 3 else 0  # the summary reads stage 3's
  return stages.apply_stage(config, stage)
