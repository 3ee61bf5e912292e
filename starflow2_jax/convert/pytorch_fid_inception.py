"""Import pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth) for
`starflow2_jax.eval.inception`.

The file is the `state_dict` of torchvision's `Inception3(num_classes=1008, aux_logits=False)` with
pytorch-fid's FID blocks (the names are torchvision's: `Mixed_5b.branch1x1.conv.weight`,
`...bn.running_mean`, ...). Mapping, for every BasicConv2d `M`:
  M.conv.weight [out, in, kh, kw] -> params M/conv/kernel [kh, kw, in, out]
  M.bn.weight, M.bn.bias          -> params M/bn/scale, M/bn/bias
  M.bn.running_mean, running_var  -> batch_stats M/bn/mean, M/bn/var
The 1008-way classifier `fc.*` and the `num_batches_tracked` counters are not part of the pool
features and are dropped; any other key, a missing key or a shape mismatch means the file is another
network, which is an error.

Library: `variables_from_state_dict(sd) -> variables`, `convert(checkpoint, out) -> out`. Command line:
  python -m launch.convert --from=pytorch_fid_inception \
      --checkpoint=pt_inception-2015-12-05-6726825d.pth --out=/ckpt/inception_fid
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np

from starflow2_jax import ckpt
from starflow2_jax.convert.tarflow_torch import load_state_dict
from starflow2_jax.errors import UserError
from starflow2_jax.eval import inception

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
FC_CLASSES = 1008  # the FID graph's classifier (torchvision's ImageNet Inception has 1000)
_DROPPED = ("fc.weight", "fc.bias")
# Flax leaf (collection, name) -> (torch suffix, numpy transform of the torch tensor).
_LEAVES = {
    ("params", "kernel"): ("weight", lambda w: np.transpose(w, (2, 3, 1, 0))),
    ("params", "scale"): ("weight", lambda w: w),
    ("params", "bias"): ("bias", lambda w: w),
    ("batch_stats", "mean"): ("running_mean", lambda w: w),
    ("batch_stats", "var"): ("running_var", lambda w: w),
}


def _not_fid_inception(path: str, why: str) -> UserError:
  return UserError(f"{path} is not pytorch-fid's FID Inception weights file ({WEIGHTS_FILE}, from "
                   f"{WEIGHTS_URL}): {why}")


def variables_from_state_dict(sd: Mapping[str, np.ndarray], source: str = "state_dict") -> dict:
  """-> {"params", "batch_stats"} of `inception.InceptionV3`, every key consumed and shape-checked."""
  sd = {k.removeprefix("module."): np.asarray(v) for k, v in sd.items()}
  abstract = inception.abstract_variables()
  used: set[str] = set()
  problems: list[str] = []

  def leaf(key_path, spec):
    collection = key_path[0].key
    names = [k.key for k in key_path[1:]]
    suffix, transform = _LEAVES[(collection, names[-1])]
    key = ".".join(names[:-1] + [suffix])
    if key not in sd:
      problems.append(f"missing {key}")
      return np.zeros(spec.shape, np.float32)
    used.add(key)
    value = transform(sd[key].astype(np.float32))
    if value.shape != spec.shape:
      problems.append(f"{key}: expected shape {list(_torch_shape(spec, names))}, found "
                      f"{list(sd[key].shape)}")
    return value

  variables = jax.tree_util.tree_map_with_path(leaf, abstract)
  extra = sorted(k for k in set(sd) - used - set(_DROPPED) if not k.endswith("num_batches_tracked"))
  if "fc.weight" in sd and sd["fc.weight"].shape[0] != FC_CLASSES:
    problems.insert(0, f"fc.weight has {sd['fc.weight'].shape[0]} classes, the FID graph {FC_CLASSES} "
                    "(torchvision's ImageNet Inception is not the FID network)")
  if extra:
    problems.append(f"keys the FID network does not have: {extra[:10]}"
                    + (f" and {len(extra) - 10} more" if len(extra) > 10 else ""))
  if problems:
    raise _not_fid_inception(source, "; ".join(problems[:8]) +
                             (f"; ... {len(problems) - 8} more problems" if len(problems) > 8 else ""))
  return variables


def _torch_shape(spec, names) -> tuple[int, ...]:
  """The torch tensor shape of a Flax leaf (the kernel is [out, in, kh, kw] in torch)."""
  if names[-1] == "kernel":
    kh, kw, cin, cout = spec.shape
    return cout, cin, kh, kw
  return tuple(spec.shape)


def convert(checkpoint: str, out: str) -> str:
  """`.pth` file -> a parameter checkpoint directory (model_kind "inception_v3_fid")."""
  path = os.path.abspath(os.path.expanduser(checkpoint))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Inception weights {path} not found: download {WEIGHTS_FILE} from "
                            f"{WEIGHTS_URL} and pass its path as --checkpoint")
  variables = variables_from_state_dict(load_state_dict(path), source=path)
  return ckpt.save_params(out, variables, inception.experiment_config(),
                          {"source": "pytorch_fid_inception", "checkpoint": path})
