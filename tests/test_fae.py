"""FAE properties (REFERENCE-BEHAVIOURS 57): KL closed form, reparameterised moments, pixel-decoder
feature noise, deterministic posterior-mean encode, latent normalisation round trip, the paper config's
shapes and parameter counts (jax.eval_shape), and clear errors for bad input."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import PartitionSpec as P

from configs import fae_dinov2_g14, fae_shapesworld
from starflow2_jax import parallel
from starflow2_jax.errors import UserError
from starflow2_jax.fae import FAE, kl_divergence, reparameterise, token_noise
from starflow2_jax.fae.dinov2 import num_params


def tiny_fae_config():
  c = fae_shapesworld.fae_config()
  c.image_size = 16
  c.latent_channels = 4
  c.dinov2.image_size = 16
  c.dinov2.hidden_size = 16
  c.dinov2.num_heads = 2
  c.dinov2.num_layers = 1
  c.head_heads, c.head_dim = 2, 8
  c.decoder.update(width=16, layers=1, heads=2, head_dim=8, mlp_hidden=32)
  c.pixel.update(width=16, layers=1, heads=2, head_dim=8, mlp_hidden=32)
  return c


def random_params(fae: FAE, seed: int = 0):
  """The FAE's whole tree (identity latent statistics) filled with random values from its shapes
  (no init compile): weights N(0, 0.2^2), norm and LayerScale scales 1 + N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if "latent_stats" in name:
      return jnp.zeros(x.shape) if "mean" in name else jnp.ones(x.shape)
    noise = rng.normal(0.0, 0.1 if "scale" in name else 0.2, x.shape).astype(np.float32)
    return jnp.asarray(1.0 + noise if "scale" in name else noise)

  return jax.tree_util.tree_map_with_path(leaf, nn.unbox(fae.abstract_params(with_stats=True)))


@pytest.fixture(scope="module")
def tiny():
  fae = FAE(tiny_fae_config())
  params = random_params(fae)
  params["latent_stats"] = {"mean": jnp.asarray([0.5, -1.0, 2.0, 0.0]),
                            "std": jnp.asarray([2.0, 0.5, 1.5, 3.0])}
  images = jax.random.randint(jax.random.key(1), (3, 16, 16, 3), 0, 256).astype(jnp.uint8)
  return fae, params, images


def test_kl_closed_form(x64):
  rng = np.random.default_rng(0)
  mean, logvar = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
  # KL(N(m, s^2) || N(0, 1)) from the general two-Gaussian formula log(s_q/s_p) + (s_p^2 + m^2)/2 - 1/2
  s = np.exp(0.5 * logvar)
  general = np.log(1.0 / s) + (s ** 2 + mean ** 2) / 2.0 - 0.5
  got = np.asarray(kl_divergence(jnp.asarray(mean), jnp.asarray(logvar)))
  np.testing.assert_allclose(got, general, rtol=0, atol=1e-12)
  assert got.dtype == np.float64


def test_reparameterised_moments():
  n = 20000
  mean = jnp.asarray([1.5, -2.0, 0.0])
  logvar = jnp.asarray([0.0, np.log(0.25), np.log(4.0)])
  z = np.asarray(reparameterise(jax.random.key(3), jnp.broadcast_to(mean, (n, 3)),
                                jnp.broadcast_to(logvar, (n, 3))), np.float64)
  var = np.exp(np.asarray(logvar, np.float64))
  se_mean = np.sqrt(var / n)
  se_var = var * np.sqrt(2.0 / (n - 1))
  assert np.all(np.abs(z.mean(0) - np.asarray(mean)) < 3 * se_mean)
  assert np.all(np.abs(z.var(0, ddof=1) - var) < 3 * se_var)


def test_pixel_noise_is_relative_to_token_rms():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(400, 64)) * rng.uniform(0.1, 10.0, size=(400, 1)), jnp.float32)
  sigma = 0.4
  noise = np.asarray(token_noise(jax.random.key(2), x, sigma) - x, np.float64)
  rms = np.sqrt(np.mean(np.square(np.asarray(x, np.float64)), -1))
  ratio2 = np.mean(np.square(noise), -1) / np.square(sigma * rms)  # E = 1, Var = 2/D per token
  se = np.sqrt(2.0 / x.shape[1] / x.shape[0])
  assert abs(ratio2.mean() - 1.0) < 3 * se


def test_encode_is_the_deterministic_normalised_posterior_mean(tiny):
  fae, params, images = tiny
  enc = jax.jit(fae.encode)
  a, b = np.asarray(enc(params, images)), np.asarray(enc(params, images))
  assert a.shape == (3, 4, 4, 4) and np.array_equal(a, b)
  mean, _ = fae.posterior(params, fae.trunk_features(params["trunk"], images))
  stats = params["latent_stats"]
  want = (np.asarray(mean) - np.asarray(stats["mean"])) / np.asarray(stats["std"])
  np.testing.assert_allclose(a.reshape(3, 16, 4), want, rtol=1e-5, atol=1e-5)
  out = np.asarray(jax.jit(fae.decode)(params, a))
  assert out.shape == (3, 16, 16, 3) and out.min() >= 0.0 and out.max() <= 1.0


def test_encode_decode_sharded_by_the_logical_rules(tiny):
  fae, params, images = tiny
  mesh = parallel.inference_mesh(2, 4)
  rules = parallel.DEFAULT_LOGICAL_RULES
  shardings = parallel.param_shardings(fae.abstract_params(with_stats=True), mesh, rules)
  placed = jax.tree.map(jax.device_put, params, shardings)
  assert placed["head"]["attn"]["qkv"]["kernel"].sharding.spec == P("fsdp", "tensor")
  with parallel.sharding_context(mesh, rules):
    latents = jax.jit(fae.encode)(placed, images)
  np.testing.assert_allclose(np.asarray(latents), np.asarray(jax.jit(fae.encode)(params, images)),
                             rtol=1e-4, atol=1e-4)


def test_normalisation_round_trips(tiny, x64):
  fae, params, _ = tiny
  stats = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params["latent_stats"])
  p = {"latent_stats": stats}
  z = jnp.asarray(np.random.default_rng(4).normal(size=(2, 4, 4, 4)) * 3.0)
  back = fae.denormalise(p, fae.normalise(p, z))
  np.testing.assert_allclose(np.asarray(back), np.asarray(z), rtol=0, atol=1e-12)


def test_paper_config_shapes_and_parameter_counts():
  fae = FAE(fae_dinov2_g14.get_config().fae)
  abstract = nn.unbox(fae.abstract_params())
  counts = {k: num_params(v) for k, v in abstract.items()}
  print("paper FAE parameters:", counts)
  assert fae.grid == (16, 16) and fae.channels == 32 and fae.image_size == 256
  # DINOv2-g/14 without the published 37x37 table (16x16 here) and mask token; FAE paper sizes
  assert counts["trunk"] == 1_134_769_664
  assert abs(counts["head"] - 38.2e6) < 0.5e6
  assert abs(counts["feature_decoder"] - 170.4e6) < 2.5e6
  assert abs(counts["pixel_decoder"] - 305e6) < 2e6
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.uint8)
  latents = jax.eval_shape(fae.encode, abstract, images)
  assert latents.shape == (2, 16, 16, 32) and latents.dtype == jnp.float32
  out = jax.eval_shape(fae.decode, abstract, latents)
  assert out.shape == (2, 256, 256, 3) and out.dtype == jnp.float32


def test_init_gives_the_abstract_tree():
  fae = FAE(tiny_fae_config())
  params = fae.init(jax.random.key(0), with_stats=True)
  want = nn.unbox(fae.abstract_params(with_stats=True))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                             want)
  assert "latent_stats" not in fae.init(jax.random.key(0))


def test_bad_input_errors(tiny):
  fae, params, images = tiny
  with pytest.raises(UserError, match=r"expected \[B, 16, 16, 3\].*found \[3, 12, 12, 3\]"):
    fae.encode(params, images[:, :12, :12])
  with pytest.raises(UserError, match=r"expected \[B, 16, 16, 3\].*found \[3, 16, 16, 1\]"):
    fae.encode(params, images[..., :1])
  no_stats = {k: v for k, v in params.items() if k != "latent_stats"}
  with pytest.raises(UserError, match="no latent statistics"):
    fae.encode(no_stats, images)
  with pytest.raises(UserError, match="no latent statistics"):
    jax.jit(fae.decode)(no_stats, jnp.zeros((1, 4, 4, 4)))
  with pytest.raises(UserError, match=r"latents: expected \[B, 4, 4, 4\], found \[1, 4, 4, 5\]"):
    fae.decode(params, jnp.zeros((1, 4, 4, 5)))
  with pytest.raises(UserError, match="fae.phase"):
    FAE(dict(tiny_fae_config().to_dict(), phase="pixels"))
