"""MRC reading (modes 0, 1, 2, 6, 12), writing (float32, float16), pixel size, and errors."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from tamis.errors import InputFileError
from tamis.io.mrc import StackCache, open_stack, read_mrc, write_mrc


@pytest.mark.parametrize(
    ("dtype", "mode"),
    [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6), (np.float16, 12)],
)
def test_read_every_mode(tmp_path, dtype, mode):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(3, 6, 5)) * 20).astype(dtype)
    path = tmp_path / f"m{mode}.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = 1.25
    with open_stack(path) as stack:
        assert stack.shape == (3, 6, 5)
        assert stack.pixel_size == pytest.approx(1.25)
        assert mrcfile.open(path).header.mode == mode
        got = stack.read([2, 0])
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, data[[2, 0]].astype(np.float32))


@pytest.mark.parametrize("float16", [False, True])
def test_write_and_read_back(tmp_path, float16):
    data = np.linspace(-2, 2, 2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    path = tmp_path / "out.mrcs"
    write_mrc(path, data, 3.5, float16=float16)
    with mrcfile.open(path) as mrc:
        assert mrc.header.mode == (12 if float16 else 2)
        assert mrc.is_image_stack()
        assert float(mrc.voxel_size.x) == pytest.approx(3.5)
    back, apix = read_mrc(path)
    assert apix == pytest.approx(3.5)
    np.testing.assert_allclose(back, data, atol=2e-3 if float16 else 0)


def test_single_image_is_a_stack_of_one(tmp_path):
    write_mrc(tmp_path / "one.mrc", np.ones((4, 6), np.float32), 1.0)
    with open_stack(tmp_path / "one.mrc") as s:
        assert s.shape == (1, 4, 6)


def test_index_past_end_is_a_clear_error(tmp_path):
    write_mrc(tmp_path / "s.mrcs", np.zeros((3, 4, 4), np.float32), 1.0)
    with open_stack(tmp_path / "s.mrcs") as s, pytest.raises(InputFileError) as info:
        s.read([1, 3])
    assert "image 4 requested but the stack holds 3 image(s)" in str(info.value)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "t.mrcs"
    write_mrc(path, np.zeros((5, 16, 16), np.float32), 1.0)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 700])
    with pytest.raises(InputFileError) as info:
        open_stack(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "truncated MRC file" in msg and "\n" not in msg


def test_not_mrc_and_missing(tmp_path):
    (tmp_path / "x.mrc").write_bytes(b"hello" * 300)
    with pytest.raises(InputFileError, match="not a valid MRC file"):
        read_mrc(tmp_path / "x.mrc")
    with pytest.raises(InputFileError, match="file not found"):
        read_mrc(tmp_path / "nope.mrc")


def test_stack_cache_bounds_open_files(tmp_path):
    for i in range(5):
        write_mrc(tmp_path / f"{i}.mrcs", np.full((1, 2, 2), i, np.float32), 1.0)
    cache = StackCache(max_open=2)
    for i in range(5):
        assert cache.get(tmp_path / f"{i}.mrcs").read([0])[0, 0, 0] == i
    assert len(cache._open) == 2
    cache.close()
