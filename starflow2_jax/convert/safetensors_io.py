"""Lazy, per-tensor reads of a (sharded) safetensors checkpoint directory.

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets}}, then raw row-major data. Tensors are memory-mapped NumPy views, so a converter can slice
out what each device needs without holding the model in host memory. bfloat16 is read as
`ml_dtypes.bfloat16`: the dtype always comes from the file.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from starflow2_jax.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
PARAM_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}  # what an importer may write


def read_header(path: str) -> tuple[dict, int]:
  """-> ({name: {dtype, shape, data_offsets}}, byte offset where the data starts)."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise UserError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header, 8 + n


class SafetensorsDir:
  """All tensors of a checkpoint directory: a single `model.safetensors`, or the index + its shards.

  `shape(name)`, `dtype(name)` read only headers; `get(name)` returns a read-only memmap view.
  """

  def __init__(self, directory: str):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    index = os.path.join(self.directory, INDEX_FILE)
    single = os.path.join(self.directory, SINGLE_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
      missing = [s for s in files if not os.path.isfile(os.path.join(self.directory, s))]
      if missing:
        names = sorted(k for k, v in weight_map.items() if v == missing[0])
        raise FileNotFoundError(
            f"{self.directory}: {INDEX_FILE} lists {len(files)} shard(s) but {len(missing)} are "
            f"missing: {', '.join(missing)} (e.g. {missing[0]} should hold {names[:3]}); "
            "copy the complete checkpoint directory")
    elif os.path.isfile(single):
      files = [SINGLE_FILE]
    else:
      raise FileNotFoundError(f"{self.directory}: expected {SINGLE_FILE} or {INDEX_FILE}, found neither")
    self._entries: dict[str, tuple[str, dict, int]] = {}
    for shard in files:
      path = os.path.join(self.directory, shard)
      header, start = read_header(path)
      for name, info in header.items():
        self._entries[name] = (path, info, start)

  def keys(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name][1]["shape"])

  def dtype(self, name: str) -> np.dtype:
    code = self._entries[name][1]["dtype"]
    if code not in DTYPES:
      raise UserError(f"tensor {name}: unsupported safetensors dtype {code}")
    return np.dtype(DTYPES[code])

  def param_dtype(self, requested: str | None = None) -> str:
    """The parameter dtype an importer writes (a key of PARAM_DTYPES): `requested`, or for None the
    file's own, which must then be a single one of them."""
    if requested is None:
      stored = sorted({str(self.dtype(k)) for k in self._entries})
      if len(stored) != 1 or stored[0] not in PARAM_DTYPES:
        raise UserError(f"{self.directory}: tensors are stored as {stored}; pass dtype='bfloat16' or "
                        "'float32' to choose the parameter dtype")
      return stored[0]
    if requested not in PARAM_DTYPES:
      raise UserError(f"dtype: expected one of {sorted(PARAM_DTYPES)}, found {requested!r}")
    return requested

  def get(self, name: str) -> np.ndarray:
    path, info, start = self._entries[name]
    begin, end = info["data_offsets"]
    dtype, shape = self.dtype(name), tuple(info["shape"])
    if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise UserError(f"tensor {name} in {path}: {end - begin} bytes do not hold {shape} {dtype}")
    if not shape or end == begin:
      with open(path, "rb") as f:
        f.seek(start + begin)
        return np.frombuffer(f.read(end - begin), dtype).reshape(shape)
    return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
