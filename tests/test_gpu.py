"""CPU and CUDA agree: the Fourier kernels on the same inputs, and Class2D (EM, VDAM) and the 3D
initial model run end to end on each device from the same seed.

These tests need a CUDA device and skip without one (CI has none): run them on a GPU machine with
``pytest tests/test_gpu.py``. ``TAMIS_GPU_REPORT=<file>`` appends each measured difference to
that file as JSON lines, so the tolerances below can be read against what was measured."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tamis.class2d import Class2DOptions, run_class2d
from tamis.class2d.fourier2d import FourierWindow
from tamis.geometry import euler_to_matrix, random_euler_angles
from tamis.io.mrc import read_mrc
from tamis.io.star import read_star
from tamis.padded_grid import GridSplat, padded_transforms, reconstruct, reference_grids
from tamis.refine.fourier3d import back_project, project
from tamis.refine.initial_model import InitialModelOptions, run_initial_model
from tamis.simulate.particles import ParticleSimulation, simulate_particles

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)"
)


def _report(name: str, **values) -> None:
    path = os.environ.get("TAMIS_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **values}, default=float) + "\n")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.cpu().to(torch.complex128), b.cpu().to(torch.complex128)
    return float((a - b).abs().norm() / b.abs().norm())


def _rotations(n: int, seed: int) -> torch.Tensor:
    ang = random_euler_angles(n, torch.Generator().manual_seed(seed))
    return euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])


def test_projection_and_back_projection_agree():
    gen = torch.Generator().manual_seed(4)
    vols = torch.randn((3, 32, 32, 32), generator=gen, dtype=torch.float64)
    window = FourierWindow.create(32, 16)
    rots = _rotations(300, seed=2)
    grids = reference_grids(vols, pad=2)
    cpu = project(grids, rots, window, pad=2)
    gpu = project(grids.cuda(), rots.cuda(), window, pad=2)
    err_p = _rel(gpu, cpu)
    y = torch.randn(cpu.shape, generator=gen, dtype=torch.complex64)
    yw = torch.rand(cpu.shape, generator=gen)
    d_c, w_c = back_project(y, yw, rots, window, pad=2)
    d_g, w_g = back_project(y.cuda(), yw.cuda(), rots.cuda(), window, pad=2)
    err_d, err_w = _rel(d_g, d_c), _rel(w_g, w_c)
    _report("project/back_project", projection=err_p, data=err_d, weight=err_w)
    assert err_p < 1e-5  # float32 samples, the same trilinear weights
    # 3D splats sum each call in float32 (the GPU's atomics in another order), totals in float64
    assert err_d < 1e-5 and err_w < 1e-5


def test_splat_and_reconstruction_agree_in_2d():
    gen = torch.Generator().manual_seed(6)
    pos = (torch.rand((5000, 2), generator=gen, dtype=torch.float64) - 0.5) * 40
    data = torch.randn((4, 5000), generator=gen, dtype=torch.complex128)
    weight = torch.rand((4, 5000), generator=gen, dtype=torch.float64)
    out = []
    for dev in ("cpu", "cuda"):
        s = GridSplat(4, 48, 2, dev)
        s.add(pos.to(dev), data.to(dev), weight.to(dev))
        d, w = s.grids()
        tau2 = torch.full((4, 13), 10.0, dtype=torch.float64, device=dev)
        rec = reconstruct(d, w, box=24, r_max=12, tau2=tau2, pad=2)
        out.append((d, w, rec))
    errs = [_rel(g, c) for c, g in zip(out[0], out[1], strict=True)]
    _report("splat/reconstruct 2D", data=errs[0], weight=errs[1], reconstruction=errs[2])
    assert max(errs) < 1e-10  # 2D splats sum in float64


@pytest.fixture(scope="module")
def particles2d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu2d") / "sim"
    simulate_particles(
        ParticleSimulation(
            structures=["builtin:8zpm", "builtin:8zpm@R"],
            n_particles=240, box_size=32, pixel_size=4.5, snr=0.3, junk_fraction=0.1,
            junk_kinds=("ice", "empty"), particles_per_micrograph=60, seed=2,
        ),
        out,
    )  # fmt: skip
    return out / "particles.star"


def _compare_runs(name: str, a, b) -> tuple[float, float]:
    """Fraction of particles in the same class, and the largest class-image difference over the
    largest class-image value."""
    pa = read_star(a.data)["particles"]["rlnClassNumber"].to_numpy()
    pb = read_star(b.data)["particles"]["rlnClassNumber"].to_numpy()
    same = float(np.mean(pa == pb))
    ra, rb = read_mrc(a.classes)[0], read_mrc(b.classes)[0]
    diff = float(np.abs(ra - rb).max() / np.abs(ra).max())
    _report(name, same_class=same, class_image_difference=diff)
    return same, diff


@pytest.mark.parametrize("algo", ["em", "vdam"])
def test_class2d_runs_agree(particles2d: Path, tmp_path: Path, algo: str):
    make = Class2DOptions.gui_em if algo == "em" else Class2DOptions.gui_vdam
    kw = dict(
        K=4, iter=4 if algo == "em" else 12, particle_diameter=130.0, psi_step=20.0,
        offset_range=3.0, offset_step=1.5, random_seed=5, batch_size=64,
    )  # fmt: skip
    if algo == "vdam":
        kw.update(grad_ini_subset=100, grad_fin_subset=240)
    runs = [
        run_class2d(particles2d, str(tmp_path / dev / "run"), make(device=dev, **kw), log=print)
        for dev in ("cpu", "cuda")
    ]
    same, diff = _compare_runs(f"class2d {algo}", *runs)
    # float32 sums in another order move near-tied particles; the classes stay the same
    assert same >= 0.95
    assert diff < 0.02


def test_initial_model_runs_agree(tmp_path: Path):
    sim = tmp_path / "sim"
    simulate_particles(
        ParticleSimulation(
            structures=["builtin:8zpm"], n_particles=400, box_size=32, pixel_size=5.0, snr=0.1,
            seed=3,
        ),
        sim,
    )  # fmt: skip
    maps = []
    for dev in ("cpu", "cuda"):
        opts = InitialModelOptions(
            iter=8, K=1, particle_diameter=130.0, j=2, random_seed=1, grad_write_iter=4,
            grad_ini_subset=150, grad_fin_subset=200, device=dev,
        )  # fmt: skip
        res = run_initial_model(
            str(sim / "particles.star"), str(tmp_path / dev / "run"), opts, log=print
        )
        maps.append(torch.from_numpy(read_mrc(res.initial_model)[0]).to(torch.float64).flatten())
    corr = float(torch.corrcoef(torch.stack(maps))[0, 1])
    _report("initial model", map_correlation=corr)
    assert corr > 0.98


def test_padded_transforms_agree():
    vols = torch.randn((2, 24, 24, 24), generator=torch.Generator().manual_seed(1))
    a = padded_transforms(vols.double(), pad=2)
    b = padded_transforms(vols.double().cuda(), pad=2)
    err = _rel(b, a)
    _report("padded_transforms 3D", error=err)
    assert err < 1e-12


def test_motion_correction_agrees(tmp_path):
    """One simulated movie (MRC, 512², 16 frames) corrected on each device: the same global
    track, local model and sums."""
    from tamis.io.mrc import read_mrc as _read
    from tamis.prep.motioncorr import MotionCorrOptions, correct_movie
    from tamis.simulate.movies import MovieSimulation, simulate_movies

    simulate_movies(
        MovieSimulation(n_movies=1, height_px=512, width_px=512, n_frames=16, pixel_size=1.5,
                        particles_per_movie=10, local_px=4.0, file_format="mrc", seed=5),
        tmp_path,
    )  # fmt: skip
    gain, _ = _read(tmp_path / "gain.mrc")
    out = {}
    for dev in ("cpu", "cuda"):
        o = MotionCorrOptions(patch_x=4, patch_y=4, save_noDW=True, device=dev)
        out[dev] = correct_movie(tmp_path / "Movies" / "movie_00001.mrc", o, pixel_size=1.5,
                                 voltage=300.0, gain=gain)  # fmt: skip
    (mc, ic), (mg, ig) = out["cpu"], out["cuda"]
    d_global = float(np.nanmax(np.abs(mc.global_shifts - mg.global_shifts)))
    d_local = float(np.abs(mc.local_coeffs - mg.local_coeffs).max())
    d_sum = float(np.linalg.norm(ic["sum"] - ig["sum"]) / np.linalg.norm(ic["sum"]))
    _report("motion_correction", global_px=d_global, local_coeff=d_local, sum_rel=d_sum,
            cpu_s=mc.seconds, cuda_s=mg.seconds)  # fmt: skip
    assert d_global < 0.02 and d_local < 0.05 and d_sum < 1e-3
