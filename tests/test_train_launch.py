"""Configs: the shipped configs build, bad inputs fail naming the field (command-line mistakes:
test_entry_errors.py)."""
import os
import sys

import jax
import pytest

from starflow2_jax import flows
from starflow2_jax.errors import UserError
from starflow2_jax.train import loop, mfu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import tarflow_digits, tarflow_imagenet64  # noqa: E402


def test_imagenet64_config_is_the_paper_recipe():
  cfg = tarflow_imagenet64.get_config()
  f = flows.FlowConfig.from_config(cfg.model)
  assert (f.num_tokens, f.token_dim, f.num_blocks) == (1024, 12, 8)
  model = flows.FlowModel(f)
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                             jax.numpy.zeros((1, 1024, 12)), jax.numpy.zeros((1,), "int32")))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  assert abs(n - 8 * 8 * 12 * 768 ** 2) / n < 0.05  # N K 12 d^2 = 453M


@pytest.mark.parametrize("field,value,match", [
    ("train.nonfinite", "ignore", r"train.nonfinite='ignore': expected one of \('skip', 'stop'\)"),
    ("train.batch_size", 60, r"train.batch_size=60.*data x fsdp = 8 x 1 = 8"),
    ("data.image_size", 8, r"data.image_size=8.*model.image_size/channels expect \(16, 16, 1\)"),
])
def test_bad_inputs_fail_naming_the_field(field, value, match, tmp_path):
  cfg = tarflow_digits.get_config()
  section, name = field.split(".")
  cfg[section][name] = value
  with pytest.raises(ValueError, match=match):
    loop.train_and_evaluate(cfg, str(tmp_path))


def test_missing_data_dir_fails_clearly(tmp_path):
  cfg = tarflow_imagenet64.get_config()
  cfg.model = tarflow_digits.get_config().model  # a tiny model: the error comes from the data
  cfg.model.image_size, cfg.model.channels = 64, 3
  cfg.train.batch_size = 8
  with pytest.raises(FileNotFoundError, match=r"data.data_dir='' is not a directory"):
    loop.train_and_evaluate(cfg, str(tmp_path))


@pytest.mark.parametrize("kind,peak", [("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12),
                                       ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
                                       ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None)])
def test_chip_peak_table(kind, peak):
  assert mfu.chip_peak(kind) == peak


def test_peak_flops_override_and_measured_fallback():
  assert mfu.peak(123e12) == ("mfu", 123e12)
  name, measured = mfu.peak(0.0)  # the test devices are CPUs: not in the table
  assert name == "mfu_vs_matmul" and measured > 1e8


def test_unknown_model_kind_lists_the_registered_tasks(tmp_path):
  cfg = tarflow_digits.get_config()
  cfg.model_kind = "flwo"
  with pytest.raises(UserError, match=r"config.model_kind='flwo': expected one of \[.*'flow'.*\]"):
    loop.train_and_evaluate(cfg, str(tmp_path))
