"""Coordinate files in RELION's autopick layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tamis.errors import InputFileError
from tamis.io.coords import (
    coordinate_file_name,
    read_coordinate_list,
    read_coordinates,
    write_coordinate_list,
    write_coordinates,
)
from tamis.io.star import read_star


def test_write_read_coordinates(tmp_path):
    path = tmp_path / "AutoPick/job006/Movies/mic_autopick.star"
    write_coordinates(
        path, np.array([10.5, 20.0]), np.array([30.0, 40.25]), fom=np.array([1.0, 0.5])
    )
    blocks = read_star(path)
    assert list(blocks) == [""]  # a single unnamed data_ block, as RELION writes
    table = read_coordinates(path)
    assert table.columns.tolist() == [
        "rlnCoordinateX",
        "rlnCoordinateY",
        "rlnClassNumber",
        "rlnAutopickFigureOfMerit",
        "rlnAnglePsi",
    ]
    assert table["rlnCoordinateX"].tolist() == [10.5, 20.0]
    assert table["rlnCoordinateY"].tolist() == [30.0, 40.25]
    assert table["rlnClassNumber"].tolist() == [0, 0] and table["rlnAnglePsi"].tolist() == [0, 0]


def test_empty_coordinates(tmp_path):
    write_coordinates(tmp_path / "e.star", np.array([]), np.array([]))
    assert len(read_coordinates(tmp_path / "e.star")) == 0


def test_coordinate_list_and_names(tmp_path):
    mapping = {"MotionCorr/job002/Movies/a.mrc": "AutoPick/job006/Movies/a_autopick.star"}
    write_coordinate_list(tmp_path / "autopick.star", mapping)
    assert list(read_star(tmp_path / "autopick.star")) == ["coordinate_files"]
    assert read_coordinate_list(tmp_path / "autopick.star") == mapping
    assert coordinate_file_name("MotionCorr/job002/Movies/a.mrc", "AutoPick/job006") == Path(
        "AutoPick/job006/Movies/a_autopick.star"
    )
    assert coordinate_file_name("raw/b.mrc", "AutoPick/job006", "manualpick") == Path(
        "AutoPick/job006/raw/b_manualpick.star"
    )


def test_missing_columns(tmp_path):
    (tmp_path / "c.star").write_text("data_\nloop_\n_rlnCoordinateX #1\n1.0\n2.0\n\n")
    with pytest.raises(InputFileError, match="rlnCoordinateY"):
        read_coordinates(tmp_path / "c.star")


def test_box_and_csv_coordinate_files(tmp_path):
    from tamis.io.coords import read_coordinate_file

    (tmp_path / "a.box").write_text("10\t20\t100\t100\n30 40 100 100\n")
    t = read_coordinate_file(tmp_path / "a.box")
    assert t["rlnCoordinateX"].tolist() == [60.0, 80.0] and t["rlnCoordinateY"].tolist() == [
        70.0,
        90.0,
    ]
    (tmp_path / "b.csv").write_text("X,Y,score\n1.5,2.5,0.9\n3,4,0.1\n")
    t = read_coordinate_file(tmp_path / "b.csv")
    assert t["rlnCoordinateX"].tolist() == [1.5, 3.0] and t["rlnCoordinateY"].tolist() == [2.5, 4.0]
    (tmp_path / "c.csv").write_text("col_a,col_b\n5,6\n")
    assert read_coordinate_file(tmp_path / "c.csv")["rlnCoordinateY"].tolist() == [6.0]
    (tmp_path / "d.box").write_text("1 2\n")
    with pytest.raises(InputFileError, match="width"):
        read_coordinate_file(tmp_path / "d.box")
