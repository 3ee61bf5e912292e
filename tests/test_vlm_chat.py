"""The command-line chat: greedy generation through `launch.convert` + `launch.sample` equals
transformers' `generate` token for token (text-only and with an image); preprocessing parity; errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

import hf_qwen  # noqa: E402
from starflow2_jax.vlm import chat  # noqa: E402
from starflow2_jax.vlm.vision import VisionConfig, preprocess_image  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 10


def _run(*args):
  # one CPU device (no fake ones: the command line as a user runs it), compiled at XLA's fast level
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  res = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  return res.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("chat")
  hf = hf_qwen.build("gqa_untied", seed=8, embed_std=0.3)
  hf.save_pretrained(root / "hf")
  _run("launch.convert", "--from=hf_qwen2_5_vl", f"--checkpoint={root / 'hf'}", f"--out={root / 'ck'}",
       "--config=configs/qwen2_5_vl_tiny.py")
  tok = hf_qwen.tiny_tokenizer_json(str(root / "tokenizer.json"))
  image = root / "image.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (61, 93, 3), np.uint8)).save(image)
  return hf, root, tok, image


def _hf_generate(hf, ids, image=None):
  kw = {}
  ids = torch.as_tensor([ids])
  if image is not None:
    cfg = hf.config.vision_config
    vcfg = VisionConfig(depth=cfg.depth, hidden_size=cfg.hidden_size, intermediate_size=64,
                        num_heads=cfg.num_heads, out_hidden_size=cfg.out_hidden_size)
    pix, grid = preprocess_image(Image.open(image), vcfg)
    kw = dict(pixel_values=torch.as_tensor(pix), image_grid_thw=torch.as_tensor([grid]),
              mm_token_type_ids=(ids == hf.config.image_token_id).int())
  with torch.no_grad():
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                      do_sample=False, eos_token_id=[0, 2], pad_token_id=0, **kw)
  return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("with_image", [False, True])
def test_cli_greedy_equals_transformers_generate(setup, with_image):
  hf, root, tok, image = setup
  out = root / f"out_{with_image}"
  args = ["launch.sample", f"--checkpoint={root / 'ck'}", f"--tokenizer={tok}",
          "--prompt=Describe this.", f"--max_new_tokens={NEW}", "--temperature=0", f"--out={out}"]
  if with_image:
    args.append(f"--image={image}")
  stdout = _run(*args)
  with open(out / "generation.json") as f:
    record = json.load(f)
  ids = record["prompt_ids"]
  assert ids[:2] == [1, ord("s")]  # <|im_start|>system
  assert (250 in ids) == with_image  # <|image_pad|>: a 61x93 image becomes 2x3 tokens
  assert ids.count(250) == (6 if with_image else 0)
  assert len(set(record["generated_ids"])) >= 4  # a meaningful comparison, not one repeated token
  assert record["generated_ids"] == _hf_generate(hf, ids, image if with_image else None)
  assert record["text"] in stdout


def test_sharded_chat_equals_transformers_generate(setup):
  """The library chat on a (fsdp=2, tensor=4) mesh of the 8 test devices, with an image."""
  hf, root, tok, image = setup
  record = chat.chat(str(root / "ck"), tok, "Sharded?", images=[str(image)], max_new_tokens=NEW,
                     mesh_shape=(2, 4))
  assert record["generated_ids"] == _hf_generate(hf, record["prompt_ids"], image)


def test_preprocessing_matches_hf_image_processor(setup):
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  _, _, _, image = setup
  cfg = VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
  ours, grid = preprocess_image(Image.open(image), cfg)
  ref = Qwen2VLImageProcessorPil()(images=[Image.open(image)], return_tensors="np")
  assert [list(grid)] == ref["image_grid_thw"].tolist()
  np.testing.assert_allclose(ours, ref["pixel_values"], rtol=0, atol=1e-6)


def test_over_long_prompt_and_missing_image(setup):
  _, root, tok, _ = setup
  with pytest.raises(ValueError, match=r"prompt of \d+ tokens \+ max_new_tokens 10 = \d+ exceeds the "
                                       "maximum length 40"):
    chat.chat(str(root / "ck"), tok, "x" * 30, max_new_tokens=10, max_len=40)
  with pytest.raises(FileNotFoundError, match="no such file"):
    chat.chat(str(root / "ck"), tok, "hi", images=[str(root / "nope.png")])
