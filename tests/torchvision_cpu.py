"""Let the PyPI torchvision wheel import next to the CPU build of torch (tests only).

That wheel's C++ ops link CUDA libraries which the CPU torch lacks, so `torchvision/_C.so` does not
load and `import torchvision` dies in `torchvision._meta_registrations` ("operator torchvision::nms
does not exist"). transformers imports torchvision whenever it is installed, so this would break every
Hugging Face parity test, not only the Inception one. The pure-Python models the tests use (pytorch-fid's
InceptionV3 is built on torchvision.models.inception) need none of those ops, so an import hook replaces
the meta-registration module (fake-tensor kernels of the detection ops) by an empty one. Nothing is
imported eagerly; with a torchvision whose ops do load, only those fake kernels are missing.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

_MODULE = "torchvision._meta_registrations"


class _EmptyMetaRegistrations(importlib.abc.MetaPathFinder, importlib.abc.Loader):

  def find_spec(self, name, path, target=None):
    return importlib.machinery.ModuleSpec(name, self) if name == _MODULE else None

  def create_module(self, spec):
    return types.ModuleType(spec.name)

  def exec_module(self, module):
    pass


def install() -> None:
  if not any(isinstance(f, _EmptyMetaRegistrations) for f in sys.meta_path):
    sys.meta_path.insert(0, _EmptyMetaRegistrations())
