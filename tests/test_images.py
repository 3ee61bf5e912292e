"""One image-grid rule (`images.grid_upscale`) for training samples and `launch.sample`: small cells are
enlarged by nearest neighbour to a readable size, large ones stay native."""
import numpy as np
import pytest
from PIL import Image

from starflow2_jax import images, logging_utils


def _digits(n=20, side=16, channels=1, seed=0):
  """[n, side, side, channels] floats in [-1, 1], on the uint8 grid so the round trip is exact."""
  u8 = np.random.default_rng(seed).integers(0, 256, (n, side, side, channels))
  return u8 / 127.5 - 1.0


@pytest.mark.parametrize("side,factor", [(8, 16), (16, 8), (32, 4), (50, 2), (64, 2), (100, 1), (256, 1)])
def test_grid_upscale_makes_cells_readable(side, factor):
  assert images.grid_upscale(side, side) == factor
  cell = side * factor
  assert images.READABLE_CELL_PX // 2 <= cell <= images.READABLE_CELL_PX or factor == 1


def test_grid_upscale_follows_the_longer_side():
  assert images.grid_upscale(16, 48) == images.grid_upscale(48, 16) == 2


def test_twenty_small_digits_are_written_readable(tmp_path):
  x = _digits()
  path = images.save_grid(str(tmp_path / "samples.png"), x)
  grid = images.make_grid(images.to_uint8(x))  # 4 rows x 5 columns of 16 px + 2 px padding
  assert grid.shape == (4 * 18 + 2, 5 * 18 + 2, 1)
  png = np.asarray(Image.open(path))
  assert png.shape == (8 * grid.shape[0], 8 * grid.shape[1])  # 592 x 736, not 74 x 92
  np.testing.assert_array_equal(png, np.repeat(np.repeat(grid[..., 0], 8, 0), 8, 1))  # nearest


def test_large_images_stay_native_and_explicit_upscale_wins(tmp_path):
  big = _digits(n=2, side=160, channels=3)
  png = np.asarray(Image.open(images.save_grid(str(tmp_path / "big.png"), big)))
  np.testing.assert_array_equal(png, images.make_grid(images.to_uint8(big)))
  small = _digits(n=2)
  png = np.asarray(Image.open(images.save_grid(str(tmp_path / "native.png"), small, upscale=1)))
  np.testing.assert_array_equal(png, images.make_grid(images.to_uint8(small))[..., 0])


def test_training_writer_follows_the_same_rule(tmp_path):
  x = _digits(n=6, side=32, channels=3, seed=1)
  a = logging_utils.write_png_grid(str(tmp_path / "train.png"), x)
  b = images.save_grid(str(tmp_path / "sample.png"), x)
  np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
  assert Image.open(a).size == (4 * (3 * 34 + 2), 4 * (2 * 34 + 2))
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    logging_utils.write_png_grid(a, x)
