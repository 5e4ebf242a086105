"""Extraction: windowing and RELION's normalisation against loops; a clean simulated particle
comes out as the simulator made it; files and STAR columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tamis.extract import ExtractOptions, extract_particles, normalise_particles, window_particles
from tamis.io.mrc import read_mrc
from tamis.io.particles import ParticleSet
from tamis.io.star import read_star


def test_window_particles_against_loop():
    g = np.random.default_rng(0)
    img = torch.from_numpy(g.standard_normal((30, 40)))
    x = np.array([5.7, 0.2, 39.9, 20.0])
    y = np.array([3.1, 29.5, 15.0, 15.99])
    out = window_particles(img, x, y, 8).numpy()
    for k in range(4):
        for i in range(8):
            for j in range(8):
                yy = min(max(int(y[k]) + i - 4, 0), 29)
                xx = min(max(int(x[k]) + j - 4, 0), 39)
                assert out[k, i, j] == img[yy, xx].item()


def test_normalise_against_loop():
    g = np.random.default_rng(1)
    n = 16
    c = np.arange(n) - n // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    imgs = g.standard_normal((3, n, n)) * 2 + 5 + 0.3 * xx - 0.2 * yy
    out = normalise_particles(torch.from_numpy(imgs), 6.0).numpy()
    for k in range(3):
        pts, vals = [], []
        for i in range(n):
            for j in range(n):
                if c[i] ** 2 + c[j] ** 2 > 36:
                    pts.append([c[j], c[i], 1.0])
                    vals.append(imgs[k, i, j])
        coef, *_ = np.linalg.lstsq(np.array(pts), np.array(vals), rcond=None)
        flat = imgs[k] - (coef[0] * xx + coef[1] * yy + coef[2])
        bg = flat[(yy**2 + xx**2) > 36]
        want = (flat - bg.mean()) / bg.std()
        np.testing.assert_allclose(out[k], want, atol=1e-10)
        assert out[k][(yy**2 + xx**2) > 36].std() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs

    out = tmp_path_factory.mktemp("clean")
    cfg = MicrographSimulation(
        n_micrographs=1,
        height_px=640,
        width_px=768,
        pixel_size=2.0,
        particles_per_micrograph=3,
        snr=1e8,
        ice_gradient=0.0,
        ice_per_micrograph=0.0,
        seed=7,
    )
    simulate_micrographs(cfg, out / "mics")
    return out, cfg


def test_clean_particle_matches_the_simulator(clean):
    from tamis.ctf import compute_ctf
    from tamis.fourier import fourier_shift, irfft2_centered, pad_images, rfft2_centered
    from tamis.simulate.common import StructureSet
    from tamis.simulate.structure import structure_diameter

    out, cfg = clean
    mics = out / "mics"
    gt = pd.read_csv(mics / "ground_truth.csv")
    gt = gt[gt.kind == "particle"].reset_index(drop=True)
    coords = {
        "Micrographs/mic_00001.mrc": pd.DataFrame(
            {"rlnCoordinateX": gt.x.to_numpy(), "rlnCoordinateY": gt.y.to_numpy()}
        )
    }
    box = 128
    star = extract_particles(
        mics / "micrographs.star",
        coords,
        out / "Extract",
        ExtractOptions(extract_size=box, norm=False, invert_contrast=False),
        log=lambda s: None,
    )
    parts = ParticleSet.from_star(star).load_images(np.arange(len(gt))).to(torch.float64)
    # the simulator's clean particle: -CTF * (projection shifted by the sub-pixel part)
    diameter = structure_diameter("builtin:8zpm", bfactor=cfg.bfactor)
    sbox = int(min(1024, max(16, 2 * int(np.ceil(1.5 * diameter / cfg.pixel_size / 2)))))
    structures = StructureSet(["builtin:8zpm"], box_size=sbox, pixel_size=cfg.pixel_size)
    angles = torch.tensor(gt[["rot", "tilt", "psi"]].to_numpy())
    frac = torch.tensor(np.stack([gt.x % 1, gt.y % 1], 1), dtype=torch.float32)
    proj = irfft2_centered(
        fourier_shift(structures.slices(np.zeros(len(gt), int), angles), frac, (sbox, sbox)),
        (sbox, sbox),
    )
    big = 512
    ctf = compute_ctf(
        (big, big),
        pixel_size=cfg.pixel_size,
        defocus_u=float(gt.defocus_u[0]),
        defocus_v=float(gt.defocus_v[0]),
        defocus_angle=float(gt.defocus_angle[0]),
    )
    want = -irfft2_centered(rfft2_centered(pad_images(proj.double(), big)) * ctf, (big, big))
    o = big // 2 - box // 2
    want = want[:, o : o + box, o : o + box]
    corr = [np.corrcoef(parts[k].flatten(), want[k].flatten())[0, 1] for k in range(len(gt))]
    assert max(corr) >= 0.99, corr


def test_extraction_files_norm_and_rescale(clean):
    out, cfg = clean
    mics = out / "mics"
    from tamis.io.coords import read_coordinate_list

    coords_list = mics / "truth" / "coordinates.star"
    assert read_coordinate_list(coords_list)
    star = extract_particles(
        mics / "micrographs.star",
        coords_list,
        out / "Extract2",
        ExtractOptions(extract_size=128, rescale=64, float16=True),
        log=lambda s: None,
    )
    blocks = read_star(star)
    optics, parts = blocks["optics"], blocks["particles"]
    assert optics["rlnImageSize"][0] == 64 and optics["rlnImagePixelSize"][0] == pytest.approx(4.0)
    assert optics["rlnImageDimensionality"][0] == 2
    for label in (
        "rlnImageName",
        "rlnMicrographName",
        "rlnCoordinateX",
        "rlnDefocusU",
        "rlnOpticsGroup",
    ):
        assert label in parts.columns
    assert (
        parts["rlnImageName"][0] == f"000001@{out / 'Extract2' / 'Micrographs' / 'mic_00001.mrcs'}"
    )
    stack, apix = read_mrc(out / "Extract2" / "Micrographs" / "mic_00001.mrcs")
    assert stack.shape[1:] == (64, 64) and apix == pytest.approx(4.0)
    # RELION's convention: background (outside 75% of the radius) mean 0, sd 1
    c = np.arange(64) - 32
    yy, xx = np.meshgrid(c, c, indexing="ij")
    bg = stack[:, (yy**2 + xx**2) > 24**2].astype(np.float64)
    assert np.abs(bg.mean(1)).max() < 1e-3 and np.abs(bg.std(1) - 1).max() < 1e-3
    # re-extraction recentred on refined offsets
    data = read_star(star)
    p = data["particles"].copy()
    p["rlnOriginXAngst"] = 10.0  # 2.5 px of 4 A in the extracted box = 5 px of the micrograph
    p["rlnOriginYAngst"] = -3.0
    from tamis.io.star import write_star

    write_star({"optics": data["optics"], "particles": p}, out / "refined.star")
    star3 = extract_particles(
        mics / "micrographs.star",
        out / "refined.star",
        out / "Extract3",
        ExtractOptions(extract_size=128, recenter=True),
        log=lambda s: None,
    )
    p3 = read_star(star3)["particles"]
    # origins in A are converted with the micrograph pixel (2 A): 5 px and -1.5 px
    np.testing.assert_allclose(p3["rlnCoordinateX"], p["rlnCoordinateX"] - 5)
    np.testing.assert_allclose(p3["rlnCoordinateY"], p["rlnCoordinateY"] + 2)
    np.testing.assert_allclose(p3["rlnOriginXAngst"], 0.0, atol=1e-9)
    np.testing.assert_allclose(p3["rlnOriginYAngst"], 2 * 0.5, atol=1e-9)


def test_extract_from_a_directory_of_box_files(clean, tmp_path):
    out, cfg = clean
    mics = out / "mics"
    gt = pd.read_csv(mics / "ground_truth.csv")
    gt = gt[gt.kind == "particle"]
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    lines = [f"{x - 50:.2f} {y - 50:.2f} 100 100" for x, y in zip(gt.x, gt.y, strict=True)]
    (boxes / "mic_00001.box").write_text("\n".join(lines) + "\n")
    star = extract_particles(
        mics / "micrographs.star",
        boxes,
        tmp_path / "Extract",
        ExtractOptions(extract_size=64),
        log=lambda s: None,
    )
    parts = read_star(star)["particles"]
    np.testing.assert_allclose(parts["rlnCoordinateX"], gt.x.to_numpy(), atol=0.01)
