"""Property 36: cached text generation equals the full forward; sampling filters; cache donation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax.vlm import generate as gen
from starflow2_jax.vlm.model import Qwen2_5_VL, QwenConfig
from starflow2_jax.vlm.positions import mrope_positions

CFG = QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, mrope_section=(2, 3, 3))
IMAGE = 250


@pytest.fixture(scope="module")
def model_params():
  """The tiny model with every parameter N(0, 0.3^2) (no zero biases, no unit norms)."""
  model = Qwen2_5_VL(CFG)

  def init():
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                 positions=jnp.zeros((1, 4, 3), jnp.int32))["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])

  return model, jax.jit(init)()


def _left_padded(rng, lengths):
  width = max(lengths)
  ids = np.zeros((len(lengths), width), np.int32)
  valid = np.zeros((len(lengths), width), bool)
  for r, n in enumerate(lengths):
    ids[r, width - n:] = rng.integers(3, 200, n)
    valid[r, width - n:] = True
  return ids, valid


def test_cached_greedy_equals_full_forward(model_params):
  """Batch 3, left-padded prompts of different lengths, 12 new tokens: identical tokens, and the
  logits at every step equal those of a full forward over prompt + tokens so far."""
  model, params = model_params
  ids, valid = _left_padded(np.random.default_rng(0), [5, 9, 2])
  pos, nxt = mrope_positions(ids, valid, [], IMAGE)
  n = 12
  s = gen.SamplingConfig(max_new_tokens=n, eos_ids=(), pad_id=0)
  out = gen.generate(model, params, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(pos),
                     jnp.asarray(nxt), jax.random.key(0), s, return_logits=True)
  toks = np.asarray(out["tokens"])
  assert (np.asarray(out["lengths"]) == n).all()
  # Reference: full sequence prompt + generated, one forward; logits at column L - 1 + i predict token i.
  length = ids.shape[1]
  full_ids = np.concatenate([ids, toks], 1)
  full_valid = np.concatenate([valid, np.ones_like(toks, bool)], 1)
  gen_pos = nxt[:, None, None] + np.arange(n)[None, :, None]
  full_pos = np.concatenate([pos, np.broadcast_to(gen_pos, (3, n, 3))], 1)
  logits = jax.jit(lambda p, a, b, c: model.apply({"params": p}, a, positions=b, valid=c)["logits"])(
      params, jnp.asarray(full_ids), jnp.asarray(full_pos), jnp.asarray(full_valid))
  ref = np.asarray(logits)[:, length - 1:length - 1 + n]
  np.testing.assert_array_equal(ref.argmax(-1), toks)
  np.testing.assert_allclose(np.asarray(out["logits"]), ref, rtol=0, atol=1e-5)


def test_rows_stop_at_eos(model_params):
  model, params = model_params
  ids, valid = _left_padded(np.random.default_rng(0), [5, 9, 2])
  pos, nxt = mrope_positions(ids, valid, [], IMAGE)
  args = (jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(pos), jnp.asarray(nxt), jax.random.key(0))
  free = np.asarray(gen.generate(model, params, *args, gen.SamplingConfig(max_new_tokens=8))["tokens"])
  eos = int(free[0, 2])
  out = gen.generate(model, params, *args, gen.SamplingConfig(max_new_tokens=8, eos_ids=(eos,),
                                                              pad_id=255))
  toks, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
  for r in range(3):
    hit = np.nonzero(free[r] == eos)[0]
    stop = hit[0] + 1 if len(hit) else 8
    assert lengths[r] == stop
    np.testing.assert_array_equal(toks[r, :stop], free[r, :stop])
    assert (toks[r, stop:] == 255).all()


def test_top_p_keeps_smallest_prefix_reaching_p():
  logits = jnp.log(jnp.array([[0.125, 0.5, 0.125, 0.25]]))
  kept = lambda p: np.isfinite(np.asarray(gen.filter_top_p(logits, p)))[0].tolist()
  assert kept(0.5) == [False, True, False, False]
  assert kept(0.75) == [False, True, False, True]
  assert kept(0.76) == [True, True, False, True]  # tie at 0.125: the lower id first
  assert kept(1.0) == [True, True, True, True]
  assert np.isfinite(np.asarray(gen.filter_top_k(logits, 2)))[0].tolist() == [False, True, False, True]


def test_sampling_respects_filters_and_vocab_limit():
  logits = jnp.tile(jnp.array([[0.0, 1.0, 2.0, 9.0]]), (512, 1))
  greedy = gen.sample_token(logits, jax.random.key(0), gen.SamplingConfig(vocab_limit=3))
  assert (np.asarray(greedy) == 2).all()
  s = gen.SamplingConfig(temperature=1.5, top_k=2, vocab_limit=3)
  drawn = np.asarray(gen.sample_token(logits, jax.random.key(1), s))
  assert set(drawn.tolist()) == {1, 2}


def test_cache_update_is_donated(model_params):
  """The jitted step aliases the donated cache to its output: no second cache-sized buffer (the
  temporaries hold per-layer K/V slices, never a whole cache)."""
  model, params = model_params
  cache = CFG.init_cache(2, 256)
  tokens = jnp.zeros((2, 1), jnp.int32)
  pos = jnp.zeros((2, 1, 3), jnp.int32)
  compiled = gen.jitted_step.lower(model, params, cache, tokens, pos).compile()
  mem = compiled.memory_analysis()
  kv_bytes = cache.k.nbytes + cache.v.nbytes
  assert mem.alias_size_in_bytes >= kv_bytes
  assert mem.temp_size_in_bytes < kv_bytes
  _, new = gen.jitted_step(model, params, cache, tokens, pos)
  assert cache.k.is_deleted() and int(new.index) == 1


def test_taps_and_hidden_state_convention(model_params):
  """taps={j} is the raw residual stream after layer j (what Pretzel reads); hidden_states follows
  HF (embeddings, layers 1..L-1, final-normed), and the logits come from the final-normed state."""
  model, params = model_params
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 6)))
  pos = jnp.broadcast_to(jnp.arange(6)[None, :, None], (2, 6, 3))
  out = jax.jit(lambda p: model.apply({"params": p}, ids, positions=pos, collect_hidden=True,
                                      taps=(1, 2)))(params)
  hs = out["hidden_states"]
  assert len(hs) == CFG.num_layers + 1
  np.testing.assert_array_equal(out["taps"][1], hs[1])
  np.testing.assert_array_equal(hs[-1], out["hidden"])
  assert not np.allclose(out["taps"][2], out["hidden"])  # the last tap is before the final norm
  with pytest.raises(ValueError, match="tap layer 3 out of range"):
    model.apply({"params": params}, ids, positions=pos, taps=(3,))


def test_sharded_generation_under_the_rules_equals_one_device(model_params):
  """vlm.generate inside parallel.sharding_context on a (data=2, fsdp=2, tensor=2) mesh, parameters
  placed by the one rules table: the same greedy tokens and logits as one device; the cache buffers
  carry their cache_* layout."""
  from starflow2_jax import parallel
  from starflow2_jax.vlm.model import abstract_params
  model, params = model_params
  ids, valid = _left_padded(np.random.default_rng(1), [5, 9, 2, 7])
  pos, nxt = mrope_positions(ids, valid, [], IMAGE)
  s = gen.SamplingConfig(max_new_tokens=6, eos_ids=(), pad_id=0)
  args = (jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(pos), jnp.asarray(nxt), jax.random.key(0))
  one = gen.generate(model, params, *args, s, return_logits=True)
  mesh = parallel.make_mesh({"shape": {"data": 2, "fsdp": 2, "tensor": 2}})
  placed = jax.device_put(params, parallel.logical_to_shardings(abstract_params(CFG), mesh,
                                                                parallel.DEFAULT_LOGICAL_RULES))
  with parallel.sharding_context(mesh):
    sharded = gen.generate(model, placed, *args, s, return_logits=True)
    cache = jax.jit(lambda: CFG.init_cache(4, 16))()
  np.testing.assert_array_equal(np.asarray(sharded["tokens"]), np.asarray(one["tokens"]))
  np.testing.assert_allclose(np.asarray(sharded["logits"]), np.asarray(one["logits"]), rtol=0, atol=1e-5)
  want = cache.shardings(mesh, parallel.DEFAULT_LOGICAL_RULES)
  assert cache.k.sharding.is_equivalent_to(want.k, 5), cache.k.sharding
  assert want.k.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None, "tensor", None)
