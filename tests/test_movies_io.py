"""Movie reading (MRC modes, TIFF with RELION's Y flip, IMOD 4-bit pages, EER through an
independent encoder written here), gain rotation/flip maps, the EER gain rule, defects and the
seeded hot-pixel repair."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import tifffile

from tamis.errors import InputFileError, TamisError
from tamis.io.movies import (
    fill_bad_pixels,
    hot_pixel_mask,
    open_movie,
    read_defects,
    read_gain,
    transform_gain,
    unpack_4bit,
)
from tests.helpers import write_eer


def _frames(n=3, h=6, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 100, size=(n, h, w))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.float32, np.uint16, np.float16])
def test_mrc_movies_of_every_mode(tmp_path, dtype):
    data = _frames().astype(dtype)
    p = tmp_path / "m.mrcs"
    with mrcfile.new(p) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 0.83
    with open_movie(p) as m:
        assert (m.n_frames, m.shape) == (3, (6, 8))
        assert m.pixel_size == pytest.approx(0.83, abs=1e-6)
        np.testing.assert_array_equal(m.read(1, 3), data[1:3].astype(np.float32))


def test_tiff_pages_are_flipped_upside_down_as_relion_reads_them(tmp_path):
    data = _frames().astype(np.uint8)
    p = tmp_path / "m.tif"
    with tifffile.TiffWriter(p) as tif:
        for f in data:
            tif.write(f, compression="zlib", resolution=(1e8 / 1.1, 1e8 / 1.1),
                      resolutionunit="CENTIMETER")  # fmt: skip
    with open_movie(p) as m:
        got = m.read()
        assert m.pixel_size == pytest.approx(1.1)
    # row 0 of the page (top of a TIFF) is the last row of the frame (bottom-left origin)
    for i in range(3):
        for r in range(6):
            np.testing.assert_array_equal(got[i, r], data[i, 5 - r])


def test_unpack_4bit_low_nibble_first():
    page = np.array([[0x21, 0xF3], [0x0A, 0x50]], dtype=np.uint8)
    expect = np.array([[1, 2, 3, 15], [10, 0, 0, 5]], dtype=np.uint8)
    np.testing.assert_array_equal(unpack_4bit(page), expect)


def test_mixed_frame_sizes_and_truncated_files_are_refused(tmp_path):
    p = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(p) as tif:
        tif.write(np.zeros((6, 8), np.uint8))
        tif.write(np.zeros((6, 8), np.uint8))
        tif.write(np.zeros((8, 8), np.uint8))
    with pytest.raises(InputFileError, match="frame 3"):
        open_movie(p)
    q = tmp_path / "cut.mrc"
    with mrcfile.new(q) as mrc:
        mrc.set_data(np.zeros((4, 16, 16), np.float32))
    q.write_bytes(q.read_bytes()[:-100])
    with pytest.raises(InputFileError, match="truncated"):
        open_movie(q)
    with pytest.raises(InputFileError, match="unknown movie format"):
        (tmp_path / "a.dat").write_bytes(b"x")
        open_movie(tmp_path / "a.dat")


# ---- EER (the encoder is tests/helpers.write_eer) ----------------------------------------


def test_eer_fractions_and_8k_rendering(tmp_path):
    side, n_raw, grouping = 32, 7, 3
    rng = np.random.default_rng(3)
    events = []
    for _ in range(n_raw):
        pos = np.sort(rng.choice(side * side, 60, replace=False))
        events.append((pos, rng.integers(0, 16, pos.size)))
    p = tmp_path / "m.eer"
    write_eer(p, events, side)
    with open_movie(p, eer_grouping=grouping) as m:
        assert m.n_frames == n_raw // grouping  # the remainder (1 raw frame) is dropped
        got = m.read()
    for f in range(m.n_frames):
        expect = np.zeros((side, side))
        for raw in range(f * grouping, (f + 1) * grouping):
            pos = events[raw][0]
            np.add.at(expect, (pos // side, pos % side), 1)
        np.testing.assert_array_equal(got[f], expect)
    # 8K rendering (RELION's rule): x = 2 (pos % W) + bit 1 of the symbol, y = 2 (pos // W) +
    # bit 3
    with open_movie(p, eer_grouping=1, eer_upsampling=2) as m:
        assert m.shape == (2 * side, 2 * side)
        got = m.read(0, 1)[0]
    pos, sym = events[0]
    expect = np.zeros((2 * side, 2 * side))
    np.add.at(
        expect, (2 * (pos // side) + ((sym >> 3) & 1), 2 * (pos % side) + ((sym >> 1) & 1)), 1
    )
    np.testing.assert_array_equal(got, expect)
    with pytest.raises(InputFileError, match="eer_grouping"):
        open_movie(p, eer_grouping=0)


# ---- gain ---------------------------------------------------------------------------------


def test_gain_rotation_and_flip_follow_relion_numbering():
    g = np.arange(6, dtype=np.float32).reshape(2, 3)  # [[0 1 2] [3 4 5]]
    # --gain_rot 1: 90 degrees clockwise with row 0 shown on top
    np.testing.assert_array_equal(transform_gain(g, 1, 0), [[3, 0], [4, 1], [5, 2]])
    np.testing.assert_array_equal(transform_gain(g, 2, 0), [[5, 4, 3], [2, 1, 0]])
    np.testing.assert_array_equal(transform_gain(g, 3, 0), [[2, 5], [1, 4], [0, 3]])
    np.testing.assert_array_equal(transform_gain(g, 0, 1), [[3, 4, 5], [0, 1, 2]])
    np.testing.assert_array_equal(transform_gain(g, 0, 2), [[2, 1, 0], [5, 4, 3]])
    # rotation first, then the flip
    np.testing.assert_array_equal(transform_gain(g, 1, 1), [[5, 2], [4, 1], [3, 0]])
    with pytest.raises(TamisError, match="gain_rot"):
        transform_gain(g, 4, 0)


def test_gain_files_and_the_eer_rule(tmp_path):
    g = np.array([[1.0, 2.0], [4.0, 0.0]], np.float32)
    with mrcfile.new(tmp_path / "g.mrc") as mrc:
        mrc.set_data(g)
    np.testing.assert_array_equal(read_gain(tmp_path / "g.mrc"), g)
    tifffile.imwrite(tmp_path / "g.tif", g)
    np.testing.assert_array_equal(read_gain(tmp_path / "g.tif"), g[::-1])
    # EER: an MRC gain is divisive: mean of the non-zero values over the gain, zero kept
    eer = read_gain(tmp_path / "g.mrc", eer=True)
    np.testing.assert_allclose(eer, [[7 / 3, 7 / 6], [7 / 12, 0.0]], rtol=1e-6)
    # EER: EPU's .gain (TIFF) multiplies, without the TIFF flip
    tifffile.imwrite(tmp_path / "g.gain", g)
    np.testing.assert_array_equal(read_gain(tmp_path / "g.gain", eer=True), g)


def test_defect_files(tmp_path):
    (tmp_path / "d.txt").write_text("1 0 2 1\n# comment\n0 3 1 2\n")
    mask = read_defects(tmp_path / "d.txt", (5, 4))
    expect = np.zeros((5, 4), bool)
    expect[0, 1:3] = True
    expect[3:5, 0] = True
    np.testing.assert_array_equal(mask, expect)
    (tmp_path / "s.txt").write_text("CameraSize 4096 4096\nBadColumns 3\n")
    with pytest.raises(InputFileError, match="clip defect"):
        read_defects(tmp_path / "s.txt", (5, 4))
    with mrcfile.new(tmp_path / "d.mrc") as mrc:
        mrc.set_data(expect.astype(np.int8))
    np.testing.assert_array_equal(read_defects(tmp_path / "d.mrc", (5, 4)), expect)
    with pytest.raises(InputFileError, match="defect map"):
        read_defects(tmp_path / "d.mrc", (4, 4))


def test_hot_pixels_and_seeded_repair():
    rng = np.random.default_rng(0)
    frames = rng.poisson(2.0, size=(10, 40, 40)).astype(np.float32)
    frames[:, 5, 7] += 50
    hot = hot_pixel_mask(frames.sum(0))
    assert hot[5, 7] and hot.sum() == 1
    bad = hot.copy()
    bad[0, 0] = True  # a corner: fewer neighbours, still more than 6
    a, b = frames.copy(), frames.copy()
    fill_bad_pixels(a, bad, seed=1)
    fill_bad_pixels(b, bad, seed=1)
    np.testing.assert_array_equal(a, b)  # reproducible
    for y, x in ((5, 7), (0, 0)):
        # every frame takes the same good neighbour within 2 px (slow check over the window)
        match = [
            (yy, xx)
            for yy in range(max(0, y - 2), min(40, y + 3))
            for xx in range(max(0, x - 2), min(40, x + 3))
            if not bad[yy, xx] and np.array_equal(a[:, y, x], frames[:, yy, xx])
        ]
        assert match, (y, x)
    untouched = ~bad
    np.testing.assert_array_equal(a[:, untouched], frames[:, untouched])


def test_motion_correction_of_an_eer_movie(tmp_path, monkeypatch):
    """An EER movie through motion correction: fractions of --eer_grouping raw frames, RELION's
    EER labels in the per-movie STAR."""
    import pandas as pd

    from tamis.io.star import read_star, write_star
    from tamis.prep.motioncorr import MotionCorrOptions, run_motioncorr

    side, n_raw = 64, 30
    rng = np.random.default_rng(4)
    events = []
    for _ in range(n_raw):
        pos = np.sort(rng.choice(side * side, 400, replace=False))
        events.append((pos, rng.integers(0, 16, pos.size)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Movies").mkdir()
    write_eer(tmp_path / "Movies" / "m.eer", events, side)
    write_star(
        {
            "optics": pd.DataFrame(
                {
                    "rlnOpticsGroupName": ["g"],
                    "rlnOpticsGroup": [1],
                    "rlnMicrographOriginalPixelSize": [1.0],
                    "rlnVoltage": [300.0],
                }
            ),  # fmt: skip
            "movies": pd.DataFrame(
                {"rlnMicrographMovieName": ["Movies/m.eer"], "rlnOpticsGroup": [1]}
            ),  # fmt: skip
        },
        "movies.star",
    )
    o = MotionCorrOptions(eer_grouping=10, dose_per_frame=1.0)
    star = run_motioncorr("movies.star", "MC", o, log=lambda s: None)
    assert len(read_star(star)["micrographs"]) == 1
    g = read_star("MC/Movies/m.star")["general"]
    assert (g["rlnImageSizeZ"], g["rlnEERGrouping"], g["rlnEERUpsampling"]) == (3, 10, 1)


def test_eer_with_a_page_chain_looping_back_is_read_once(tmp_path):
    """A corrupt EER whose last page points back at the first (found by the fuzzer: following
    the chain ran until memory ran out): the pages are counted once, quickly."""
    import signal
    import struct

    side, rng = 16, np.random.default_rng(5)
    events = [(np.sort(rng.choice(side * side, 10, replace=False)), rng.integers(0, 16, 10))
              for _ in range(4)]  # fmt: skip
    p = tmp_path / "loop.eer"
    write_eer(p, events, side)
    with tifffile.TiffFile(p) as tif:
        first, last = tif.pages[0].offset, tif.pages[-1].offset
    data = bytearray(p.read_bytes())
    n_tags = struct.unpack_from("<Q", data, last)[0]  # BigTIFF: 8-byte count, 20-byte entries
    struct.pack_into("<Q", data, last + 8 + 20 * n_tags, first)
    p.write_bytes(bytes(data))

    def hang(signum, frame):
        raise TimeoutError("the page chain was followed round and round")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        with open_movie(p, eer_grouping=2) as m:
            assert m.n_frames == 2
            assert m.read().shape == (2, side, side)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
