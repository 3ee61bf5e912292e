"""FID InceptionV3: the Flax network and importer against pytorch-fid's own `InceptionV3` (FID blocks)
built with the same random weights (no download): the 2048-d pool features agree to 1e-4; the resize
is torch's bilinear; a weights file of another network is refused with a clear message."""
import jax
import numpy as np
import pytest

from starflow2_jax.convert import pytorch_fid_inception as converter
from starflow2_jax.errors import UserError
from starflow2_jax.eval import inception

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")  # importable next to a CPU torch: tests/torchvision_cpu.py
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")


def random_state_dict(seed=0):
  """A state_dict with the FID weights file's keys and shapes: He-scaled convs and BatchNorms near the
  identity keep the activations of random weights O(1) through the 94 layers."""
  rng = np.random.default_rng(seed)
  abstract = inception.abstract_variables()
  sd = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]:
    names = [k.key for k in path]
    key = ".".join(names[:-1])
    if names[-1] == "kernel":
      kh, kw, cin, cout = spec.shape
      sd[f"{key}.weight"] = rng.normal(0, np.sqrt(2.0 / (kh * kw * cin)), (cout, cin, kh, kw))
    elif names[-1] == "scale":
      n = spec.shape[0]
      sd[f"{key}.weight"] = rng.uniform(0.7, 1.0, n)
      sd[f"{key}.bias"] = rng.normal(0, 0.1, n)
      sd[f"{key}.running_mean"] = rng.normal(0, 0.1, n)
      sd[f"{key}.running_var"] = rng.uniform(0.8, 1.5, n)
      sd[f"{key}.num_batches_tracked"] = np.array(0)
  sd["fc.weight"] = rng.normal(0, 0.02, (converter.FC_CLASSES, inception.FEATURE_DIM))
  sd["fc.bias"] = np.zeros(converter.FC_CLASSES)
  return {k: v.astype(np.int64 if k.endswith("tracked") else np.float32) for k, v in sd.items()}


@pytest.fixture(scope="module")
def state_dict():
  return random_state_dict()


def torch_fid_network(sd, monkeypatch):
  """pytorch-fid's InceptionV3 (FID blocks, resize and [-1, 1] scaling inside) loading `sd` where it
  would download the weights."""
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: tensors)
  net = pytorch_fid_inception.InceptionV3([pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
  return net.eval()


def test_features_match_pytorch_fid(state_dict, monkeypatch):
  net = torch_fid_network(state_dict, monkeypatch)
  pixels = np.random.default_rng(1).uniform(0, 1, (2, 37, 53, 3)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(pixels).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
  variables = converter.variables_from_state_dict(state_dict)
  got = inception.pool_features(inception.InceptionV3(), variables, pixels, batch_size=2)
  assert got.shape == (2, inception.FEATURE_DIM)
  assert 0.05 < np.abs(want).mean() < 20  # O(1) features: the 1e-4 below is a real tolerance
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(5, 7), (320, 301), (299, 299)])
def test_resize_is_torch_bilinear(shape):
  x = np.random.default_rng(2).uniform(0, 1, (1, *shape, 3)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                                         mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(inception.resize_bilinear(x)), want.numpy(), atol=2e-6)


def test_convert_writes_a_loadable_checkpoint_and_refuses_other_networks(state_dict, tmp_path):
  path = tmp_path / converter.WEIGHTS_FILE
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
  out = converter.convert(str(path), str(tmp_path / "inception"))
  model, variables = inception.load_inception(out)
  leaf = variables["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"]
  np.testing.assert_array_equal(
      leaf, np.transpose(state_dict["Mixed_7c.branch_pool.conv.weight"], (2, 3, 1, 0)))
  assert isinstance(model, inception.InceptionV3)
  with pytest.raises(FileExistsError):
    converter.convert(str(path), out)
  # torchvision's ImageNet Inception: 1000 classes and an auxiliary classifier
  other = dict(state_dict, **{"fc.weight": np.zeros((1000, 2048), np.float32),
                              "AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
  with pytest.raises(UserError, match=r"not pytorch-fid's FID Inception.*1000 classes.*AuxLogits"):
    converter.variables_from_state_dict(other)
  with pytest.raises(UserError, match=r"not pytorch-fid's FID Inception.*missing Conv2d_1a_3x3"):
    converter.variables_from_state_dict({"blocks.0.proj_in.weight": np.zeros((4, 4), np.float32)})
  with pytest.raises(FileNotFoundError, match=r"download pt_inception-2015-12-05-6726825d.pth"):
    converter.convert(str(tmp_path / "nothing.pth"), str(tmp_path / "x"))
  with pytest.raises(UserError, match="expected an Inception checkpoint"):
    inception.load_inception(_flow_checkpoint(tmp_path))


def _flow_checkpoint(tmp_path):
  import ml_collections

  from starflow2_jax import ckpt
  return ckpt.save_params(str(tmp_path / "flow"), {"w": np.zeros(1, np.float32)},
                          ml_collections.ConfigDict({"model_kind": "flow"}))


def test_launch_encode_writes_the_pool_features(state_dict, monkeypatch, tmp_path):
  from starflow2_jax import encode
  weights = tmp_path / converter.WEIGHTS_FILE
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, weights)
  checkpoint = converter.convert(str(weights), str(tmp_path / "inception"))
  pixels = np.random.default_rng(3).uniform(0, 1, (3, 41, 30, 3)).astype(np.float32)
  np.save(tmp_path / "pixels.npy", pixels)
  (path,) = encode.encode(checkpoint, str(tmp_path / "out"), pixels=str(tmp_path / "pixels.npy"),
                          batch_size=2)
  with torch.no_grad():
    want = torch_fid_network(state_dict, monkeypatch)(
        torch.from_numpy(pixels).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
  np.testing.assert_allclose(np.load(path), want, atol=1e-4, rtol=0)
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    encode.encode(checkpoint, str(tmp_path / "out"), pixels=str(tmp_path / "pixels.npy"))
