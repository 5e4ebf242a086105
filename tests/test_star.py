"""STAR reading and writing: round trips of real RELION files, dialects, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tamis.errors import InputFileError
from tamis.io.star import (
    format_image_names,
    parse_image_names,
    read_data_star,
    read_star,
    write_data_star,
    write_star,
)

DATA = Path(__file__).parent / "data" / "star"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "star"
STAR_FILES = sorted(DATA.glob("*.star"))


def assert_same_blocks(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        x, y = a[name], b[name]
        assert type(x) is type(y), name
        if isinstance(x, pd.DataFrame):
            assert list(x.columns) == list(y.columns)
            assert len(x) == len(y)
            for col in x.columns:
                if pd.api.types.is_numeric_dtype(x[col]):
                    np.testing.assert_array_equal(x[col].to_numpy(), y[col].to_numpy())
                else:
                    assert x[col].astype(str).tolist() == y[col].astype(str).tolist()
        else:
            assert x == y


@pytest.mark.parametrize("path", STAR_FILES, ids=[p.name for p in STAR_FILES])
def test_round_trip_keeps_blocks_columns_values(path, tmp_path):
    blocks = read_star(path)
    out = tmp_path / path.name
    write_star(blocks, out)
    assert_same_blocks(blocks, read_star(out))


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside this checkout")
def test_round_trip_of_every_shared_star_file(tmp_path):
    files = sorted(SHARED.glob("*.star"))
    assert files
    for path in files:
        blocks = read_star(path)
        write_star(blocks, tmp_path / path.name)
        assert_same_blocks(blocks, read_star(tmp_path / path.name))


def test_relion_layout_details(tmp_path):
    table = pd.DataFrame(
        {
            "rlnImageName": ["000001@a b.mrcs", "000002@x.mrcs"],
            "rlnFoo": ["", "y"],
            "rlnX": [1.5, 2],
        }
    )
    blocks = {"general": {"rlnText": "two words", "rlnN": np.int64(3)}, "particles": table}
    path = tmp_path / "t.star"
    write_star(blocks, path)
    text = path.read_text()
    assert '"two words"' in text and '"000001@a b.mrcs"' in text and '""' in text
    # Each loop ends with an empty line (RELION ends a table at the first blank line).
    lines = text.splitlines()
    last_row = max(
        i for i, line in enumerate(lines) if line.startswith('"000001') or "x.mrcs" in line
    )
    assert lines[last_row + 1].strip() == "" if last_row + 1 < len(lines) else True
    back = read_star(path)
    assert back["general"]["rlnText"] == "two words"
    assert back["particles"]["rlnFoo"].fillna("").tolist() == ["", "y"]
    # Unknown labels survive.
    assert "rlnFoo" in back["particles"].columns


def test_float_values_survive_exactly(tmp_path):
    vals = np.array([1.929012e-06, 0.1, 1e30, -3.25, 12345.678901])
    write_star({"t": pd.DataFrame({"rlnV": vals})}, tmp_path / "f.star")
    np.testing.assert_array_equal(read_star(tmp_path / "f.star")["t"]["rlnV"].to_numpy(), vals)


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "keep.star"
    write_star({"a": {"rlnX": 1}}, path)
    with pytest.raises(TypeError):
        write_star({"a": 42}, path)  # type: ignore[dict-item]
    assert read_star(path) == {"a": {"rlnX": 1}}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.star"]


def test_relion31_data_file(tmp_path):
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["g1", "g2"],
            "rlnOpticsGroup": [1, 2],
            "rlnVoltage": [300.0, 200.0],
            "rlnSphericalAberration": [2.7, 2.7],
            "rlnAmplitudeContrast": [0.1, 0.1],
            "rlnImagePixelSize": [1.0, 1.2],
            "rlnImageSize": [64, 64],
        }
    )
    parts = pd.DataFrame({"rlnImageName": ["1@s.mrcs", "2@s.mrcs"], "rlnOpticsGroup": [1, 2]})
    write_star({"optics": optics, "particles": parts}, tmp_path / "p.star")
    data = read_data_star(tmp_path / "p.star")
    assert data.kind == "particles" and not data.converted_from_30
    assert data.optics["rlnImagePixelSize"].tolist() == [1.0, 1.2]
    write_data_star(data, tmp_path / "q.star")
    assert list(read_star(tmp_path / "q.star")) == ["optics", "particles"]


def test_relion30_file_is_converted(tmp_path):
    path = tmp_path / "old.star"
    path.write_text(
        "\ndata_\n\nloop_\n_rlnImageName #1\n_rlnVoltage #2\n_rlnSphericalAberration #3\n"
        "_rlnAmplitudeContrast #4\n_rlnDetectorPixelSize #5\n_rlnMagnification #6\n"
        "_rlnOriginX #7\n_rlnOriginY #8\n_rlnDefocusU #9\n"
        "1@a.mrcs 300 2.7 0.1 14.0 100000 2.0 -1.0 10000\n"
        "2@a.mrcs 300 2.7 0.1 14.0 100000 0.5 0.0 11000\n"
        "1@b.mrcs 200 2.0 0.07 14.0 100000 1.0 1.0 12000\n\n"
    )
    data = read_data_star(path)
    assert data.converted_from_30 and data.kind == "particles"
    assert len(data.optics) == 2
    assert data.optics["rlnImagePixelSize"].tolist() == [1.4, 1.4]
    assert data.table["rlnOpticsGroup"].tolist() == [1, 1, 2]
    np.testing.assert_allclose(data.table["rlnOriginXAngst"], [2.8, 0.7, 1.4])
    np.testing.assert_allclose(data.table["rlnOriginYAngst"], [-1.4, 0.0, 1.4])
    assert "rlnVoltage" not in data.table and "rlnOriginX" not in data.table


def test_image_names():
    idx, paths = parse_image_names(["000001@Extract/a.mrcs", "12@b.mrcs", "c.mrc"])
    assert idx.tolist() == [0, 11, 0]
    assert paths.tolist() == ["Extract/a.mrcs", "b.mrcs", "c.mrc"]
    assert format_image_names([0, 9], "s.mrcs") == ["000001@s.mrcs", "000010@s.mrcs"]
    with pytest.raises(ValueError, match="bad image name"):
        parse_image_names(["0@a.mrcs"])
    with pytest.raises(ValueError, match="bad image name"):
        parse_image_names(["x@a.mrcs"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        ("data_\nloop_\n_rlnX #1\n1\r\n2\r\n", "CR+LF"),
        ("just words\n", "not a STAR file"),
        (
            "data_optics\nloop_\n_rlnOpticsGroup #1\n_rlnVoltage #2\n1 300\n\n"
            "data_particles\nloop_\n_rlnImageName #1\n1@a.mrcs\n\n",
            "lacks required column(s) rlnSphericalAberration",
        ),
    ],
)
def test_errors_are_one_line_and_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.star"
    if content is not None:
        path.write_bytes(content.encode())
    with pytest.raises(InputFileError) as info:
        read_data_star(path)
    text = str(info.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_atomic_writes_have_the_usual_permissions(tmp_path):
    import os
    import stat

    from tamis.io.star import atomic_path

    with atomic_path(tmp_path / "x.star") as tmp:
        tmp.write_text("data_\n")
    mode = stat.S_IMODE(os.stat(tmp_path / "x.star").st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask


def test_a_failed_read_does_not_leave_stale_lines_for_the_next(tmp_path):
    # starfile reads through linecache; a file that fails to parse (e.g. read while being
    # written) and is then rewritten under the same name must be read afresh
    from tamis.errors import InputFileError

    p = tmp_path / "coords.star"
    p.write_text("data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1 2 3\n")
    with pytest.raises(InputFileError, match="line 6: 3 values in a loop of 2 labels"):
        read_star(p)
    p.write_text("data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n5 6\n")
    assert read_star(p)[""]["rlnCoordinateX"].tolist() == [5]
    # an empty loop (a micrograph without picks) is a valid file
    p.write_text("\n# version 30001\n\ndata_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n")
    assert len(read_star(p)[""]) == 0


def test_fast_loop_writer_matches_starfile_byte_for_byte():
    """write_star formats plain loops itself (speed); the text must be starfile's, line for line
    after its timestamp comment, including the loops it hands back to starfile."""
    from starfile.writer import StarWriter

    from tamis.io.star import _shortest_floats, _star_text

    rng = np.random.default_rng(0)
    n = 50
    table = pd.DataFrame(
        {
            "rlnImageName": [f"{i:06d}@Extract/job003/mic {i}.mrcs" for i in range(n)],
            "rlnMicrographName": ["" if i % 7 == 0 else f"m{i}.mrc" for i in range(n)],
            "rlnClassNumber": rng.integers(-3, 10, n),
            "rlnAnglePsi": rng.normal(size=n) * 1e3,
            "rlnDefocusU": rng.normal(size=n).astype(np.float32),
            "rlnIsFlipped": rng.integers(0, 2, n).astype(bool),
            "rlnNaN": np.where(np.arange(n) % 5 == 0, np.nan, 1.5),
        }
    )
    blocks = {
        "general": {"rlnFinalResolution": 3.5, "rlnName": "a b", "rlnEmpty": ""},
        "particles": _shortest_floats(table),
        "empty": _shortest_floats(table.iloc[:0]),
        "mixed": pd.DataFrame({"rlnA": ["x", None, "y"], "rlnB": [1, 2, 3]}),  # starfile's path
    }
    ours = _star_text(blocks).split("\n", 1)[1]
    theirs = StarWriter(blocks).to_string().split("\n", 1)[1]
    assert ours == theirs
