"""launch.encode: DINOv2 features from --pixels (a deterministic function of them) and from --images,
FAE latents and reconstructions, never overwriting, and errors that name expected and found."""
import os
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from starflow2_jax import encode as encode_cli  # noqa: E402
from starflow2_jax import ckpt  # noqa: E402
from starflow2_jax.errors import UserError  # noqa: E402
from starflow2_jax.fae import FAE, dinov2 as dinov2_lib  # noqa: E402
from test_fae import random_params, tiny_fae_config  # noqa: E402

DINO = dinov2_lib.Dinov2Config(hidden_size=16, num_layers=1, num_heads=2, patch_size=4, image_size=16,
                               mlp="swiglu", layerscale_value=0.3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("encode")
  rng = np.random.default_rng(0)
  dino_params = jax.tree.map(lambda x: rng.normal(0.0, 0.2, x.shape).astype(np.float32),
                             nn.unbox(dinov2_lib.abstract_params(DINO)))
  dino_dir = ckpt.save_params(str(root / "dino"), dino_params, ml_collections.ConfigDict(
      {"model_kind": "dinov2", "model": DINO.to_dict()}))
  fae_config = tiny_fae_config()
  fae = FAE(fae_config)
  params = random_params(fae, seed=1)
  params["latent_stats"]["std"] = params["latent_stats"]["std"] * 0.5
  fae_dir = ckpt.save_params(str(root / "fae"), {"params": params}, ml_collections.ConfigDict(
      {"model_kind": "fae", "fae": fae_config}))
  images = root / "images"
  os.makedirs(images)
  for i, size in enumerate([(16, 16), (20, 24), (16, 16)]):  # one non-square: centre-cropped
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"{i}.png")
  return {"dino": dino_dir, "fae": fae_dir, "images": str(images), "root": root,
          "dino_params": dino_params, "fae_params": params, "fae_model": fae}


def test_dinov2_features_from_pixels_and_images(checkpoints, tmp_path):
  pixels = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(np.float32)
  np.save(tmp_path / "x.npy", pixels)
  (path,) = encode_cli.encode(checkpoints["dino"], str(tmp_path / "a"), pixels=str(tmp_path / "x.npy"),
                              batch_size=2)
  feats = np.load(path)
  assert feats.dtype == np.float32 and feats.shape == (3, DINO.num_tokens, 16)
  want = dinov2_lib.features(dinov2_lib.Dinov2(DINO), checkpoints["dino_params"], pixels)
  np.testing.assert_allclose(feats, np.asarray(want), rtol=1e-5, atol=1e-5)
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    encode_cli.encode(checkpoints["dino"], str(tmp_path / "a"), pixels=str(tmp_path / "x.npy"))
  (path,) = encode_cli.encode(checkpoints["dino"], str(tmp_path / "b"), images=checkpoints["images"])
  images = encode_cli.read_images(encode_cli.image_paths(checkpoints["images"]), 16, 16)
  want = dinov2_lib.features(dinov2_lib.Dinov2(DINO), checkpoints["dino_params"],
                             dinov2_lib.preprocess(images, DINO))
  np.testing.assert_allclose(np.load(path), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_fae_latents_and_reconstructions(checkpoints, tmp_path):
  latents_path, png = encode_cli.encode(checkpoints["fae"], str(tmp_path / "f"),
                                        images=checkpoints["images"])
  latents = np.load(latents_path)
  fae = checkpoints["fae_model"]
  assert latents.shape == (3, *fae.grid, fae.channels)
  images = encode_cli.read_images(encode_cli.image_paths(checkpoints["images"]), 16, 16)
  np.testing.assert_allclose(latents, np.asarray(fae.encode(checkpoints["fae_params"], images)),
                             rtol=1e-5, atol=1e-5)
  assert Image.open(png).size[0] > 2 * 16


def test_errors(checkpoints, tmp_path):
  np.save(tmp_path / "bad.npy", np.zeros((2, 12, 16, 3), np.float32))
  with pytest.raises(UserError, match=r"expected float32 \[N, 16, 16, 3\].*found float32 \[2, 12, 16, 3\]"):
    encode_cli.encode(checkpoints["dino"], str(tmp_path / "o1"), pixels=str(tmp_path / "bad.npy"))
  with pytest.raises(UserError, match="exactly one of --images"):
    encode_cli.encode(checkpoints["fae"], str(tmp_path / "o2"))
  with pytest.raises(FileNotFoundError, match="no such file"):
    encode_cli.encode(checkpoints["fae"], str(tmp_path / "o3"), images=str(tmp_path / "none.png"))
  other = ckpt.save_params(str(tmp_path / "flow"), {"w": np.zeros(2)},
                           ml_collections.ConfigDict({"model_kind": "flow"}))
  with pytest.raises(UserError, match="model_kind 'flow' is none of a DINOv2"):
    encode_cli.encode(other, str(tmp_path / "o4"), images=checkpoints["images"])
