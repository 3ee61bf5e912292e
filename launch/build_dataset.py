"""Write a built-in dataset (or a caption folder) as a tfds array_record dataset, readable by
`--config.data.name=tfds --config.data.tfds_name=NAME --config.data.data_dir=DIR` on any machine.

  python -m launch.build_dataset --source=shapesworld --name=shapesworld32 --data_dir=/data/tfds \
      --image_size=32 [--num_train=20000 --num_test=1000 --exclude=red:circle,blue:square]
  python -m launch.build_dataset --source=digits --name=digits16 --data_dir=/data/tfds --image_size=16
  python -m launch.build_dataset --source=folder --dir=/data/my_images --name=mine --data_dir=/data/tfds \
      --image_size=64
"""
from absl import flags, logging

from starflow2_jax import entry
from starflow2_jax.errors import UserError

_SOURCE = flags.DEFINE_enum("source", None, ["digits", "shapesworld", "folder"], "what to write")
_NAME = flags.DEFINE_string("name", None, "tfds dataset name to write")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir to write into")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 16, "image side")
_CHANNELS = flags.DEFINE_integer("channels", 3, "1 or 3 (digits, folder)")
_DIR = flags.DEFINE_string("dir", "", "folder source: directory with captions.jsonl")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 20000, "shapesworld: train records")
_NUM_TEST = flags.DEFINE_integer("num_test", 1000, "shapesworld: test records")
_SEED = flags.DEFINE_integer("seed", 0, "shapesworld: dataset seed")
_EXCLUDE = flags.DEFINE_list("exclude", [], "shapesworld: colour:kind pairs kept out of train")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "folder: number of label classes")
flags.mark_flags_as_required(["source", "name", "data_dir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  from starflow2_jax.data import digits, shapesworld
  from starflow2_jax.data.folder import FolderSource
  from starflow2_jax.data.tfds_source import write_tfds_dataset
  size, ch = _IMAGE_SIZE.value, _CHANNELS.value
  if _SOURCE.value == "digits":
    splits = {s: digits.DigitsSource(s, size, ch) for s in ("train", "test")}
    classes, captions = 10, False
  elif _SOURCE.value == "shapesworld":
    exclude = [tuple(e.split(":")) for e in _EXCLUDE.value]
    splits = {"train": shapesworld.ShapesWorldSource("train", size, _NUM_TRAIN.value, _SEED.value, exclude),
              "test": shapesworld.ShapesWorldSource("test", size, _NUM_TEST.value, _SEED.value, exclude)}
    classes, captions, ch = len(shapesworld.KINDS), True, 3
  else:
    splits = {"train": FolderSource(_DIR.value, size, ch)}
    classes, captions = _NUM_CLASSES.value, True
  path = write_tfds_dataset(_NAME.value, _DATA_DIR.value, splits, (size, size, ch), classes, captions)
  logging.info("wrote %s", path)
  print(path)


if __name__ == "__main__":
  entry.run(main)
