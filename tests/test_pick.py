"""Pickers: kernels against slow references, and LoG/template picking on simulated micrographs."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tamis.io.micrographs import MicrographSet
from tamis.pick.evaluate import average_precision, match_picks, score_picks
from tamis.pick.log import LogOptions, log_diameters, log_fom, pick_log
from tamis.pick.micrograph import Micrograph, fourier_bin, normalise, read_micrograph
from tamis.pick.peaks import find_peaks
from tamis.pick.template import TemplateOptions, pick_template, prepare_templates, template_fom


def test_fourier_bin_keeps_low_frequencies_and_mean():
    h, w = 60, 80
    yy, xx = np.mgrid[0:h, 0:w]
    img = 3.0 + np.cos(2 * np.pi * (2 * xx / w + 3 * yy / h))
    out, (sy, sx) = fourier_bin(torch.from_numpy(img), 2.0)
    assert out.shape == (30, 40) and (sy, sx) == (0.5, 0.5)
    y2, x2 = np.mgrid[0:30, 0:40]
    want = 3.0 + np.cos(2 * np.pi * (2 * x2 / 40 + 3 * y2 / 30))
    np.testing.assert_allclose(out.numpy(), want, atol=1e-9)


def test_log_fom_single_scale_against_numpy():
    g = np.random.default_rng(0)
    img = g.standard_normal((48, 64))
    best, size = log_fom(torch.from_numpy(img).float(), 2.0, [30.0])
    pad = 15  # the filter's reach (30 A at 2 A/px): the image mirrored at its sides
    big = np.pad(img, pad, mode="reflect")
    f = np.fft.fft2(big)
    fy = np.fft.fftfreq(big.shape[0], d=2.0)[:, None]
    fx = np.fft.fftfreq(big.shape[1], d=2.0)[None, :]
    x2 = 4 * 30.0**2 * (fx**2 + fy**2)
    want = np.fft.ifft2(f * x2 * np.exp(-x2 / 2)).real[pad:-pad, pad:-pad]
    np.testing.assert_allclose(best.numpy(), want, atol=1e-4)
    assert (size == 30.0).all()
    assert log_diameters(100, 150) == [20, 25, 33, 50, 100, 125, 150, 300, 450, 600, 750]


def _naive_nms(fom, radius, threshold):
    """RELION's loop: take the global maximum among 3x3 local maxima not yet removed, remove a disc."""
    f = fom.copy()
    h, w = f.shape
    cand = []
    for r in range(h):
        for c in range(w):
            win = fom[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2]
            if fom[r, c] >= win.max() and fom[r, c] > threshold:
                cand.append((fom[r, c], r, c))
    cand.sort(key=lambda t: -t[0])
    removed = np.zeros_like(f, dtype=bool)
    out = []
    for _v, r, c in cand:
        if removed[r, c]:
            continue
        out.append((r, c))
        for rr in range(h):
            for cc in range(w):
                if (rr - r) ** 2 + (cc - c) ** 2 < radius**2:
                    removed[rr, cc] = True
    return out


def test_find_peaks_against_loop():
    g = np.random.default_rng(1)
    fom = g.random((40, 50))
    rows, cols, vals = find_peaks(torch.from_numpy(fom), 4.5, threshold=0.5)
    want = _naive_nms(fom, 4.5, 0.5)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == want
    assert np.all(np.diff(vals) <= 0)
    r2, c2, _ = find_peaks(torch.from_numpy(fom), 4.5, threshold=0.5, max_peaks=3, edge=5)
    assert len(r2) == 3 and r2.min() >= 5 and c2.max() < 45


def test_matching_is_maximal_one_to_one():
    g = np.random.default_rng(2)
    truth = g.random((6, 2)) * 20
    picks = truth[[0, 0, 1, 3]] + g.normal(0, 0.5, (4, 2))
    matched = match_picks(picks, truth, 2.0)
    # brute force: the most pairs over all assignments
    best = 0
    for perm in itertools.permutations(range(6), 4):
        n = sum(np.hypot(*(picks[i] - truth[j])) < 2.0 for i, j in enumerate(perm))
        best = max(best, n)
    assert (matched >= 0).sum() == best
    assert len(set(matched[matched >= 0])) == (matched >= 0).sum()
    s = score_picks(picks, truth, 2.0)
    assert s.precision == pytest.approx(best / 4) and s.recall == pytest.approx(best / 6)
    assert average_precision(truth, np.arange(6.0), truth, 1.0) == pytest.approx(1.0)


def test_template_fom_against_direct_ncc():
    g = np.random.default_rng(3)
    img = g.standard_normal((40, 44)).astype(np.float32)
    t = g.standard_normal((1, 8, 8))
    tm = prepare_templates(torch.from_numpy(t), 1.0, 1.0, 7.0, 360.0)  # one angle
    best, _ = template_fom(torch.from_numpy(img), tm, 3.5)
    tt = tm[0].numpy().astype(np.float64)
    m = 8
    yy, xx = np.mgrid[0:m, 0:m] - m // 2
    mask = np.hypot(yy, xx) <= 3.5
    for r, c in [(10, 12), (20, 30), (5, 5)]:
        win = img[r - m // 2 : r + m // 2, c - m // 2 : c + m // 2].astype(np.float64)
        num = (win * tt).sum()
        v = win[mask]
        den = np.sqrt(((v - v.mean()) ** 2).sum())
        assert float(best[r, c]) == pytest.approx(num / den, abs=1e-4)


# ---- simulated micrographs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mics(tmp_path_factory):
    from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs

    out = tmp_path_factory.mktemp("mics")
    simulate_micrographs(
        MicrographSimulation(
            n_micrographs=2,
            height_px=768,
            width_px=1024,
            pixel_size=1.5,
            particles_per_micrograph=50,
            snr=0.1,
            seed=3,
        ),
        out,
    )
    return out


def _f1(mics, picks, name, diameter=114.0):
    gt = pd.read_csv(mics / "ground_truth.csv")
    g = gt[(gt.micrograph_name == name) & (gt.kind == "particle")]
    return score_picks(
        np.stack([picks.x, picks.y], 1), g[["x", "y"]].to_numpy(), 0.5 * diameter / 1.5
    )


def test_log_picker_finds_simulated_particles(mics):
    ms = MicrographSet.from_star(mics / "micrographs.star")
    total = None
    for i in range(len(ms)):
        m = read_micrograph(ms.path(i), ms.pixel_size(i))
        assert m.shape == (768, 1024)
        picks = pick_log(m, LogOptions(diameter_min=90, diameter_max=130))
        s = _f1(mics, picks, ms.names[i])
        total = s if total is None else total + s
        assert picks.diameter is not None and set(picks.diameter) <= {90.0, 110.0, 130.0}
    assert total.f1 >= 0.8, (total.precision, total.recall)


def test_template_picker_finds_simulated_particles(mics):
    from tamis.geometry import euler_to_matrix, random_euler_angles
    from tamis.simulate.project import Projector
    from tamis.simulate.structure import load_structure

    st = load_structure("builtin:8zpm", box_size=96, pixel_size=1.5)
    ang = random_euler_angles(8, torch.Generator().manual_seed(0))
    proj = Projector(st.volume).project(euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])).float()
    ms = MicrographSet.from_star(mics / "micrographs.star")
    total = None
    opts = TemplateOptions(diameter=130, min_distance=90, lowpass=10, threshold=0.3, psi_step=15)
    for i in range(len(ms)):
        m = read_micrograph(ms.path(i), ms.pixel_size(i))
        picks = pick_template(m, proj, 1.5, opts, ctf=ms.ctf(i))
        s = _f1(mics, picks, ms.names[i])
        total = s if total is None else total + s
    assert total.f1 >= 0.8, (total.precision, total.recall)


def test_micrograph_readers(tmp_path):
    from PIL import Image

    arr = (np.arange(64 * 80) % 251).reshape(64, 80).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "a.tif")
    m = read_micrograph(tmp_path / "a.png", 2.0)
    assert m.shape == (64, 80) and m.pixel_size == 2.0
    assert torch.equal(read_micrograph(tmp_path / "a.tif", 2.0).image, m.image)
    from tamis.errors import InputFileError

    with pytest.raises(InputFileError, match="pixel size"):
        read_micrograph(tmp_path / "a.png")
    with pytest.raises(InputFileError, match="not found"):
        read_micrograph(tmp_path / "missing.mrc")
    z = normalise(torch.randn(50, 50) * 5 + 3)
    assert float(z.mean()) == pytest.approx(0, abs=1e-5) and float(z.std()) == pytest.approx(
        1, abs=1e-4
    )
    assert isinstance(m, Micrograph) and Path(m.name).name == "a.png"


def test_cli_pick_and_extract(mics, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tamis.cli.main import app
    from tamis.io.coords import read_coordinate_list, read_coordinates
    from tamis.io.star import read_star

    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke
    args = ["pick", "log", "--i", str(mics / "micrographs.star"), "--odir", "AutoPick/job001"]
    out = run(app, args + ["--LoG_diam_min", "90", "--LoG_diam_max", "130", "--expected", "40"])
    assert out.exit_code == 0, out.output
    listing = read_coordinate_list("AutoPick/job001/autopick.star")
    assert list(listing) == ["Micrographs/mic_00001.mrc", "Micrographs/mic_00002.mrc"]
    first = read_coordinates(listing["Micrographs/mic_00001.mrc"])
    assert len(first) == 40 and first["rlnAutopickFigureOfMerit"].is_monotonic_decreasing
    assert (tmp_path / "AutoPick/job001/overlays/mic_00001_autopick.png").is_file()
    args = ["extract", "--i", str(mics / "micrographs.star"), "--coord_list"]
    args += ["AutoPick/job001/autopick.star", "--part_dir", "Extract/job002", "--extract_size"]
    out = run(app, args + ["128", "--scale", "64", "--norm", "--invert_contrast"])
    assert out.exit_code == 0, out.output
    parts = read_star("Extract/job002/particles.star")["particles"]
    assert len(parts) == 80
    assert parts["rlnImageName"][0] == "000001@Extract/job002/Micrographs/mic_00001.mrcs"
    bad = run(
        app,
        ["pick", "log", "--i", "missing.star", "--odir", "x"]
        + ["--LoG_diam_min", "1", "--LoG_diam_max", "2"],
    )
    assert bad.exit_code == 1 and "missing.star" in bad.output
    bad = run(
        app,
        [
            "pick",
            "log",
            "--i",
            str(mics / "micrographs.star"),
            "--odir",
            "x",
            "--LoG_diam_min",
            "200",
            "--LoG_diam_max",
            "100",
        ],
    )
    assert bad.exit_code == 1 and "LoG diameters" in bad.output


def test_a_bright_side_is_neither_wrapped_round_nor_picked_within_half_a_box():
    """A flat micrograph with bright bands along two sides: no LoG pick on the opposite sides
    (the filters mirror the image instead of wrapping it), and none at all with the default edge
    exclusion of the pipeline (half a box; RELION's box 1.5 x the diameter)."""
    from tamis.io.coords import read_coordinate_list, read_coordinates
    from tamis.io.micrographs import MicrographSet
    from tamis.io.mrc import write_mrc
    from tamis.pick.jobs import PickJob, run_picker
    from tamis.schemes.it import derived_options

    rng = np.random.default_rng(0)
    img = rng.normal(size=(1024, 1024)).astype(np.float32)
    img[:, :30] += 5.0  # left side
    img[-25:, :] += 5.0  # last rows
    mic = Micrograph("band", torch.from_numpy(img), 1.5)
    p = pick_log(mic, LogOptions(100, 150))
    far = (p.x > 900) | ((p.y < 100) & (p.x > 100))  # the sides opposite the bands
    assert len(p.x) and not far.any(), np.c_[p.x, p.y]
    edge = derived_options(1.5, 150)["proc__autopick__tamis_edge"]
    assert edge == pytest.approx(150 * 1.5 / 2)  # box ceil(1.5 x 150 A / 1.5 A) = 150 px
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_mrc(f"{d}/band.mrc", img, 1.5)
        ms = MicrographSet(
            pd.DataFrame({"rlnOpticsGroup": [1], "rlnMicrographPixelSize": [1.5]}),
            pd.DataFrame({"rlnMicrographName": [f"{d}/band.mrc"], "rlnOpticsGroup": [1]}),
            Path(d),
        )
        star = run_picker(ms, f"{d}/out", lambda m, _k: pick_log(m, LogOptions(100, 150)),
                          PickJob(diameter=150, edge=edge), log=lambda s: None)  # fmt: skip
        (coords,) = read_coordinate_list(star).values()
        table = read_coordinates(coords)
        xy = table[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
        assert not ((xy[:, 0] < 100) | (xy[:, 1] > 1024 - 100)).any(), xy
