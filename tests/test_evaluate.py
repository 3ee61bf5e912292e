"""launch.evaluate: bits/dim exactly as TarFlow's sum form (uniform dequantisation, log 128, no labels),
the same on 1 and 8 devices; latent NLL in nats/dim; FID of a folder against itself is 0 and of flow
samples; the ShapesWorld proxies on a folder and an answers file; the command line writes JSON without
overwriting; bad input gives clear errors."""
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flow_utils import randomize_heads
from PIL import Image

from configs import tarflow_digits
from starflow2_jax import ckpt, flows, parallel
from starflow2_jax.data.digits import DigitsSource
from starflow2_jax.data.shapesworld import ShapesWorldSource
from starflow2_jax.errors import UserError
from starflow2_jax.eval import frechet, inception, metrics
from starflow2_jax.flows import cli as flow_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = 8  # held-out digits evaluated (one per device on the 8-device mesh)


@pytest.fixture(scope="module")
def flow_checkpoint(tmp_path_factory):
  config = tarflow_digits.get_config()
  config.model.width, config.model.head_dim, config.model.layers_per_block = 32, 16, [1, 1]
  config.model.dequant = "uniform"
  model = flows.FlowModel(flows.FlowConfig.from_config(config.model))
  cfg = model.cfg
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, cfg.num_tokens, cfg.token_dim)),
                                  jnp.zeros((1,), jnp.int32))
  variables = randomize_heads(jax.tree.map(np.asarray, nn.unbox(variables)), 0.05)
  return ckpt.save_params(str(tmp_path_factory.mktemp("flow") / "params_0000001"), variables, config)


def _sum_form_bpd(checkpoint, seed=0):
  """apple/ml-tarflow's sum form on the same dequantised data, float64 NumPy."""
  model, params, config = flow_cli.load_flow(checkpoint)
  cfg = model.cfg
  source = DigitsSource("test", config.data.image_size, config.data.channels)
  x = np.stack([source[i]["image"] for i in range(NUM)]).astype(np.float32) / 127.5 - 1.0
  rng = jax.random.key(seed)
  keys = [jax.random.fold_in(jax.random.fold_in(rng, p), 0) for p in range(NUM)]
  x = np.stack([np.asarray(flows.dequantize(k, jnp.asarray(xi), "uniform", 0.0)) for k, xi in zip(keys, x)])
  out = model.apply({"params": params}, flows.patchify(jnp.asarray(x), cfg.patch_size, cfg.layout),
                    jnp.full((NUM,), -1, jnp.int32))
  z, logdets = np.asarray(out.z, np.float64), np.asarray(out.logdets, np.float64)
  d_tot = x[0].size
  nll = (0.5 * np.sum(z ** 2, axis=(1, 2)) + 0.5 * d_tot * math.log(2 * math.pi)
         + d_tot * math.log(128)) / d_tot - logdets
  return nll / math.log(2)


def test_bpd_is_the_reference_definition_on_the_mesh(flow_checkpoint):
  """8 devices, one example each, against the unsharded float64 sum form."""
  want = _sum_form_bpd(flow_checkpoint)
  eight = metrics.bits_per_dim(flow_checkpoint, num=NUM, batch_size=8, progress=False)
  assert eight["num"] == NUM and eight["split"] == "test" and eight["labels"] == "none"
  assert eight["bpd"] == pytest.approx(want.mean(), abs=1e-5)
  assert eight["bpd_sem"] == pytest.approx(want.std(ddof=1) / math.sqrt(NUM), rel=1e-3)


def test_latent_nll_is_nats_and_never_bits(flow_checkpoint, one_device):
  model, params, _ = flow_cli.load_flow(flow_checkpoint)
  cfg = model.cfg
  lat = np.random.default_rng(0).normal(size=(6, *cfg.image_shape)).astype(np.float32)
  got = metrics.latent_nll(flow_checkpoint, lat, batch_size=8, mesh=one_device, progress=False)
  out = model.apply({"params": params}, flows.patchify(jnp.asarray(lat), cfg.patch_size, cfg.layout),
                    jnp.full((6,), -1, jnp.int32))
  want = -np.asarray(flows.log_prob(out)) / (cfg.num_tokens * cfg.token_dim)  # nats/dim, no log 128
  assert got["latent_nll_nats_per_dim"] == pytest.approx(float(want.mean()), abs=1e-5)
  assert "bpd" not in got
  with pytest.raises(UserError, match=r"--latents: expected \[N, 16, 16, 1\]"):
    metrics.latent_nll(flow_checkpoint, lat[:, :8], mesh=one_device, progress=False)


@pytest.fixture(scope="module")
def one_device():
  return parallel.make_mesh({"shape": {"data": 1, "fsdp": 1, "tensor": 1}}, jax.devices()[:1])


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
  """A random-weight FID Inception checkpoint (the network, not the published weights): He-scaled
  convolutions and unit BatchNorms keep the features O(1)."""
  rng = np.random.default_rng(0)

  def leaf(path, spec):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, np.sqrt(2.0 / np.prod(spec.shape[:3])), spec.shape).astype(np.float32)
    return (np.ones if name in ("scale", "var") else np.zeros)(spec.shape, np.float32)

  variables = jax.tree_util.tree_map_with_path(leaf, inception.abstract_variables())
  return ckpt.save_params(str(tmp_path_factory.mktemp("inc") / "inception"), variables,
                          inception.experiment_config())


def _write_pngs(folder, images):
  os.makedirs(folder, exist_ok=True)
  names = []
  for i, im in enumerate(images):
    names.append(f"{i:04d}.png")
    Image.fromarray(im).save(os.path.join(folder, names[-1]))
  return names


@pytest.mark.slow  # two 299 x 299 Inception passes of 2 images and a flow sampler: ~20 s on 2 cores
def test_fid_of_a_folder_against_itself_is_zero_and_of_flow_samples(tmp_path, inception_dir,
                                                                     flow_checkpoint, one_device):
  real = np.stack([np.repeat(DigitsSource("test", 16, 1)[i]["image"], 3, -1) for i in range(2)])
  _write_pngs(tmp_path / "real", real)
  feats = metrics.folder_features("inception", str(tmp_path / "real"), inception_dir, batch_size=2,
                                  mesh=one_device, progress=False)
  assert feats.shape == (2, inception.FEATURE_DIM)
  mu, sigma = frechet.statistics(feats)
  stats = frechet.save_statistics(str(tmp_path / "ref.npz"), mu, sigma)
  same = metrics.fid(ref_stats=stats, inception_dir=inception_dir, samples=str(tmp_path / "real"),
                     batch_size=2, mesh=one_device, progress=False)
  assert abs(same["fid"]) < 1e-7 * np.trace(sigma)
  drawn = metrics.fid(ref_stats=stats, inception_dir=inception_dir, checkpoint=flow_checkpoint,
                      num_samples=2, batch_size=2, mesh=one_device, progress=False)
  assert drawn["num"] == 2 and drawn["fid"] > 1e-3 * np.trace(sigma)
  with pytest.raises(UserError, match="pt_inception-2015-12-05-6726825d.pth --out=DIR, then pass "):
    metrics.fid(ref_stats=stats, inception_dir=None, samples=str(tmp_path / "real"))
  with pytest.raises(UserError, match="fid needs reference statistics: pass --ref_stats"):
    metrics.fid(ref_stats=None, inception_dir=inception_dir, samples=str(tmp_path / "real"))


def _tiny_dinov2(path, input_size):
  """A tiny random DINOv2 (the FAE package's port) saved as a converted checkpoint."""
  from starflow2_jax.fae import dinov2
  cfg = dinov2.Dinov2Config(hidden_size=32, num_layers=1, num_heads=2, patch_size=14, image_size=input_size)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32),
                        nn.unbox(dinov2.abstract_params(cfg)))
  return ckpt.save_params(str(path), params, ml_collections.ConfigDict(
      {"model_kind": dinov2.MODEL_KIND, "model": cfg.to_dict()}))


def test_fd_dinov2_of_a_folder_against_itself_is_zero(tmp_path, one_device):
  path = _tiny_dinov2(tmp_path / "dinov2", metrics.DGM_EVAL_SIZE)
  images = np.stack([ShapesWorldSource("test", 24, 4, 0)[i]["image"] for i in range(4)])
  _write_pngs(tmp_path / "real", images)
  feats = metrics.folder_features("dinov2", str(tmp_path / "real"), path, batch_size=4, mesh=one_device,
                                  progress=False)
  assert feats.shape == (4, 32)
  stats = frechet.save_statistics(str(tmp_path / "d.npz"), *frechet.statistics(feats))
  same = metrics.fd_dinov2(ref_stats=stats, dinov2_dir=path, samples=str(tmp_path / "real"), batch_size=4,
                           mesh=one_device, progress=False)
  assert abs(same["fd_dinov2"]) < 1e-7 * np.trace(np.cov(feats, rowvar=False))
  with pytest.raises(UserError, match="--from=hf_dinov2 .*--dinov2=DIR"):
    metrics.fd_dinov2(ref_stats=stats, dinov2_dir=None, samples=str(tmp_path / "real"))
  other = _tiny_dinov2(tmp_path / "dinov2_518", 28)
  with pytest.raises(UserError, match=r"input_size \[28, 28\]; convert it again .*--input_size=224"):
    metrics.folder_features("dinov2", str(tmp_path / "real"), other, mesh=one_device, progress=False)


def test_fd_dinov2_preprocessing_is_dgm_evals():
  """dgm-eval's DINOv2 transform (Resize((224, 224), BICUBIC) of the PIL image, ToTensor, ImageNet
  Normalize) equals dgm_eval_resize + the DINOv2 port's normalisation, up- and downscaling."""
  tf = pytest.importorskip("torchvision.transforms")
  from starflow2_jax.fae import dinov2
  cfg = dinov2.Dinov2Config(hidden_size=32, num_layers=1, num_heads=2, patch_size=14,
                            image_size=metrics.DGM_EVAL_SIZE)
  reference = tf.Compose([tf.Resize((224, 224), tf.InterpolationMode.BICUBIC), tf.ToTensor(),
                          tf.Normalize(dinov2.IMAGENET_MEAN, dinov2.IMAGENET_STD)])
  rng = np.random.default_rng(0)
  for h, w in ((37, 53), (300, 281)):
    images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    want = np.stack([reference(Image.fromarray(im)).numpy().transpose(1, 2, 0) for im in images])
    got = np.asarray(dinov2.preprocess(metrics.dgm_eval_resize(images), cfg))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_shapes_and_qa_proxies_and_bad_files(tmp_path):
  source = ShapesWorldSource("test", image_size=32, num_records=6, seed=0)
  scenes = [source.scene(i) for i in range(6)]
  names = _write_pngs(tmp_path / "t2i", [source.render(s) for s in scenes])
  captions = [source.caption(s) for s in scenes]
  captions[0] = captions[1] if captions[1] != captions[0] else "a small white cross"  # one miss
  lines = [json.dumps({"file": f, "caption": c, "excluded_combination": i == 5})
           for i, (f, c) in enumerate(zip(names, captions))]
  (tmp_path / "t2i" / "prompts.jsonl").write_text("\n".join(lines) + "\n")
  res = metrics.shapes_prompt_following(str(tmp_path / "t2i"), progress=False)
  assert res["overall"]["all"] == pytest.approx(5 / 6) and res["excluded_combination"]["all"] == 1.0
  (tmp_path / "t2i" / "prompts.jsonl").write_text(lines[0] + "\n\n" + lines[1] + "\n")
  with pytest.raises(UserError, match=r"prompts.jsonl line 2 is empty"):
    metrics.shapes_prompt_following(str(tmp_path / "t2i"), progress=False)
  qa = tmp_path / "qa.jsonl"
  qa.write_text(json.dumps({"question": "what shape is red?", "answer": "circle", "prediction": "circle"})
                + "\n" + json.dumps({"question": "how many shapes are there?", "answer": "two"}) + "\n")
  with pytest.raises(UserError, match=r"qa.jsonl line 2: missing \['prediction'\]"):
    metrics.shapes_qa(str(qa))


def test_command_line_writes_json_never_overwriting_and_clear_errors(flow_checkpoint, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one device: one compile
  workdir = os.path.dirname(flow_checkpoint)  # a training workdir: its newest params_* is evaluated
  r = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--checkpoint={workdir}", "--metric=bpd",
                      "--num_examples=4", "--batch_size=4"], cwd=REPO, env=env, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr
  with open(os.path.join(flow_checkpoint, "evaluate_bpd.json")) as f:
    assert json.load(f)["num"] == 4
  assert os.path.isdir(os.path.join(flow_checkpoint, "tensorboard_eval"))
  path = metrics.write_results(flow_checkpoint, "evaluate_bpd", {"bpd": 1.0})
  assert path.endswith("evaluate_bpd.1.json")
  with pytest.raises(FileNotFoundError, match="missing not found: pass --checkpoint=DIR"):
    metrics.resolve_checkpoint(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="reference statistics .*nothing.npz not found"):
    metrics.fid(ref_stats=str(tmp_path / "nothing.npz"), inception_dir=None, samples=str(tmp_path))
