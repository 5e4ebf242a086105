"""Session metadata (MDCatch's role): EPU XML and SerialEM mdoc parsers on real files (values
checked by hand), the derived parameters, clear errors for what is missing, and
``tamis it --session`` on a simulated EPU session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tamis.cli.main import app
from tamis.errors import TamisError
from tamis.pipeline.job import JobStar
from tamis.prep.session import parse_epu_xml, parse_mdoc, read_session, session_options
from tamis.simulate.movies import MovieSimulation, simulate_movies

DATA = Path(__file__).parent / "data" / "metadata"


def test_epu_xml_of_a_real_k3_session():
    v = parse_epu_xml(DATA / "epu_k3_exposure.xml")
    # SpatialScale pixelSize 1.0558814239614023E-10 m with SuperResolutionFactor 2
    assert v["pixel_size"] == pytest.approx(1.0558814239614023 / 2)
    assert v["voltage"] == 300.0  # AccelerationVoltage 300000 V
    assert v["n_frames"] == 50  # FractionationSettings NumberOffractions
    assert v["total_dose"] == pytest.approx(14.410836806690226)  # Dose 1.44108...E+21 e/m²
    assert v["exposure_time"] == 0.89
    assert v["mode"] == "Super-resolution"  # ElectronCountingEnabled true, factor 2
    assert v["detector"] == "BioQuantum K3"
    assert v["instrument_id"] == "3632"
    assert v["defocus_um"] == pytest.approx(-2.7)


def test_serialem_mdocs():
    v = parse_mdoc(DATA / "serialem_frame_set_single.mdoc")
    assert v["pixel_size"] == 1.2827 and v["voltage"] == 300.0
    assert v["n_frames"] == 12  # FrameDosesAndNumber = 0.63824 12
    assert v["total_dose"] == pytest.approx(0.63824 * 12)
    assert v["mode"] == "Super-resolution"  # Binning = 0.5
    assert v["gain"] == "SuperRef_s_mmm_00000_-15.0_Oct08_01.59.24.dm4"
    assert v["defocus_um"] == -4.5
    v = parse_mdoc(DATA / "serialem_de_no_dose.mdoc")
    assert v["pixel_size"] == 2.48521 and v["n_frames"] == 46
    assert "total_dose" not in v  # ExposureDose = 0, FrameDosesAndNumber = 0 46


@pytest.fixture(scope="module")
def epu(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("epu")
    simulate_movies(
        MovieSimulation(n_movies=2, height_px=256, width_px=256, n_frames=8, pixel_size=1.3,
                        particles_per_movie=3, dose_per_frame=1.25, session="epu", seed=1),
        root,
    )  # fmt: skip
    return root


def test_a_simulated_epu_session_gives_the_parameters(epu, tmp_path):
    acq = read_session(epu / "session")
    assert acq.software == "EPU" and len(acq.movies) == 2
    assert acq.pixel_size == pytest.approx(1.3) and acq.n_frames == 8
    with pytest.raises(TamisError, match=r"spherical aberration: .*give --Cs"):
        session_options(acq)
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps({"microscopes": {"9999": {"cs": 2.7}}}))
    acq = read_session(epu / "session", profile=prof)
    assert acq.spherical_aberration == 2.7 and "profile" in acq.sources["spherical_aberration"]
    opts = session_options(acq)
    assert opts["prep__importmovies__fn_in_raw"] == (
        "Movies/Images-Disc*/GridSquare_*/Data/*_fractions.tiff"
    )
    assert opts["prep__motioncorr__dose_per_frame"] == pytest.approx(1.25)
    assert opts["prep__importmovies__angpix"] == pytest.approx(1.3)


def test_missing_values_are_one_clear_line(epu, tmp_path):
    session = tmp_path / "session"
    shutil.copytree(epu / "session", session)
    for xml in session.rglob("*.xml"):  # an XML without a pixel size, movies without one too
        text = xml.read_text()
        start = text.index("<SpatialScale>")
        xml.write_text(text[:start] + text[text.index("</SpatialScale>") + 15 :])
    acq = read_session(session)
    acq.pixel_size = None  # the TIFF header has one (the simulator writes it): drop it
    with pytest.raises(TamisError, match=r"pixel size: not in the EPU metadata .*give --angpix"):
        session_options(acq, cs=2.7)
    acq.pixel_size = 1.3
    acq.total_dose = None
    with pytest.raises(TamisError, match=r"total dose .* give --dose_per_frame"):
        session_options(acq, cs=2.7)


def test_it_session_sets_up_prep_and_records(epu, tmp_path):
    project = tmp_path / "project"
    r = CliRunner().invoke(app, ["it", "--project", str(project), "--session",
                                 str(epu / "session"), "--Cs", "2.7", "--diameter", "150",
                                 "--only_save"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert os.path.islink(project / "Movies")
    record = json.loads((project / "session.json").read_text())
    assert record["software"] == "EPU" and record["movies"]["count"] == 2
    assert record["sources"]["pixel_size"].startswith("EPU")
    imp = JobStar.read(project / "Schemes/prep/importmovies").options
    assert imp["fn_in_raw"] == "Movies/Images-Disc*/GridSquare_*/Data/*_fractions.tiff"
    assert imp["Cs"] == "2.7"
    mc = JobStar.read(project / "Schemes/prep/motioncorr").options
    assert mc["dose_per_frame"] == "1.25"
    import glob

    os.chdir(project)
    try:
        assert len(glob.glob(imp["fn_in_raw"])) == 2  # the pattern finds the movies in the project
    finally:
        os.chdir(tmp_path)
    # without Cs: nothing is set up, one line names the value and the flag
    r = CliRunner().invoke(app, ["it", "--project", str(tmp_path / "p2"), "--session",
                                 str(epu / "session"), "--only_save"])  # fmt: skip
    assert r.exit_code == 1 and "--Cs" in r.output
    assert not (tmp_path / "p2" / "Schemes").exists()


def test_mdoc_reader_agrees_with_mdocfile_where_it_is_installed():
    """The text reader against teamtomo's mdocfile (a cross-check; it is not a dependency)."""
    mdocfile = pytest.importorskip("mdocfile", reason="mdocfile not installed: cross-check skipped")
    from tamis.prep.session import read_mdoc

    for name in ("serialem_frame_set_single", "serialem_de_no_dose"):
        header, sections = read_mdoc(DATA / f"{name}.mdoc")
        df = mdocfile.read(DATA / f"{name}.mdoc")
        assert len(sections) == len(df)
        for key in ("NumSubFrames", "ExposureTime", "TargetDefocus", "ExposureDose"):
            assert float(sections[0][key]) == pytest.approx(float(df[key].iloc[0]))
        assert float(header["Voltage"]) == float(df["Voltage"].iloc[0])
