"""Simulated particle stacks with RELION metadata and ground truth.

Output directory layout::

    particles.star            RELION 3.1 optics + particles (image names, micrograph names, CTF)
    Particles/mic_NNNNN.mrcs  one stack per simulated micrograph
    ground_truth.csv          per particle: kind, structure, true angles, shifts, CTF
    structures/structure_NN.mrc  the density of every structure at the particle pixel size
    simulation.json           every parameter, the seed, the noise level and the tamis version

Each image is ``CTF * shift(projection) + noise``, in RELION's particle contrast (density
white after CTF's first lobe). The SNR is the ratio of the variance of the CTF-modulated
particle images (whole box, averaged over views and defocus) to the noise variance.

Ground truth is kept beside the STAR file, not as RELION labels: ``shift_x_px, shift_y_px`` move
the particle's centre away from the box centre, so the ``rlnOriginXAngst/YAngst`` that would
re-centre it are ``origin_x_angst = -shift_x_px * pixel_size`` (also written).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis._progress import progress_bar
from tamis.ctf import compute_ctf
from tamis.errors import TamisError
from tamis.fourier import (
    crop_images,
    fourier_shift,
    irfft2_centered,
    pad_images,
    rfft2_centered,
)
from tamis.geometry import random_euler_angles
from tamis.io.mrc import write_mrc
from tamis.io.star import atomic_path, format_image_names, write_star
from tamis.simulate.common import Optics, StructureSet, draw_defocus, optics_table, write_json
from tamis.simulate.junk import JUNK_KINDS, aggregates, carbon_edges, ice_blobs

__all__ = ["ParticleSimulation", "SimulationResult", "simulate_particles"]


@dataclass
class ParticleSimulation:
    """What to simulate. Lengths in Å unless the name says ``px``."""

    structures: list[str] = field(default_factory=lambda: ["builtin:8zpm"])
    structure_weights: list[float] | None = None
    n_particles: int = 2000
    box_size: int = 64
    pixel_size: float = 2.8
    snr: float = 0.05
    junk_fraction: float = 0.0
    junk_kinds: tuple[str, ...] = JUNK_KINDS
    shift_sigma_px: float = 1.5
    #: coloured noise, as ice and beam-induced blur make it: the noise power is raised by
    #: ``1 + low_res_noise x exp(-(k x low_res_noise_scale)^2)`` at frequency ``k`` (1/A), then
    #: scaled back to the same total variance (0: white noise)
    low_res_noise: float = 0.0
    low_res_noise_scale: float = 60.0
    particles_per_micrograph: int = 100
    bfactor: float = 50.0
    optics: Optics = field(default_factory=Optics)
    float16: bool = False
    seed: int = 0

    def check(self) -> None:
        if self.n_particles < 1:
            raise TamisError("--n must be at least 1")
        if self.low_res_noise < 0 or self.low_res_noise_scale <= 0:
            raise TamisError("low_res_noise must be >= 0 and low_res_noise_scale > 0")
        if self.box_size < 8 or self.box_size % 2:
            raise TamisError(f"--box {self.box_size}: must be even and >= 8")
        if self.pixel_size <= 0:
            raise TamisError("--angpix must be positive")
        if self.snr <= 0:
            raise TamisError("--snr must be positive")
        if not 0 <= self.junk_fraction < 1:
            raise TamisError("--junk must be in [0, 1)")
        bad = [k for k in self.junk_kinds if k not in JUNK_KINDS]
        if bad or (self.junk_fraction > 0 and not self.junk_kinds):
            raise TamisError(f"junk kinds {bad or '[]'}: choose from {', '.join(JUNK_KINDS)}")
        if self.particles_per_micrograph < 1:
            raise TamisError("--per_mic must be at least 1")


@dataclass
class SimulationResult:
    """Where the products are, and the numbers needed to judge results against the truth.

    Images are written normalised as RELION extracts them: the noise has standard deviation 1
    (``noise_std`` is 1; ``signal_variance`` is in the same units).
    """

    star: Path
    ground_truth: Path
    n_particles: int
    noise_std: float
    signal_variance: float


def _noise(shape: torch.Size, config: ParticleSimulation, gen: torch.Generator) -> torch.Tensor:
    """Unit-variance noise images: white, or coloured by ``config.low_res_noise``."""
    white = torch.randn(shape, generator=gen, dtype=torch.float32)
    if config.low_res_noise <= 0:
        return white
    n = shape[-1]
    ky = torch.fft.fftfreq(n, d=config.pixel_size, dtype=torch.float64)
    kx = torch.fft.rfftfreq(n, d=config.pixel_size, dtype=torch.float64)
    k2 = ky[:, None] ** 2 + kx[None, :] ** 2
    power = 1.0 + config.low_res_noise * torch.exp(-k2 * config.low_res_noise_scale**2)
    amp = torch.sqrt(power / power.mean())
    return torch.fft.irfft2(torch.fft.rfft2(white) * amp.float(), s=(n, n))


def simulate_particles(
    config: ParticleSimulation,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
) -> SimulationResult:
    """Simulate a particle data set into ``out_dir`` (see the module docstring for the files)."""
    config.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(config.seed)
    n, nb, p = config.n_particles, config.box_size, config.pixel_size
    structures = StructureSet(
        config.structures,
        box_size=nb,
        pixel_size=p,
        weights=config.structure_weights,
        bfactor=config.bfactor,
        device=device,
    )
    signal_var, peak = structures.signal_level(config.optics, gen)
    noise_std = float(np.sqrt(signal_var / config.snr))

    # ---- the truth for every particle, drawn up front ----------------------------------------
    n_junk = int(round(config.junk_fraction * n))
    kinds = np.array(
        ["particle"] * (n - n_junk)
        + [config.junk_kinds[i % len(config.junk_kinds)] for i in range(n_junk)],
        dtype=object,
    )
    kinds = kinds[torch.randperm(n, generator=gen).numpy()]
    structure = np.where(kinds == "particle", structures.draw(n, gen), -1)
    angles = random_euler_angles(n, gen)
    shifts = torch.randn((n, 2), generator=gen, dtype=torch.float64) * config.shift_sigma_px
    mic = np.arange(n) // config.particles_per_micrograph
    n_mic = int(mic[-1]) + 1
    mdu, mdv, mang = draw_defocus(n_mic, config.optics, gen)
    jitter = (
        torch.randn(n, generator=gen, dtype=torch.float64).numpy() * config.optics.defocus_jitter
    )
    du, dv, dang = mdu[mic] + jitter, mdv[mic] + jitter, mang[mic]

    mic_names = [f"Micrographs/mic_{m + 1:05d}.mrc" for m in range(n_mic)]
    stack_names = [f"Particles/mic_{m + 1:05d}.mrcs" for m in range(n_mic)]
    image_names: list[str] = [""] * n

    # ---- images, a few micrographs' worth at a time ------------------------------------------
    mics_per_batch = max(1, 512 // config.particles_per_micrograph)
    with progress_bar(n, "simulating particles", enabled=show_progress) as bar:
        for m0 in range(0, n_mic, mics_per_batch):
            sel = np.flatnonzero((mic >= m0) & (mic < m0 + mics_per_batch))
            images = _render(
                structures,
                config,
                gen,
                kinds[sel],
                structure[sel],
                angles[sel],
                shifts[sel],
                du[sel],
                dv[sel],
                dang[sel],
                peak,
                device,
            )
            images += _noise(images.shape, config, gen).to(device) * noise_std
            # RELION's extraction convention: background noise of standard deviation 1
            images /= noise_std
            images_np = images.cpu().numpy()
            for m in np.unique(mic[sel]):
                rows = np.flatnonzero(mic[sel] == m)
                write_mrc(out / stack_names[m], images_np[rows], p, float16=config.float16)
                names = format_image_names(range(len(rows)), stack_names[m])
                for r, name in zip(sel[rows], names, strict=True):
                    image_names[r] = name
            bar.advance(len(sel))

    particles = pd.DataFrame(
        {
            "rlnImageName": image_names,
            "rlnMicrographName": [mic_names[m] for m in mic],
            "rlnDefocusU": du,
            "rlnDefocusV": dv,
            "rlnDefocusAngle": dang,
            "rlnCtfBfactor": 0.0,
            "rlnCtfScalefactor": 1.0,
            "rlnPhaseShift": 0.0,
            "rlnOpticsGroup": 1,
        }
    )
    star = out / "particles.star"
    write_star(
        {"optics": optics_table(config.optics, p, box_size=nb), "particles": particles}, star
    )

    ang = angles.numpy()
    sh = shifts.numpy()
    names = [st.name for st in structures.structures]
    truth = pd.DataFrame(
        {
            "image_name": image_names,
            "micrograph_name": [mic_names[m] for m in mic],
            "kind": kinds,
            "structure": np.where(structure >= 0, structure + 1, 0),  # 1-based; 0 for junk
            "structure_name": [names[s] if s >= 0 else "" for s in structure],
            "rot": ang[:, 0],
            "tilt": ang[:, 1],
            "psi": ang[:, 2],
            "shift_x_px": sh[:, 0],
            "shift_y_px": sh[:, 1],
            "origin_x_angst": -sh[:, 0] * p,
            "origin_y_angst": -sh[:, 1] * p,
            "defocus_u": du,
            "defocus_v": dv,
            "defocus_angle": dang,
        }
    )
    truth_path = out / "ground_truth.csv"
    with atomic_path(truth_path) as tmp:
        truth.to_csv(tmp, index=False)
    volumes = structures.write_volumes(out / "structures")
    write_json(
        out / "simulation.json",
        {
            "product": "particles",
            "config": config,
            "structure_files": {names[i]: f"structures/{v}" for i, v in enumerate(volumes)},
            "signal_variance": signal_var / noise_std**2,
            "noise_std": 1.0,
            "intensity_scale": 1.0 / noise_std,
            "counts": {str(k): int((kinds == k).sum()) for k in np.unique(kinds)},
        },
    )
    return SimulationResult(star, truth_path, n, 1.0, signal_var / noise_std**2)


def _render(
    structures: StructureSet,
    config: ParticleSimulation,
    gen: torch.Generator,
    kinds: np.ndarray,
    structure: np.ndarray,
    angles: torch.Tensor,
    shifts: torch.Tensor,
    du: np.ndarray,
    dv: np.ndarray,
    dang: np.ndarray,
    peak: float,
    device: str | torch.device,
) -> torch.Tensor:
    """Noise-free images ``(b, n, n)`` of one batch: projections or junk, shifted, CTF applied.

    Everything is rendered in a box twice as large and cropped after the CTF, so film edges,
    ice and CTF fringes continue past the box edge as they do in a micrograph.
    """
    nb, b = config.box_size, len(kinds)
    big = 2 * nb
    images = torch.zeros((b, big, big), dtype=torch.float32, device=device)
    real = np.flatnonzero(kinds == "particle")
    if len(real):
        proj = irfft2_centered(structures.slices(structure[real], angles[real]), (nb, nb))
        images[torch.as_tensor(real, device=device)] = pad_images(proj, big)
    agg = np.flatnonzero(kinds == "aggregate")
    if len(agg):
        images[torch.as_tensor(agg, device=device)] = aggregates(structures, len(agg), gen, big)
    for kind, make in (
        ("ice", lambda k: 1.5 * peak * ice_blobs(k, (big, big), gen, radius_px=nb / 4)),
        ("carbon", lambda k: 0.8 * peak * carbon_edges(k, (big, big), gen, max_offset_px=nb / 4)),
    ):
        rows = np.flatnonzero(kinds == kind)
        if len(rows):
            images[torch.as_tensor(rows, device=device)] = make(len(rows)).to(images)
    # "empty" rows stay zero: noise only.
    spectra = fourier_shift(
        rfft2_centered(images), shifts.to(device=device, dtype=torch.float32), (big, big)
    )
    ctf = compute_ctf(
        (big, big),
        pixel_size=config.pixel_size,
        defocus_u=torch.as_tensor(du),
        defocus_v=torch.as_tensor(dv),
        defocus_angle=torch.as_tensor(dang),
        voltage=config.optics.voltage,
        spherical_aberration=config.optics.spherical_aberration,
        amplitude_contrast=config.optics.amplitude_contrast,
        device=device,
    )
    return crop_images(irfft2_centered(spectra * ctf, (big, big)), nb).contiguous()
