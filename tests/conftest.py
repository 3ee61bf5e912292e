"""Test setup: 8 fake CPU devices and a compilation cache for the session, set before jax is imported
anywhere."""
import atexit
import os
import shutil
import tempfile

# 8 fake CPU devices; LLVM optimisation level 0 compiles the many tiny test programs ~3x faster.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") +
    " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session (and the subprocesses it starts, which inherit the
# environment): tests rebuild the same programs (a train step per train_and_evaluate call, a fixture's
# jitted function in a fresh closure), and XLA compiles each distinct program once. Removed at exit;
# a cache the caller set is used as is.
# Under pytest-xdist every worker keeps its own subfolder of the controller's cache (no two processes
# writing one entry at once).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="jax_test_cache_")
  atexit.register(shutil.rmtree, _cache, True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
if os.environ.get("PYTEST_XDIST_WORKER"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"],
                                                         os.environ["PYTEST_XDIST_WORKER"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import contextlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

import torchvision_cpu  # noqa: E402

torchvision_cpu.install()  # before anything imports transformers (which imports torchvision)

pytest_plugins = ("parity_guard",)  # a parity test skipped for want of torch & co. is listed; CI fails


# `-n auto` (pytest.ini; pytest-xdist): one test process per core this process may run on, at most
# MAX_WORKERS (each holds its own compiled programs and 8 fake devices: a few GiB of host memory).
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(MAX_WORKERS, cores or 1))


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
