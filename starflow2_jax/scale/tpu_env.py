"""Keep libtpu quiet on a machine without TPU chips (a CPU box with the `[tpu]` extra installed).

Without TPU chips, JAX still loads libtpu when it first lists devices (and when a TPU topology is
built for ahead-of-time compilation); libtpu then looks for the slice's hosts, finds none, and prints
`Failed to find host bounds...` and an `INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES` error before JAX
falls back to the CPU. Naming this host as the only worker of a one-host slice answers those queries.
A second process loading libtpu would fail on libtpu's lock file; without chips there is nothing to
lock, so several may load it.
Nothing changes on a TPU VM (chips present) or where the user has set any of the variables.
"""
from __future__ import annotations

import importlib.util
import os

# The slice libtpu is told about on a machine without chips: this host alone; and, as no chip is
# driven, any number of processes may load libtpu at once (compiles side by side, tests).
QUIET_ENV = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1",
             "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
SLICE_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS")  # a user who sets these describes a slice
GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips appear as PCI devices of this vendor (jax hardware_utils)
PCI_DEVICES = "/sys/bus/pci/devices"


def has_tpu_chips() -> bool:
  """Does this machine have TPU chips (PCI devices of Google's vendor id, or /dev/accel* / vfio)?"""
  try:
    for dev in os.listdir(PCI_DEVICES):
      with open(os.path.join(PCI_DEVICES, dev, "vendor")) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
  except OSError:
    pass
  return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))


def quiet_without_tpu() -> bool:
  """Set `QUIET_ENV` (each variable the user has not set) when libtpu is installed, this machine has no
  TPU chips and the user describes no slice (`SLICE_VARS`). Call before JAX first lists devices.
  Returns True if it set them."""
  if any(k in os.environ for k in SLICE_VARS) or importlib.util.find_spec("libtpu") is None:
    return False
  if has_tpu_chips():
    return False
  for k, v in QUIET_ENV.items():
    os.environ.setdefault(k, v)
  return True
