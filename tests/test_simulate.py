"""The simulator: RELION-shaped products, the ground truth's conventions, noise level, micrographs."""

from __future__ import annotations

import re
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from tamis.errors import InputFileError, TamisError
from tamis.fourier import irfft2_centered, rfft2_centered
from tamis.geometry import euler_to_matrix
from tamis.io.coords import read_coordinate_list, read_coordinates
from tamis.io.mrc import read_mrc, write_mrc
from tamis.io.particles import ParticleSet
from tamis.io.star import read_star
from tamis.simulate.common import Optics
from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs
from tamis.simulate.particles import ParticleSimulation, simulate_particles
from tamis.simulate.project import Projector
from tamis.simulate.structure import load_structure

DATA = Path(__file__).parent / "data"
RELION_PARTICLE_OPTICS = [
    "rlnOpticsGroupName",
    "rlnOpticsGroup",
    "rlnMicrographOriginalPixelSize",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnCtfDataAreCtfPremultiplied",
]


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian blur, via numpy's FFT."""
    h, w = image.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(image) * kernel, s=(h, w))


@pytest.fixture(scope="module")
def particle_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    config = ParticleSimulation(
        structures=["builtin:8zpm", "builtin:8zpm@R"],
        n_particles=400,
        box_size=40,
        pixel_size=3.5,
        snr=0.1,
        junk_fraction=0.2,
        particles_per_micrograph=150,
        seed=3,
    )
    return config, simulate_particles(config, out), out


def test_particle_products_are_relion_shaped(particle_set):
    config, result, out = particle_set
    blocks = read_star(result.star)
    assert list(blocks) == ["optics", "particles"]
    assert blocks["optics"].columns.tolist() == RELION_PARTICLE_OPTICS
    assert blocks["optics"]["rlnImagePixelSize"].tolist() == [3.5]
    assert blocks["optics"]["rlnImageSize"].tolist() == [40]
    names = blocks["particles"]["rlnImageName"]
    assert all(re.fullmatch(r"\d{6}@Particles/mic_\d{5}\.mrcs", n) for n in names)
    assert sorted(set(names.str.split("@").str[1])) == [
        f"Particles/mic_{i:05d}.mrcs" for i in (1, 2, 3)
    ]
    ps = ParticleSet.from_star(result.star)
    assert len(ps) == 400 and ps.box_size == 40 and ps.pixel_size == 3.5
    with mrcfile.open(out / "Particles" / "mic_00001.mrcs") as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(3.5)
        assert mrc.data.shape == (150, 40, 40)
    # Truth beside the STAR file, not inside it.
    assert not any(c.startswith("rlnAngle") for c in blocks["particles"].columns)
    truth = pd.read_csv(result.ground_truth)
    assert truth["image_name"].tolist() == names.tolist()
    counts = truth["kind"].value_counts().to_dict()
    assert counts == {"particle": 320, "ice": 20, "carbon": 20, "aggregate": 20, "empty": 20}
    real = truth[truth["kind"] == "particle"]
    assert set(real["structure"]) == {1, 2}
    assert set(real["structure_name"]) == {"builtin:8zpm", "builtin:8zpm@R"}
    assert (truth.loc[truth["kind"] != "particle", "structure"] == 0).all()
    np.testing.assert_allclose(truth["origin_x_angst"], -truth["shift_x_px"] * 3.5)
    for f in ("structures/structure_01.mrc", "structures/structure_02.mrc", "simulation.json"):
        assert (out / f).is_file()
    # Defocus: per micrograph within the range, U >= V apart from the per-particle jitter.
    du = blocks["particles"]["rlnDefocusU"]
    assert du.min() > 8000 - 300 and du.max() < 25000 + 300


def test_noise_level_and_snr(particle_set):
    config, result, out = particle_set
    ps = ParticleSet.from_star(result.star)
    truth = pd.read_csv(result.ground_truth)
    empty = ps.load_images(np.flatnonzero(truth["kind"] == "empty"))
    assert empty.var().item() == pytest.approx(result.noise_std**2, rel=0.1)
    real = ps.load_images(np.flatnonzero(truth["kind"] == "particle"))
    measured_snr = (real.var(dim=(1, 2)).mean().item() - result.noise_std**2) / result.noise_std**2
    assert measured_snr == pytest.approx(config.snr, rel=0.3)


def test_truth_shift_and_origin_convention(tmp_path):
    """At high SNR the image equals the true projection moved by +shift; RELION's origin
    (= -shift) moves it back to the centre."""
    config = ParticleSimulation(
        n_particles=6, box_size=48, pixel_size=3.0, snr=1e4, shift_sigma_px=3.0, seed=5
    )
    result = simulate_particles(config, tmp_path)
    ps = ParticleSet.from_star(result.star)
    truth = pd.read_csv(result.ground_truth)
    st = load_structure("builtin:8zpm", box_size=48, pixel_size=3.0)
    proj = Projector(st.volume)
    images = ps.load_images(range(6)).double()
    ctf = ps.ctf_params().compute((48, 48)).double()
    rot = euler_to_matrix(*(torch.tensor(truth[c].to_numpy()) for c in ("rot", "tilt", "psi")))
    refs = irfft2_centered(proj.slices(rot).to(torch.complex128) * ctf, (48, 48))
    cc = torch.fft.irfft2(torch.fft.rfft2(images) * torch.fft.rfft2(refs).conj(), s=(48, 48))
    for i in range(6):
        peak = int(torch.argmax(cc[i]))
        dy, dx = divmod(peak, 48)
        dy = dy - 48 if dy > 24 else dy
        dx = dx - 48 if dx > 24 else dx
        assert abs(dx - truth["shift_x_px"][i]) <= 0.6 and abs(dy - truth["shift_y_px"][i]) <= 0.6
        # Undo with the origin: aligned(r) = particle(r - origin)
        origin_px = torch.tensor([truth["origin_x_angst"][i], truth["origin_y_angst"][i]]) / 3.0
        from tamis.fourier import fourier_shift

        aligned = irfft2_centered(
            fourier_shift(rfft2_centered(images[i]), origin_px, (48, 48)), (48, 48)
        )
        r = torch.corrcoef(
            torch.stack([aligned[12:36, 12:36].flatten(), refs[i, 12:36, 12:36].flatten()])
        )
        assert r[0, 1] > 0.95


def test_same_seed_same_images(tmp_path):
    config = ParticleSimulation(
        n_particles=20, box_size=40, pixel_size=3.5, junk_fraction=0.5, seed=9
    )
    simulate_particles(config, tmp_path / "a")
    simulate_particles(config, tmp_path / "b")
    a, _ = read_mrc(tmp_path / "a" / "Particles" / "mic_00001.mrcs")
    b, _ = read_mrc(tmp_path / "b" / "Particles" / "mic_00001.mrcs")
    np.testing.assert_array_equal(a, b)


def test_structure_that_does_not_fit_is_refused(tmp_path):
    with pytest.raises(TamisError, match="does not fit"):
        simulate_particles(ParticleSimulation(n_particles=5, box_size=16, pixel_size=2.0), tmp_path)


def test_structures_from_pdb_and_map(tmp_path):
    small = load_structure(str(DATA / "1uao.pdb"), box_size=24, pixel_size=1.0)
    assert small.volume.shape == (24, 24, 24) and small.volume.sum() > 0
    with pytest.raises(InputFileError, match="no chain"):
        load_structure(str(DATA / "1uao.pdb") + "@Z", box_size=24, pixel_size=1.0)
    with pytest.raises(InputFileError, match="not found"):
        load_structure(str(tmp_path / "none.pdb"), box_size=24, pixel_size=1.0)
    # A map at 2 A/px, used at 1 A/px: resampled, centred, same extent in A.
    write_mrc(tmp_path / "m.mrc", (small.volume[::2, ::2, ::2] * 8).numpy(), 2.0, stack=False)
    from_map = load_structure(str(tmp_path / "m.mrc"), box_size=24, pixel_size=1.0)
    assert from_map.volume.shape == (24, 24, 24)
    assert abs(from_map.diameter(0.2) - small.diameter(0.2)) <= 4.0


def test_micrographs(tmp_path):
    config = MicrographSimulation(
        n_micrographs=2,
        height_px=256,
        width_px=384,
        pixel_size=2.0,
        particles_per_micrograph=12,
        snr=20.0,
        ice_per_micrograph=0.0,
        ice_gradient=0.0,
        optics=Optics(defocus_min=5000, defocus_max=6000),
        seed=4,
    )
    result = simulate_micrographs(config, tmp_path)
    blocks = read_star(result.star)
    assert list(blocks) == ["optics", "micrographs"]
    assert blocks["optics"]["rlnMicrographPixelSize"].tolist() == [2.0]
    mics = blocks["micrographs"]
    assert mics["rlnMicrographName"].tolist() == [
        "Micrographs/mic_00001.mrc",
        "Micrographs/mic_00002.mrc",
    ]
    assert {"rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfAstigmatism"} <= set(mics)
    coord_files = read_coordinate_list(result.coordinates)
    truth = pd.read_csv(result.ground_truth)
    for name in mics["rlnMicrographName"]:
        image, apix = read_mrc(tmp_path / name)
        assert image.shape == (256, 384) and apix == pytest.approx(2.0)
        coords = read_coordinates(tmp_path / coord_files[name])
        rows = truth[(truth["micrograph_name"] == name) & (truth["kind"] == "particle")]
        assert len(coords) == len(rows) == 12
        x, y = coords["rlnCoordinateX"].to_numpy(), coords["rlnCoordinateY"].to_numpy()
        assert (x >= 0).all() and (x < 384).all() and (y >= 0).all() and (y < 256).all()
        d = np.sqrt((x[:, None] - x[None]) ** 2 + (y[:, None] - y[None]) ** 2)
        assert d[np.triu_indices(len(x), 1)].min() >= 0.99 * 112 / 2.0 * 0.9
        # Raw contrast: particles are dark; x is the column and y the row.
        smooth = gaussian_blur(image, 4.0)
        at_truth = smooth[y.astype(int), x.astype(int)].mean()
        assert at_truth < smooth.mean() - 2 * smooth.std() * 0.5


def test_random_pseudo_proteins():
    from tamis.errors import InputFileError
    from tamis.simulate.structure import load_structure

    a = load_structure("random:1", box_size=48, pixel_size=3.0).volume
    b = load_structure("random:1", box_size=48, pixel_size=3.0).volume
    c = load_structure("random:2", box_size=48, pixel_size=3.0).volume
    assert torch.equal(a, b) and not torch.allclose(a, c)
    big = load_structure("random:1:1200", box_size=48, pixel_size=3.0).volume
    assert float(big.sum()) > 2.5 * float(a.sum())
    with pytest.raises(InputFileError, match="random:SEED"):
        load_structure("random:x", box_size=16, pixel_size=3.0)


def test_coloured_noise_has_more_low_resolution_power_and_unit_variance():
    import torch

    from tamis.simulate.particles import ParticleSimulation, _noise

    n, pixel = 64, 4.0
    cfg = ParticleSimulation(
        box_size=n, pixel_size=pixel, low_res_noise=3.0, low_res_noise_scale=60.0
    )
    x = _noise(torch.Size([400, n, n]), cfg, torch.Generator().manual_seed(1)).double()
    assert float(x.var()) == pytest.approx(1.0, abs=0.02)
    power = (torch.fft.rfft2(x).abs() ** 2).mean(0)
    k = torch.sqrt(
        torch.fft.fftfreq(n, d=pixel)[:, None] ** 2 + torch.fft.rfftfreq(n, d=pixel)[None] ** 2
    )
    expect = 1.0 + 3.0 * torch.exp(-((k * 60.0) ** 2))
    low, high = (k > 0) & (k < 0.004), k > 0.08
    ratio = float(power[low].mean() / power[high].mean())
    assert ratio == pytest.approx(float(expect[low].mean() / expect[high].mean()), rel=0.1)
    white = _noise(torch.Size([4, n, n]), ParticleSimulation(), torch.Generator().manual_seed(1))
    assert white.shape == (4, n, n)
