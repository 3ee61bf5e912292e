"""TarFlow importer (property 55a): a synthetic apple/ml-tarflow state_dict with the documented keys and
shapes, converted and compared with an independent float64 NumPy implementation of the reference maths
(STARFLOW2.md 2.2, CHECKPOINT-LAYOUTS.md a.3-a.4); the command-line convert + sample path end to end."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flow_utils import assert_close_to_scale
from scipy.special import erf

from starflow2_jax import flows
from starflow2_jax.convert import tarflow_torch
from starflow2_jax.flows import cli as flow_cli

S, P, C, NCLS, D_MODEL, BLOCKS, LAYERS = 16, 4, 3, 3, 64, 2, 2
T, D = (S // P) ** 2, C * P * P
HEAD_DIM = 64  # TarFlow's fixed head width: num_heads = width / 64
WIDTHS = (D_MODEL, 2 * D_MODEL)  # one head, and two heads (head order and the 1/sqrt(64) scale)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_state_dict(seed=0, width=D_MODEL):
  """The exact key set and shapes of CHECKPOINT-LAYOUTS a.2 (random values, proj_out included)."""
  D_MODEL = width  # noqa: N806 (the reference's name for the width)
  rng = np.random.default_rng(seed)
  n = lambda *shape, s=0.1: rng.normal(0, s, shape).astype(np.float32)
  sd = {"var": np.ones((T, D), np.float32)}
  for j in range(BLOCKS):
    b = f"blocks.{j}"
    sd[f"{b}.pos_embed"] = n(T, D_MODEL)
    sd[f"{b}.class_embed"] = n(NCLS, 1, D_MODEL, s=0.3)
    sd[f"{b}.attn_mask"] = np.tril(np.ones((T, T), np.float32))
    sd[f"{b}.proj_in.weight"], sd[f"{b}.proj_in.bias"] = n(D_MODEL, D), n(D_MODEL)
    for i in range(LAYERS):
      a = f"{b}.attn_blocks.{i}"
      for norm in ("attention.norm", "mlp.norm"):
        sd[f"{a}.{norm}.weight"], sd[f"{a}.{norm}.bias"] = 1 + n(D_MODEL), n(D_MODEL)
      sd[f"{a}.attention.qkv.weight"], sd[f"{a}.attention.qkv.bias"] = n(3 * D_MODEL, D_MODEL), n(3 * D_MODEL)
      sd[f"{a}.attention.proj.weight"], sd[f"{a}.attention.proj.bias"] = n(D_MODEL, D_MODEL), n(D_MODEL)
      sd[f"{a}.mlp.main.0.weight"], sd[f"{a}.mlp.main.0.bias"] = n(4 * D_MODEL, D_MODEL), n(4 * D_MODEL)
      sd[f"{a}.mlp.main.2.weight"], sd[f"{a}.mlp.main.2.bias"] = n(D_MODEL, 4 * D_MODEL), n(D_MODEL)
    # head std 0.02 at width 64, shrunk as 1/sqrt(width) so wider maps stay as well conditioned
    head_std = 0.02 * np.sqrt(64 / D_MODEL)
    sd[f"{b}.proj_out.weight"], sd[f"{b}.proj_out.bias"] = n(2 * D, D_MODEL, s=head_std), n(2 * D, s=0.05)
  return sd


# ---- independent float64 NumPy reference -----------------------------------------------------


def _ln(x, w, b):
  m = x.mean(-1, keepdims=True)
  v = ((x - m) ** 2).mean(-1, keepdims=True)
  return (x - m) / np.sqrt(v + 1e-5) * w + b


def _trunk(sd, j, xp, labels, attn_temp=1.0):
  """Raw proj_out output [B, T, 2D] of block j on permuted tokens xp (before the one-token shift)."""
  g = lambda k: sd[f"blocks.{j}.{k}"].astype(np.float64)
  width = g("proj_in.weight").shape[0]
  perm = np.arange(T) if j % 2 == 0 else np.arange(T)[::-1]
  table = g("class_embed")[:, 0]
  cls = np.stack([table.mean(0) if l < 0 else table[l] for l in labels])
  h = xp @ g("proj_in.weight").T + g("proj_in.bias") + g("pos_embed")[perm] + cls[:, None]
  bsz = xp.shape[0]
  for i in range(LAYERS):
    a = f"attn_blocks.{i}"
    y = _ln(h, g(f"{a}.attention.norm.weight"), g(f"{a}.attention.norm.bias"))
    # the reference's qkv rows are [3, heads, head_dim]: q of every head, then k, then v
    qkv = (y @ g(f"{a}.attention.qkv.weight").T + g(f"{a}.attention.qkv.bias")).reshape(
        bsz, T, 3 * width // HEAD_DIM, HEAD_DIM)
    q, k, v = np.split(qkv, 3, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM) / attn_temp
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(bsz, T, width)
    h = h + o @ g(f"{a}.attention.proj.weight").T + g(f"{a}.attention.proj.bias")
    y = _ln(h, g(f"{a}.mlp.norm.weight"), g(f"{a}.mlp.norm.bias"))
    y = y @ g(f"{a}.mlp.main.0.weight").T + g(f"{a}.mlp.main.0.bias")
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    h = h + y @ g(f"{a}.mlp.main.2.weight").T + g(f"{a}.mlp.main.2.bias")
  return h @ g("proj_out.weight").T + g("proj_out.bias")


def _shifted_ab(raw):
  raw = np.concatenate([np.zeros_like(raw[:, :1]), raw[:, :-1]], 1)
  return raw[..., :D], raw[..., D:]


def ref_forward(sd, x, labels):
  logdet = np.zeros(x.shape[0])
  for j in range(BLOCKS):
    perm = np.arange(T) if j % 2 == 0 else np.arange(T)[::-1]
    xp = x[:, perm]
    a, b = _shifted_ab(_trunk(sd, j, xp, labels))
    x = ((xp - b) * np.exp(-a))[:, perm]
    logdet -= a.mean((1, 2))
  return x, logdet


def ref_reverse(sd, z, labels, w=0.0, anneal=False, attn_temp=1.0):
  x = z * np.sqrt(sd["var"].astype(np.float64))
  for j in reversed(range(BLOCKS)):
    perm = np.arange(T) if j % 2 == 0 else np.arange(T)[::-1]
    zp = x[:, perm]
    xp = np.zeros_like(zp)
    xp[:, 0] = zp[:, 0]
    for i in range(T - 1):
      a, b = (r[:, i + 1] for r in _shifted_ab(_trunk(sd, j, xp, labels)))
      if w:
        au, bu = (r[:, i + 1] for r in _shifted_ab(_trunk(sd, j, xp, [-1] * len(labels), attn_temp)))
        g = w * (i + 1) / (T - 1) if anneal else w
        a, b = a + g * (a - au), b + g * (b - bu)
      xp[:, i + 1] = zp[:, i + 1] * np.exp(a) + b
    x = xp[:, perm]
  return x


# ---- tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=WIDTHS, ids=[f"width{w}" for w in WIDTHS])
def converted(request):
  sd = make_state_dict(width=request.param)
  variables, cfg = tarflow_torch.params_from_state_dict(sd, image_size=S, patch_size=P)
  return sd, variables, cfg


def test_infers_config_and_matches_numpy_forward(converted):
  sd, variables, cfg = converted
  width = sd["blocks.0.proj_in.weight"].shape[0]
  assert (cfg.width, cfg.layers_per_block, cfg.num_classes) == (width, (LAYERS,) * BLOCKS, NCLS)
  assert width // cfg.head_dim == width // HEAD_DIM  # the number of heads
  stack = variables["params"]["blocks_0"]["transformer"]["stack"]  # layers stored stacked
  assert stack["attn"]["qkv"]["kernel"].shape == (LAYERS, width, 3 * width)
  assert (cfg.num_tokens, cfg.token_dim, cfg.permutations) == (T, D, ("identity", "flip"))
  model = flows.FlowModel(cfg)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, T, D))
  labels = [0, 2, -1]
  out = jax.jit(model.apply)(variables, jnp.asarray(x, jnp.float32), jnp.asarray(labels))
  z_ref, ld_ref = ref_forward(sd, x, labels)
  assert_close_to_scale(out.z, z_ref)
  np.testing.assert_allclose(out.logdets, ld_ref, atol=1e-5)


@pytest.mark.parametrize("w,anneal,attn_temp", [(0.0, False, 1.0), (1.5, False, 1.5), (1.5, True, 1.0)])
def test_guided_reverse_matches_numpy(converted, w, anneal, attn_temp):
  sd, variables, cfg = converted
  model = flows.FlowModel(cfg)
  z = np.random.default_rng(2).normal(size=(2, T, D))
  labels = [1, 2]
  g = flows.Guidance(weight=w, rule="linear", anneal=anneal, attn_temp=attn_temp)
  ours, _ = jax.jit(lambda v, z, l: flows.reverse(model, v, z, l, guidance=g))(
      variables, jnp.asarray(z, jnp.float32), jnp.asarray(labels))
  assert_close_to_scale(ours, ref_reverse(sd, z, labels, w, anneal, attn_temp), tol=1e-4)


def test_importer_rejects_bad_state_dicts():
  sd = make_state_dict()
  with pytest.raises(ValueError, match=r"--patch_size=4 --image_size=16"):
    tarflow_torch.params_from_state_dict(sd, image_size=256, patch_size=8)
  bad = dict(sd, **{"blocks.0.extra.weight": np.zeros(3)})
  with pytest.raises(ValueError, match="does not know.*blocks.0.extra.weight"):
    tarflow_torch.params_from_state_dict(bad, image_size=S, patch_size=P)
  bad = dict(sd, **{"blocks.1.attn_mask": np.ones((T, T), np.float32)})
  with pytest.raises(ValueError, match="blocks.1.attn_mask is not the lower-triangular"):
    tarflow_torch.params_from_state_dict(bad, image_size=S, patch_size=P)
  bad = dict(sd, var=np.full((T, D), 2.0, np.float32))
  with pytest.raises(ValueError, match="'var' must be all ones"):
    tarflow_torch.params_from_state_dict(bad, image_size=S, patch_size=P)
  ddp = {"module." + k: v for k, v in sd.items()}  # DDP prefixes are stripped
  tarflow_torch.params_from_state_dict(ddp, image_size=S, patch_size=P)


def test_checkpoint_shape_mismatch_names_parameters(converted, tmp_path):
  _, variables, cfg = converted
  path = str(tmp_path / "ckpt")
  from starflow2_jax import ckpt
  ckpt.save_params(path, variables, tarflow_torch.experiment_config(cfg))
  wrong = ml_collections.ConfigDict({"model_kind": "flow",
                                     "model": dict(cfg.to_dict(), width=2 * cfg.width)})
  with pytest.raises(ValueError, match=rf"blocks_0'\]\['proj_in'\]\['kernel'\]: expected \(48, "
                                       rf"{2 * cfg.width}\), found \(48, {cfg.width}\)"):
    flow_cli.load_flow(path, wrong)
  with pytest.raises(FileExistsError):
    ckpt.save_params(path, variables, tarflow_torch.experiment_config(cfg))


def test_command_line_convert_and_sample(tmp_path):
  torch = pytest.importorskip("torch")
  sd = make_state_dict(seed=3)
  pth = tmp_path / "tiny_model_4_64_2_2_0.07.pth"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, check=True,
                                     capture_output=True, text=True)
  out = tmp_path / "converted"
  run("launch.convert", "--from=tarflow_torch", f"--checkpoint={pth}", f"--out={out}",
      f"--image_size={S}", f"--patch_size={P}")
  z = np.random.default_rng(4).normal(size=(2, T, D)).astype(np.float32)
  np.save(tmp_path / "z.npy", z)
  samples = tmp_path / "samples"
  run("launch.sample", f"--checkpoint={out}", f"--noise={tmp_path / 'z.npy'}", "--labels=0,2",
      "--guidance=1.5", f"--out={samples}")
  got = np.load(samples / "samples.npy")
  assert got.shape == (2, S, S, C) and got.dtype == np.float32
  ref = ref_reverse(sd, z.astype(np.float64), [0, 2], w=1.5)
  ref_img = np.asarray(flows.unpatchify(jnp.asarray(ref), P, "tarflow", (S, S, C)))
  assert_close_to_scale(got, ref_img, tol=1e-4)
  assert (samples / "samples.png").is_file()
  with pytest.raises(subprocess.CalledProcessError) as e:  # never overwrite outputs
    run("launch.sample", f"--checkpoint={out}", "--num=2", f"--out={samples}")
  assert "already holds" in e.value.stderr
  with pytest.raises(subprocess.CalledProcessError) as e:  # another kind's flag is never ignored
    run("launch.sample", f"--checkpoint={out}", "--num=2", "--prompt=hi", f"--out={tmp_path / 'x'}")
  assert "['--prompt'] do not apply" in e.value.stderr
