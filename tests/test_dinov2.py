"""The DINOv2 position-table resize against torch's bicubic interpolate (the one Hugging Face uses),
Hugging Face's skip rule, the (C, P, P) patch order, and config errors."""
import numpy as np
import pytest

from starflow2_jax.errors import UserError
from starflow2_jax.fae import dinov2 as dinov2_lib

torch = pytest.importorskip("torch")


def _torch_resize(table: np.ndarray, native: int, grid) -> np.ndarray:
  patch = torch.from_numpy(table[1:].reshape(1, native, native, -1)).permute(0, 3, 1, 2)
  out = torch.nn.functional.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
  return np.concatenate([table[:1], out.permute(0, 2, 3, 1).reshape(-1, table.shape[1]).numpy()])


@pytest.mark.parametrize("native,grid", [(37, (16, 16)), (4, (3, 5)), (4, (7, 2)), (5, (9, 9)),
                                         (16, (16, 16))])
def test_resize_matches_torch_bicubic(native, grid):
  table = np.random.default_rng(native).normal(size=(1 + native * native, 8)).astype(np.float32) * 3
  ours = dinov2_lib.resize_position_table(table, native, grid, (grid[0] * 14, grid[1] * 14))
  want = _torch_resize(table, native, grid)
  assert ours.dtype == np.float32 and ours.shape == want.shape
  np.testing.assert_allclose(ours, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


def test_hugging_face_skip_rule():
  table = np.random.default_rng(0).normal(size=(17, 4)).astype(np.float32)
  # same patch count and a square image: the table as it is (no resampling at all)
  np.testing.assert_array_equal(dinov2_lib.resize_position_table(table, 4, (4, 4), (56, 56)), table)
  # the same patch count on a non-square grid is resized (16 = 2 x 8 patches)
  resized = dinov2_lib.resize_position_table(table, 4, (2, 8), (28, 112))
  np.testing.assert_allclose(resized, _torch_resize(table, 4, (2, 8)), rtol=0, atol=1e-5)


def test_patchify_is_channel_then_pixel_order():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  got = np.asarray(dinov2_lib.patchify(x, 2))
  assert got.shape == (2, 6, 12)
  # patch (row 1, col 2) of image 1, flattened (C, P, P) as torch's Conv2d weight [D, C, P, P]
  want = x[1, 2:4, 4:6, :].transpose(2, 0, 1).reshape(-1)
  np.testing.assert_array_equal(got[1, 1 * 3 + 2], want)


def test_config_errors():
  with pytest.raises(UserError, match="dinov2.mlp='relu'"):
    dinov2_lib.Dinov2Config(hidden_size=8, num_layers=1, num_heads=2, mlp="relu")
  with pytest.raises(UserError, match=r"input_size=\(30, 28\).*multiples of dinov2.patch_size=14"):
    dinov2_lib.Dinov2Config(hidden_size=8, num_layers=1, num_heads=2, input_size=(30, 28))
  with pytest.raises(UserError, match=r"unknown field\(s\) \['depth'\]"):
    dinov2_lib.Dinov2Config.from_config({"hidden_size": 8, "num_layers": 1, "num_heads": 2, "depth": 3})
