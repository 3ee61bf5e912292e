"""tfds datasets without TensorFlow: read prepared `array_record` datasets with `tfds.data_source`,
and write any random-access source as such a dataset.

ImageNet and other catalogue datasets must be prepared by the user (array_record format) into a
`data_dir`; nothing is downloaded at run time. `write_tfds_dataset` stores images as uint8 tensors
(the tfds Image feature needs TensorFlow to encode), labels as int64 and captions as text.
"""
from __future__ import annotations

import io
import os
from typing import Mapping

import numpy as np


class TfdsSource:
  """Random-access source over `tfds.data_source(name, split, data_dir)`.

  Records come back as {"image": uint8 [H, W, C], "label": int32, "caption": str (if present)}.
  Encoded images (the tfds Image feature) are decoded with PIL.
  """

  def __init__(self, name: str, data_dir: str | None, split: str, image_key: str = "image",
               label_key: str = "label", caption_key: str = "caption"):
    import tensorflow_datasets as tfds  # local import: only this source needs tfds
    if not data_dir or not os.path.isdir(os.path.expanduser(data_dir)):
      raise FileNotFoundError(
          f"data.data_dir={data_dir!r} is not a directory: prepare the tfds dataset {name!r} in "
          "array_record format there first (e.g. `tfds build --file_format=array_record`), or write one "
          "with starflow2_jax.data.tfds_source.write_tfds_dataset")
    self.source = tfds.data_source(name, split=split, data_dir=os.path.expanduser(data_dir),
                                   decoders={image_key: tfds.decode.SkipDecoding()})
    self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    r = self.source[int(i)]
    img = r[self.image_key]
    if isinstance(img, (bytes, np.bytes_)):
      from PIL import Image
      img = np.asarray(Image.open(io.BytesIO(img)).convert("RGB"))
    img = np.asarray(img, dtype=np.uint8)
    out = {"image": img if img.ndim == 3 else img[..., None],
           "label": np.int32(r.get(self.label_key, -1))}
    if self.caption_key in r:
      cap = r[self.caption_key]
      out["caption"] = cap.decode("utf-8") if isinstance(cap, bytes) else str(cap)
    return out


def write_tfds_dataset(name: str, data_dir: str, splits: Mapping[str, object], image_shape: tuple,
                       num_classes: int, with_captions: bool = False, version: str = "1.0.0") -> str:
  """Write random-access sources (`len`, `[i]` -> record dict) as tfds dataset `name` (array_record).

  Returns the dataset directory. Refuses to write over an existing dataset version.
  """
  import tensorflow_datasets as tfds
  target = os.path.join(os.path.expanduser(data_dir), name, version)
  if os.path.exists(target):
    raise FileExistsError(f"{target} exists: refusing to overwrite a dataset; choose another name or version")
  feats = {"image": tfds.features.Tensor(shape=tuple(image_shape), dtype=np.uint8),
           "label": tfds.features.ClassLabel(num_classes=num_classes)}
  if with_captions:
    feats["caption"] = tfds.features.Text()

  def examples(src):
    for i in range(len(src)):
      r = src[i]
      ex = {"image": np.asarray(r["image"], np.uint8), "label": int(r["label"])}
      if with_captions:
        ex["caption"] = r.get("caption", "")
      yield i, ex

  # skip_registration: the builder is local, so a second call in one process must not clash in tfds's
  # global registry ("Dataset with name __builder already registered").
  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(version)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats))

    def _split_generators(self, dl_manager):
      return {k: examples(v) for k, v in splits.items()}

    def _generate_examples(self):  # every split is produced by _split_generators
      raise NotImplementedError

  _Builder.name = name
  builder = _Builder(data_dir=os.path.expanduser(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return target
