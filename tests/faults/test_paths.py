"""Path safety when writing: a job directory (or its type directory) that links out of the
project is refused before anything is written; an output name that is a link to a file outside
is replaced by the new file, the outside file left untouched."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from tamis.errors import TamisError
from tamis.io.star import write_star
from tamis.pipeline.jobs import run_job
from tamis.pipeline.project import Project


def _project(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    return root, outside


def test_job_directory_linking_outside_is_refused(tmp_path, monkeypatch):
    root, outside = _project(tmp_path)
    p = Project(root)
    name = p.schedule(
        "relion.select.interactive", {"fn_model": "x", "tamis_selected_classes": "1"}
    ).name
    d = root / name
    moved = outside / "job"
    d.rename(moved)  # the job directory is now a link to somewhere else
    d.symlink_to(moved, target_is_directory=True)
    before = sorted(os.listdir(moved))
    with pytest.raises(TamisError, match="leads outside the project"):
        p.run(name)
    monkeypatch.chdir(root)
    with pytest.raises(TamisError, match="leads outside the project"):
        run_job(name)
    with pytest.raises(TamisError, match="leads outside the project"):
        run_job(str(root / name))
    assert sorted(os.listdir(moved)) == before  # nothing was written there


def test_type_directory_linking_outside_is_refused(tmp_path):
    root, outside = _project(tmp_path)
    (root / "Select").symlink_to(outside, target_is_directory=True)
    with pytest.raises(TamisError, match="leads outside the project"):
        Project(root).schedule("relion.select.interactive", {"fn_model": "x"})
    assert list(outside.iterdir()) == []


def test_links_inside_the_project_are_fine(tmp_path):
    root, _ = _project(tmp_path)
    (root / "store").mkdir()
    (root / "Select").symlink_to(root / "store", target_is_directory=True)
    proc = Project(root).schedule("relion.select.interactive", {"fn_model": "x"})
    assert (root / "store" / proc.name.split("/", 1)[1] / "job.star").is_file()


def test_an_output_link_is_replaced_not_followed(tmp_path):
    root, outside = _project(tmp_path)
    victim = outside / "precious.star"
    victim.write_text("keep me\n")
    out = root / "particles.star"
    out.symlink_to(victim)
    write_star({"particles": pd.DataFrame({"rlnCoordinateX": [1.0]})}, out)
    assert victim.read_text() == "keep me\n"
    assert not out.is_symlink() and "rlnCoordinateX" in out.read_text()


def test_reads_are_confined_to_the_project_inside_a_job(tmp_path, monkeypatch):
    from tamis.errors import InputFileError
    from tamis.io.paths import checked, confined_to

    root, outside = _project(tmp_path)
    (outside / "data").mkdir()
    (root / "Movies").symlink_to(outside / "data")  # raw data linked in, as RELION expects
    monkeypatch.chdir(root)
    with confined_to(root):
        for ok in ("Micrographs/a.mrc", str(root / "Extract/x.mrcs"), "Movies/m.tif"):
            assert checked(ok, "in.star") == Path(ok)
        for bad in ("../outside/data/m.tif", str(outside / "data/m.tif"), "a/../../x.mrc"):
            with pytest.raises(InputFileError, match="outside the project"):
                checked(bad, "in.star")
        with confined_to(root, allow_outside=True):
            assert checked("../outside/data/m.tif", "in.star")
    monkeypatch.setenv("TAMIS_ALLOW_OUTSIDE", "1")
    with confined_to(root):
        assert checked("../outside/data/m.tif", "in.star")
    assert checked("/anywhere/at/all.mrc", None)  # outside a job nothing is confined


def test_a_job_reading_micrographs_named_outside_fails_unless_asked(tmp_path, monkeypatch):
    from tamis.io.star import read_star
    from tests.helpers import tiny_micrographs

    root, outside = _project(tmp_path)
    star = tiny_micrographs(outside / "sim", size=256, per=3)
    blocks = read_star(star)
    blocks["micrographs"]["rlnMicrographName"] = [
        str(outside / "sim" / n) for n in blocks["micrographs"]["rlnMicrographName"]
    ]
    monkeypatch.chdir(root)
    write_star(blocks, root / "mics.star")
    p = Project(root)
    opts = {"input_star_mics": "mics.star", "box": "128", "resmax": "8"}
    job = p.schedule("relion.ctffind", opts)
    assert p.run(job.name) == "Failed"
    assert "outside the project" in (root / job.name / "run.err").read_text()
    job = p.schedule("relion.ctffind", {**opts, "tamis_allow_outside": "Yes"})
    assert p.run(job.name) == "Succeeded"


def test_coordinate_files_named_outside_are_refused_inside_a_job(tmp_path, monkeypatch):
    from tamis.errors import InputFileError
    from tamis.extract import coordinates_by_micrograph
    from tamis.io.coords import write_coordinate_list, write_coordinates
    from tamis.io.micrographs import MicrographSet
    from tamis.io.paths import confined_to

    root, outside = _project(tmp_path)
    write_coordinates(outside / "mic_autopick.star", [10.0], [12.0])
    monkeypatch.chdir(root)
    write_coordinate_list(
        root / "autopick.star", {"Micrographs/mic.mrc": str(outside / "mic_autopick.star")}
    )
    ms = MicrographSet(
        pd.DataFrame(), pd.DataFrame({"rlnMicrographName": ["Micrographs/mic.mrc"]}), root
    )
    with confined_to(root), pytest.raises(InputFileError, match="outside the project"):
        coordinates_by_micrograph(root / "autopick.star", ms)
    assert len(coordinates_by_micrograph(root / "autopick.star", ms)) == 1  # outside a job: read
