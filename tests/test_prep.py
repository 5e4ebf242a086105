"""Preprocessing: micrograph import and CTF estimation against the simulator's true CTF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tamis.ctf import compute_ctf, electron_wavelength
from tamis.io.star import read_star
from tamis.prep.ctffind import (
    CtfFindOptions,
    _ctf1d,
    amplitude_spectrum,
    estimate_ctf,
    full_plane,
    run_ctffind,
)
from tamis.prep.importer import ImportOptions, import_micrographs
from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs


def test_amplitude_spectrum_against_loop():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(96, 80))
    box = 32
    power = np.zeros((box, box // 2 + 1))
    n = 0
    for y0 in range(0, 96 - box + 1, box // 2):
        for x0 in range(0, 80 - box + 1, box // 2):
            t = img[y0 : y0 + box, x0 : x0 + box]
            power += np.abs(np.fft.rfft2(t - t.mean())) ** 2
            n += 1
    got = amplitude_spectrum(torch.from_numpy(img), box).numpy()
    np.testing.assert_allclose(got, np.sqrt(power / n), rtol=1e-10, atol=1e-9)


def test_radial_ctf_matches_tamis_ctf():
    """The 1D model used for the defocus scan is tamis.ctf's CTF² without astigmatism."""
    box, p, d = 128, 1.3, 15000.0
    c = compute_ctf((box, box), pixel_size=p, defocus_u=d, defocus_v=d, dtype=torch.float64)
    s = np.arange(box // 2) / (box * p)
    lam = float(electron_wavelength(300.0))
    q0 = 0.1
    mine = _ctf1d(s, np.array([d]), lam, 2.7e7, math.atan(q0 / math.sqrt(1 - q0**2)))[0]
    np.testing.assert_allclose(mine, (c[0, : box // 2] ** 2).numpy(), atol=1e-10)


@pytest.fixture(scope="module")
def mics(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctf")
    sim = simulate_micrographs(
        MicrographSimulation(
            n_micrographs=3, height_px=768, width_px=768, pixel_size=1.5,
            particles_per_micrograph=40, snr=0.1, ice_scattering=0.3, seed=5,
        ),
        out,
    )  # fmt: skip
    return out, sim


def test_estimated_defocus_matches_truth(mics):
    out, sim = mics
    from tamis.io.mrc import read_mrc

    table = read_star(sim.star)["micrographs"]
    for _, row in table.iterrows():
        img, _ = read_mrc(out / row["rlnMicrographName"])
        fit = estimate_ctf(
            torch.from_numpy(img), 1.5, options=CtfFindOptions(box=256, max_resolution=6)
        )
        true_mean = (row["rlnDefocusU"] + row["rlnDefocusV"]) / 2
        assert abs((fit.defocus_u + fit.defocus_v) / 2 - true_mean) < 150
        true_ast = row["rlnDefocusU"] - row["rlnDefocusV"]
        assert abs(abs(fit.astigmatism) - abs(true_ast)) < 150
        if abs(true_ast) > 300:
            diff = (fit.defocus_angle - row["rlnDefocusAngle"]) % 180
            assert min(diff, 180 - diff) < 10
        assert fit.defocus_u >= fit.defocus_v
        assert 0.3 < fit.figure_of_merit <= 1 and fit.max_resolution < 12


def test_import_and_incremental_ctffind(mics, tmp_path, monkeypatch):
    out, _ = mics
    monkeypatch.chdir(out)
    star = import_micrographs("Micrographs/*.mrc", tmp_path / "Import", ImportOptions(angpix=1.5))
    blocks = read_star(star)
    assert list(blocks["micrographs"]["rlnMicrographName"]) == [
        f"Micrographs/mic_{i:05d}.mrc" for i in (1, 2, 3)
    ]
    assert float(blocks["optics"]["rlnMicrographPixelSize"].iloc[0]) == 1.5
    opts = CtfFindOptions(box=256, max_resolution=6)
    ctf = run_ctffind(star, tmp_path / "CtfFind", opts, log=lambda s: None)
    t = read_star(ctf)["micrographs"]
    assert {"rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfMaxResolution",
            "rlnCtfFigureOfMerit", "rlnCtfImage"} <= set(t.columns)  # fmt: skip
    txt = tmp_path / "CtfFind" / "Micrographs" / "mic_00001.txt"
    assert txt.is_file()
    # continue: a result file is taken as it is (marked to prove it was not recomputed)
    lines = txt.read_text().splitlines()
    vals = lines[-1].split()
    vals[1] = "12345.000000"
    txt.write_text("\n".join([*lines[:-1], " ".join(vals)]) + "\n")
    again = run_ctffind(star, tmp_path / "CtfFind", opts, only_do_unfinished=True, log=print)
    assert float(read_star(again)["micrographs"]["rlnDefocusU"].iloc[0]) == 12345.0
    with pytest.raises(Exception, match="no file matches"):
        import_micrographs("Nothing/*.mrc", tmp_path / "I2", ImportOptions(angpix=1.5))


def test_spectrum_image_is_the_full_plane_power_spectrum():
    """The written .ctf image completes the half plane by |F(-k)| = |F(k)|: it equals the
    centred full-plane FFT amplitude of the tiles (an astigmatic pattern keeps its angle)."""
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.normal(size=(64, 64)))
    amp = amplitude_spectrum(img, 64)
    full = full_plane(amp)
    t = img.numpy() - img.numpy().mean()
    np.testing.assert_allclose(full.numpy(), np.abs(np.fft.fft2(t)), rtol=1e-8, atol=1e-8)


def test_ctf_on_pure_noise_reports_no_confidence():
    """No Thon rings (white noise, or noise smoothed as in a denoised JPEG): the fit resolution
    stays at the lowest resolution searched and the figure of merit near 0, so the pipeline's
    micrograph selection (rlnCtfMaxResolution <= 6 A by default) drops the micrograph."""
    import torch

    from tamis.prep.ctffind import CtfFindOptions, estimate_ctf

    g = torch.Generator().manual_seed(0)
    white = torch.randn((1024, 1024), generator=g)
    smooth = torch.nn.functional.avg_pool2d(white[None, None], 5, 1, 2)[0, 0]
    for img in (white, smooth):
        fit = estimate_ctf(img, 1.5, voltage=300, spherical_aberration=2.7,
                           amplitude_contrast=0.1, options=CtfFindOptions(box=256))  # fmt: skip
        assert fit.max_resolution >= 30 and fit.figure_of_merit < 0.15
