"""The STARFlow2 task (model_kind starflow2): building it per stage from configs/starflow2_tiny.py (frozen
VLM and FAE outside the trainable tree), its checked rows, bad input, a short run of the generic loop,
and the paper config's parameter counts and per-device bytes from `jax.eval_shape`."""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import starflow2_qwen7b, starflow2_tiny
from starflow2_jax import parallel
from starflow2_jax.data import pipeline
from starflow2_jax.errors import UserError
from starflow2_jax.pretzel import config as pconfig, model as pmodel, stages
from starflow2_jax.train import loop, pretzel_task, tasks
from starflow2_jax.vlm.model import abstract_params

PAPER_MESH = {"data": 1, "fsdp": 16, "tensor": 4}  # 64 devices
MIB = 1 << 20


def _build(cfg):
  mesh = parallel.make_mesh({"shape": {"data": 1}}, jax.devices()[:1])
  return tasks.build_task(cfg, mesh, parallel.logical_rules(cfg))


@pytest.fixture(scope="module")
def stage3():
  cfg = starflow2_tiny.get_config("stage=3")
  return cfg, _build(cfg)


def test_task_per_stage_objective_groups_and_frozen_tree(stage3):
  cfg, task = stage3
  assert task.objective == {"nf": 1.0, "ntp": 1.0} and task.sample_fn is None
  assert sorted(task.frozen) == ["fae", "vlm"] and "visual" not in task.frozen["vlm"]
  assert "latent_stats" in task.frozen["fae"]
  params = nn.unbox(jax.eval_shape(task.init_fn, jax.random.key(0)))
  assert not set(params) & {"vlm", "fae", "embed_tokens", "trunk"}  # frozen: not trainable leaves
  assert sorted(set(jax.tree.leaves(task.param_labels(params)))) == sorted(cfg.train.trainable)
  one = _build(starflow2_tiny.get_config("stage=1"))
  assert one.objective == {"nf": 1.0} and one.headline == "latent_nll"
  assert _build(starflow2_tiny.get_config("stage=2")).objective == {"ntp": 1.0}


def test_rows_of_the_pipeline_are_checked(stage3):
  cfg, task = stage3
  src = pipeline.build_source(cfg.data, "train")
  row = task.record_transform(dict(src[0], element=0))
  n = int(np.prod(pretzel_task.fae_of(cfg).grid))
  for k in np.nonzero(row["image_valid"])[0]:
    assert np.sum(row["image_slot"] == k) == n
  bad = dict(row, is_image=row["is_image"].copy())
  bad["is_image"][np.nonzero(row["is_image"])[0][0]] = False  # one latent slot lost
  with pytest.raises(UserError, match=rf"has {n - 1} latent positions, but the FAE grid .* gives {n}"):
    pretzel_task.check_row(bad, n)
  t2i = next(r for r in (task.record_transform(dict(src[i], element=i)) for i in range(8))
             if r["image_flow_loss"].any())
  start = int(np.argmax(t2i["image_slot"] == 0)) - 1
  pretzel_task.check_row(t2i, n, vlm_prefix=start + 1)
  with pytest.raises(UserError, match=rf"starts at position {start}, past model.stage1_vlm_prefix"):
    pretzel_task.check_row(t2i, n, vlm_prefix=start)


def test_bad_configs_are_user_errors(tmp_path):
  cfg = starflow2_tiny.get_config("stage=2")
  cfg.train.trainable = []
  with pytest.raises(UserError, match="stage 2 has no trainable group"):
    _build(cfg)
  cfg = starflow2_tiny.get_config("stage=1")
  cfg.data.image_size = 48
  with pytest.raises(UserError, match="data.image_size=48: the FAE encodes 32x32"):
    _build(cfg)
  from tokenizers import Tokenizer, models
  Tokenizer(models.WordLevel({"a": 0, "<|im_start|>": 1}, unk_token="a")).save(str(tmp_path / "t.json"))
  cfg = starflow2_tiny.get_config("stage=1")
  cfg.tokenizer = str(tmp_path / "t.json")
  with pytest.raises(UserError, match="the tokenizer has no .*<\\|vision_start\\|>"):
    _build(cfg)
  cfg = starflow2_tiny.get_config("stage=1")
  cfg.model.latent_patch = 3
  with pytest.raises(UserError, match="model.latent_patch: expected a divisor of the FAE latent grid 4x4"):
    _build(cfg)
  cfg = starflow2_tiny.get_config("stage=1")
  cfg.model.image_pos_table, cfg.vlm.image_positions = True, "1d"
  with pytest.raises(UserError, match="model.image_pos_table reads each latent's grid cell"):
    _build(cfg)


@pytest.mark.slow  # a train-step and an evaluation compilation with the FAE
def test_a_short_stage3_run_of_the_generic_loop(tmp_path):
  cfg = starflow2_tiny.get_config("stage=3")
  cfg.train.steps, cfg.train.batch_size, cfg.log.every, cfg.log.eval_examples = 2, 4, 1, 4
  cfg.mesh.shape = {"data": 2, "fsdp": 2, "tensor": 2}
  summary = loop.train_and_evaluate(cfg, str(tmp_path))
  assert summary["step"] == 2 and summary["trainable_params"] == summary["params"]
  for k in ("loss", "nf", "ntp", "latent_nll"):
    assert math.isfinite(summary["metrics"][k]), k
  assert set(summary["eval"]) == {"latent_nll", "text_ce"}
  assert all(math.isfinite(v) for v in summary["eval"].values())


def _flow_count(cfg: pconfig.PretzelConfig) -> int:
  """The parameter count of STARFLOW2.md 4.1's components, written out independently of the model."""
  d, dv, t = cfg.width, cfg.vlm_width, cfg.token_dim
  layer = 12 * d * d + 13 * d  # qkv, out, fc1, fc2 (with biases), two LayerNorms
  head = d + d * 2 * t + 2 * t  # final RMSNorm, proj_out
  shallow = cfg.shallow_blocks * (t * d + d + t + cfg.shallow_layers * layer + head)  # + proj_in, sos
  deep = t * d + d + dv * d + d + cfg.deep_layers * layer + head  # + proj_in, P_txt
  adapter = t * cfg.adapter_width + cfg.adapter_width + cfg.adapter_width * dv + dv
  return shallow + deep + adapter + 2 * dv * d + len(cfg.skip_taps) * dv * d


def _per_device_bytes(abstract, mesh, rules, moments: int = 0, trainable=None) -> float:
  specs = jax.tree.leaves(parallel.logical_to_specs(abstract, mesh, rules),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  total = 0.0
  leaves = jax.tree.leaves(nn.unbox(abstract))
  trainable = trainable or [True] * len(leaves)
  for x, spec, tr in zip(leaves, specs, trainable):
    split = math.prod(mesh.shape[a] for axes in spec if axes
                      for a in ((axes,) if isinstance(axes, str) else axes))
    total += x.size * x.dtype.itemsize * (1 + (moments if tr else 0)) / split
    if tr and split == 1:
      assert x.size * x.dtype.itemsize <= 4 * MIB, ("replicated trainable parameter", x.shape)
  return total


def test_paper_config_counts_and_per_device_bytes():
  """The paper config from jax.eval_shape: ~3.6B trainable parameters (the exact count = the
  components' formula), the frozen VLM and FAE counts, and the bytes per device of parameters and
  AdamW moments on a 64-device (fsdp 16, tensor 4) abstract mesh."""
  c = starflow2_qwen7b.get_config("stage=3")
  fae = pretzel_task.fae_of(c)
  cfg = pconfig.from_config(c, vlm=pconfig.qwen_config(c.vlm), latent_grid=fae.grid,
                            latent_channels=fae.channels, text_vocab=151665)
  assert (cfg.num_latents, cfg.token_dim, cfg.deep_trunk().num_heads) == (256, 32, 48)
  model = pmodel.Pretzel(cfg)
  boxed = jax.eval_shape(lambda r: pmodel.init_params(model, r), jax.random.key(0))
  params = nn.unbox(boxed)
  labels = stages.param_labels(params)
  count = {g: 0 for g in stages.GROUPS[:-1]}
  for g, x in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
    count[g] += x.size
  total = sum(count.values())
  assert total == _flow_count(cfg) and 3.5e9 < total < 3.7e9
  vlm_abstract = abstract_params(cfg.vlm)
  vlm_count = sum(x.size for x in jax.tree.leaves(nn.unbox(vlm_abstract)))
  fae_abstract = fae.abstract_params()
  fae_count = sum(x.size for x in jax.tree.leaves(nn.unbox(fae_abstract)))
  assert 7.5e9 < vlm_count < 7.7e9 and 1.0e9 < fae_count < 2.0e9
  mesh = jax.sharding.AbstractMesh(tuple(PAPER_MESH.values()), tuple(PAPER_MESH))
  rules = parallel.logical_rules(c)
  per_stage = {}
  for number in stages.STAGES:
    groups = set(stages.stage_groups(number, stages.GROUPS))
    mask = [g in groups for g in jax.tree.leaves(labels)]
    per_stage[number] = _per_device_bytes(boxed, mesh, rules, moments=2, trainable=mask)
  frozen = _per_device_bytes(vlm_abstract, mesh, rules) + _per_device_bytes(fae_abstract, mesh, rules)
  print(f"\npaper config: trainable {total:,} ({count}); frozen VLM {vlm_count:,}, FAE {fae_count:,}; "
        "per device on 64 (fsdp 16 x tensor 4): params + AdamW moments "
        + ", ".join(f"stage {k} {v / MIB:.1f} MiB" for k, v in per_stage.items())
        + f"; frozen VLM + FAE {frozen / MIB:.1f} MiB")
  assert per_stage[3] >= per_stage[1] > 3 * total * 4 / 64 * 0.9 * (count["shallow"] + count["deep"]) / total
  assert per_stage[3] <= 3 * total * 4 / 64 * 1.25  # sharded: about 1/64 of parameters + 2 moments
