"""The grain input pipeline: global-order batches, per-host slices, checkpointable iterator state.

Order. Element k of the infinite training stream is record `perm_e[k mod N]`, where e = k div N is the
epoch and `perm_e` a permutation drawn from (seed, e). Global batch s holds stream elements
[s*B, (s+1)*B); process p loads rows [p*B/P, (p+1)*B/P) of it. So the global batch, its order and every
augmentation (drawn from (seed, k)) are independent of the number of processes and of worker threads,
the processes' shards are disjoint and together cover each epoch, and the iterator state is the step
(`iterator_state`), so a checkpoint restores onto any number of processes.

Records. A source's record is a dict: {"image": uint8 [S, S, C], "label": int32} plus whatever text the
dataset has ("caption"; ShapesWorld also "questions", "answers"); a multi-image record (the Pretzel
examples) holds "images", a list of them, and a packed record holds "records", a list of records. The
pipeline checks every image's shape and applies the augmentation (flip, one draw for all the record's
images) to them, then hands the whole record to the task's `transform` (a picklable
`record -> {name: numpy array}`, e.g. a tokenizer of captions), so batches hold what the task's step
needs: the stacked transform outputs [b, ...], plus INDEX_KEY (int64 [b], the record's index in its
source, for tests and debugging; the loop does not feed it to the step). Training records reach the
transform with ELEMENT_KEY (int64, the stream position k), from which a transform draws its own seeded
augmentation (e.g. caption dropout); held-out records (`eval_batches`) have none: no augmentation.

Sources. `data.name` picks a built-in source, or one of EXTERNAL_SOURCES: a builder
`build(data, split) -> source` of an upper package, imported on demand (so this module imports none).
data.pack > 1 groups data.pack consecutive records of the source into one packed record (`Packed`), in
every split; a task whose transform reads packed records (`Task.packs`) fills one row with them.
"""
from __future__ import annotations

import functools
import importlib
import sys
from typing import Callable

import grain
import ml_collections
import numpy as np

from starflow2_jax.data import shapesworld
from starflow2_jax.data.digits import DigitsSource
from starflow2_jax.errors import UserError
from starflow2_jax.data.folder import FolderSource
from starflow2_jax.data.tfds_source import TfdsSource

# Sources of upper packages, by data.name: "module:function", imported on demand (no import cycle).
EXTERNAL_SOURCES = {"pretzel": "starflow2_jax.pretzel.examples:build_source"}
DATASETS = ("digits", "shapesworld", "folder", "tfds", *EXTERNAL_SOURCES)
_FLIP_STREAM = 1  # sub-stream id of the flip draws in the (seed, element, stream) RNG
INDEX_KEY = "index"  # batches' record indices (not a task field)
ELEMENT_KEY = "element"  # a training record's stream position, for the transform's own seeded draws
RECORDS_KEY = "records"  # a packed record's list of records


def default_data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "name": "digits",
      "image_size": 16,
      "channels": 1,
      "flip": False,
      "train_split": "train",
      "eval_split": "test",
      "worker_count": 0,  # grain worker processes (0: in the main process)
      "prefetch": 2,  # batches prefetched by threads
      "dir": "",  # folder: the directory with captions.jsonl
      "tfds_name": "",  # tfds: dataset name
      "data_dir": "",  # tfds: the array_record data_dir
      "shapes_num_train": 20000,
      "shapes_num_test": 1000,
      "shapes_seed": 0,
      "shapes_exclude": [],  # [[colour, kind], ...] kept out of the train split
      "shapes_layout": "free",  # free | grid (shapes in named 3 x 3 grid cells: data/shapesworld.py)
      "pack": 1,  # records per row (> 1: packed records, `Packed`)
  })


class Packed:
  """Record j = {"records": records [j * pack, (j + 1) * pack) of `source`}: one packed row."""

  def __init__(self, source, pack: int):
    if len(source) < pack:
      raise UserError(f"data.pack={pack}: the source has only {len(source)} records")
    self.source, self.pack = source, int(pack)

  def __len__(self) -> int:
    return len(self.source) // self.pack

  def __getitem__(self, j: int) -> dict:
    return {RECORDS_KEY: [self.source[int(j) * self.pack + m] for m in range(self.pack)]}


def pack_size(data: ml_collections.ConfigDict) -> int:
  """data.pack (1 when absent), checked."""
  pack = int(data.get("pack", 1))
  if pack < 1:
    raise UserError(f"data.pack={pack}: expected the number of records per row, >= 1")
  return pack


def _source(data: ml_collections.ConfigDict, split: str):
  if data.name == "digits":
    return DigitsSource(split, data.image_size, data.channels)
  if data.name == "shapesworld":
    return shapesworld.from_config(data, split)
  if data.name == "folder":
    return FolderSource(data.dir, data.image_size, data.channels)
  if data.name == "tfds":
    return TfdsSource(data.tfds_name, data.data_dir, split)
  if data.name in EXTERNAL_SOURCES:
    module, builder = EXTERNAL_SOURCES[data.name].split(":")
    return getattr(importlib.import_module(module), builder)(data, split)
  raise UserError(f"data.name={data.name!r}: expected one of {DATASETS}")


def build_source(data: ml_collections.ConfigDict, split: str):
  """The random-access source named by `data.name` for a split, its records packed by data.pack."""
  source, pack = _source(data, split), pack_size(data)
  return Packed(source, pack) if pack > 1 else source


def _checked_image(img, i: int, image_shape: tuple) -> np.ndarray:
  img = np.asarray(img)
  if img.shape != image_shape:
    raise UserError(f"record {i}: image shape {img.shape}, expected {image_shape} from "
                    "data.image_size and data.channels")
  return img


def _map_images(record: dict, fn: Callable[[np.ndarray], np.ndarray]) -> dict:
  """A copy of the record with fn applied to "image", every entry of "images" and, inside "records",
  to every sub-record's images."""
  r = dict(record)
  if "image" in r:
    r["image"] = fn(r["image"])
  if "images" in r:
    r["images"] = [fn(im) for im in r["images"]]
  if RECORDS_KEY in r:
    r[RECORDS_KEY] = [_map_images(sub, fn) for sub in r[RECORDS_KEY]]
  return r


def _stack(rows: list[dict]) -> dict:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class GlobalBatchLoader:
  """Maps a step s to this process's rows of global batch s (picklable: grain may run it in workers)."""

  def __init__(self, source, global_batch: int, seed: int, image_shape: tuple, flip: bool,
               transform: Callable[[dict], dict], process_index: int, process_count: int):
    self.source, self.global_batch, self.seed, self.flip = source, global_batch, seed, flip
    self.transform = transform
    self.image_shape = tuple(image_shape)
    self.per_host = global_batch // process_count
    self.offset = process_index * self.per_host

  @functools.lru_cache(maxsize=2)
  def _perm(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.source))

  def element(self, k: int) -> dict:
    """Stream element k (global position): the task's transform of the augmented record."""
    n = len(self.source)
    i = int(self._perm(k // n)[k % n])
    r = _map_images(self.source[i], lambda im: _checked_image(im, i, self.image_shape))
    if self.flip and np.random.default_rng([self.seed, k, _FLIP_STREAM]).random() < 0.5:
      r = _map_images(r, lambda im: im[:, ::-1])
    r[ELEMENT_KEY] = np.int64(k)
    return {**self.transform(r), INDEX_KEY: np.int64(i)}

  def __call__(self, step: int) -> dict:
    start = int(step) * self.global_batch + self.offset
    return _stack([self.element(k) for k in range(start, start + self.per_host)])


def _image_shape(data: ml_collections.ConfigDict) -> tuple[int, int, int]:
  return (int(data.image_size), int(data.image_size), int(data.channels))


def train_iterator(data: ml_collections.ConfigDict, source, global_batch: int, seed: int,
                   transform: Callable[[dict], dict], process_index: int = 0, process_count: int = 1):
  """A checkpointable grain iterator over this process's slices of the global training batches,
  each record passed through `transform` (the task's `record_transform`)."""
  if global_batch % process_count:
    raise UserError(f"train.batch_size={global_batch} is not divisible by {process_count} processes")
  loader = GlobalBatchLoader(source, global_batch, seed, _image_shape(data), data.flip, transform,
                             process_index, process_count)
  ds = grain.MapDataset.range(sys.maxsize).map(loader)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, data.prefetch),
                                               prefetch_buffer_size=data.prefetch))
  if data.worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
  return iter(it_ds)


def iterator_state(step: int) -> dict:
  """The state of a `train_iterator` about to yield global batch `step` (the same on every process)."""
  return {"next_index": int(step)}


def eval_batches(data: ml_collections.ConfigDict, source, batch_size: int,
                 transform: Callable[[dict], dict], limit: int | None = None):
  """The held-out split in order, no augmentation: yields the stacked `transform` outputs of up to
  `batch_size` records (the last batch possibly smaller; no INDEX_KEY)."""
  n = len(source) if limit is None else min(limit, len(source))
  shape = _image_shape(data)
  for start in range(0, n, batch_size):
    rows = []
    for i in range(start, min(n, start + batch_size)):
      rows.append(transform(_map_images(source[i], lambda im, i=i: _checked_image(im, i, shape))))
    yield _stack(rows)

