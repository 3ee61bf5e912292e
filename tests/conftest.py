"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""
import os

# 8 fake CPU devices; LLVM optimisation level 0 compiles the many tiny test programs ~3x faster.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") +
    " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

import torchvision_cpu  # noqa: E402

torchvision_cpu.install()  # before anything imports transformers (which imports torchvision)

pytest_plugins = ("parity_guard",)  # a parity test skipped for want of torch & co. is listed; CI fails


@contextlib.contextmanager
def _x64():
  prev = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", prev)


@pytest.fixture
def x64():
  """Run the test body with float64 enabled, restored afterwards."""
  with _x64():
    yield
