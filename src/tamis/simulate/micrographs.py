"""Simulated micrographs with particles at known coordinates.

Output directory layout::

    micrographs.star           RELION 3.1 optics + micrographs (names, per-micrograph CTF)
    Micrographs/mic_NNNNN.mrc  the micrographs (raw contrast: particles dark, as recorded)
    truth/mic_NNNNN.star       true particle centres, RELION coordinate-file layout
    truth/coordinates.star     micrograph -> truth file (RELION's autopick.star layout)
    ground_truth.csv           every object: micrograph, x, y, kind, structure, angles
    simulation.json            parameters, seed, noise level, tamis version

A micrograph is ``background - CTF * (sum of shifted projections + junk) + noise``. The CTF is
applied to the whole micrograph (fringes cross particle boundaries as in real data). The ice
gradient is a linear ramp of background level and noise strength across the micrograph. The SNR
is defined as for particle stacks: variance of one CTF-modulated particle over a box of 1.5
particle diameters, divided by the noise variance. Coordinates are pixels, x along columns and y
along rows, origin at the first array element (RELION's convention); ``--invert_contrast`` at
extraction turns the particles white.
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
from tamis.fourier import fourier_shift, irfft2_centered, pad_images, rfft2_centered
from tamis.geometry import random_euler_angles
from tamis.io.coords import write_coordinate_list, write_coordinates
from tamis.io.mrc import write_mrc
from tamis.io.star import atomic_path, write_star
from tamis.simulate.common import Optics, StructureSet, draw_defocus, optics_table, write_json
from tamis.simulate.junk import aggregates, carbon_edges, ice_blobs, smooth_noise
from tamis.simulate.structure import structure_diameter

__all__ = ["MicrographSimulation", "MicrographResult", "simulate_micrographs"]


@dataclass
class MicrographSimulation:
    """What to simulate. Lengths in Å unless the name says ``px``."""

    structures: list[str] = field(default_factory=lambda: ["builtin:8zpm"])
    structure_weights: list[float] | None = None
    n_micrographs: int = 4
    height_px: int = 1024
    width_px: int = 1024
    pixel_size: float = 1.5
    particles_per_micrograph: int = 80
    snr: float = 0.1
    #: Minimum centre distance in Å; default: the largest structure's diameter.
    min_distance: float | None = None
    #: Relative change of background level and noise strength across a micrograph.
    ice_gradient: float = 0.3
    #: Mean number of ice crystals and of aggregates per micrograph (Poisson).
    ice_per_micrograph: float = 0.5
    aggregates_per_micrograph: float = 0.0
    #: Fraction of micrographs crossed by a carbon-film edge.
    carbon_fraction: float = 0.0
    #: Fraction of the noise variance scattered by the amorphous ice, and so modulated by the
    #: CTF like the particles (the Thon rings of real micrographs); the rest is white shot noise.
    ice_scattering: float = 0.0
    bfactor: float = 50.0
    optics: Optics = field(default_factory=Optics)
    seed: int = 0

    def check(self) -> None:
        if self.n_micrographs < 1:
            raise TamisError("--n must be at least 1")
        if min(self.height_px, self.width_px) < 64:
            raise TamisError("micrographs must be at least 64 px on each side")
        if self.pixel_size <= 0 or self.snr <= 0:
            raise TamisError("--angpix and --snr must be positive")
        if not 0 <= self.carbon_fraction <= 1:
            raise TamisError("--carbon must be in [0, 1]")
        if not 0 <= self.ice_scattering < 1:
            raise TamisError("--ice_scattering must be in [0, 1)")


@dataclass
class MicrographResult:
    star: Path
    coordinates: Path
    ground_truth: Path
    n_particles: int
    noise_std: float


def simulate_micrographs(
    config: MicrographSimulation,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
) -> MicrographResult:
    """Simulate micrographs into ``out_dir`` (see the module docstring for the files)."""
    config.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(config.seed)
    p = config.pixel_size
    h, w = config.height_px, config.width_px
    diameter = max(structure_diameter(spec, bfactor=config.bfactor) for spec in config.structures)
    box = _even(1.5 * diameter / p, 16, 1024)
    structures = StructureSet(
        config.structures,
        box_size=box,
        pixel_size=p,
        weights=config.structure_weights,
        bfactor=config.bfactor,
        device=device,
    )
    signal_var, peak = structures.signal_level(config.optics, gen)
    noise_std = float(np.sqrt(signal_var / config.snr))
    min_dist_px = (config.min_distance if config.min_distance is not None else diameter) / p
    du, dv, dang = draw_defocus(config.n_micrographs, config.optics, gen)

    mic_names, truth_files, rows = [], {}, []
    with progress_bar(config.n_micrographs, "simulating micrographs", enabled=show_progress) as bar:
        for m in range(config.n_micrographs):
            name = f"Micrographs/mic_{m + 1:05d}.mrc"
            image, objects = _one_micrograph(
                structures,
                config,
                gen,
                (h, w),
                box,
                diameter / p,
                min_dist_px,
                peak,
                noise_std,
                (du[m], dv[m], dang[m]),
                device,
            )
            write_mrc(out / name, image.cpu().numpy(), p)
            parts = objects[objects["kind"] == "particle"]
            truth_name = f"truth/mic_{m + 1:05d}.star"
            write_coordinates(
                out / truth_name,
                parts["x"].to_numpy(),
                parts["y"].to_numpy(),
                fom=np.ones(len(parts)),
                class_number=parts["structure"].to_numpy(),
                psi=parts["psi"].to_numpy(),
            )
            mic_names.append(name)
            truth_files[name] = truth_name
            rows.append(objects.assign(micrograph_name=name))
            bar.advance()

    micrographs = pd.DataFrame(
        {
            "rlnMicrographName": mic_names,
            "rlnOpticsGroup": 1,
            "rlnDefocusU": du,
            "rlnDefocusV": dv,
            "rlnCtfAstigmatism": du - dv,
            "rlnDefocusAngle": dang,
            "rlnPhaseShift": 0.0,
        }
    )
    star = out / "micrographs.star"
    write_star(
        {"optics": optics_table(config.optics, p, box_size=None), "micrographs": micrographs}, star
    )
    coords = out / "truth" / "coordinates.star"
    write_coordinate_list(coords, truth_files)
    truth = pd.concat(rows, ignore_index=True)
    truth = truth[["micrograph_name", *[c for c in truth.columns if c != "micrograph_name"]]]
    truth_path = out / "ground_truth.csv"
    with atomic_path(truth_path) as tmp:
        truth.to_csv(tmp, index=False)
    volumes = structures.write_volumes(out / "structures")
    names = [st.name for st in structures.structures]
    write_json(
        out / "simulation.json",
        {
            "product": "micrographs",
            "config": config,
            "particle_diameter_angst": diameter,
            "projection_box_px": box,
            "structure_files": {names[i]: f"structures/{v}" for i, v in enumerate(volumes)},
            "signal_variance": signal_var,
            "noise_std": noise_std,
            "counts": truth["kind"].value_counts().to_dict(),
        },
    )
    n_particles = int((truth["kind"] == "particle").sum())
    return MicrographResult(star, coords, truth_path, n_particles, noise_std)


def _even(x: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, 2 * int(np.ceil(x / 2)))))


def _place(
    n: int, shape: tuple[int, int], margin: float, min_dist: float, gen: torch.Generator
) -> np.ndarray:
    """Up to ``n`` centres ``(k, 2)`` as (x, y) at least ``min_dist`` apart (dart throwing)."""
    h, w = shape
    cand = torch.rand((20 * n + 100, 2), generator=gen, dtype=torch.float64).numpy()
    cand = margin + cand * np.array([w - 2 * margin, h - 2 * margin])
    kept = np.empty((0, 2))
    for c in cand:
        if len(kept) >= n:
            break
        if not len(kept) or np.min(np.sum((kept - c) ** 2, axis=1)) >= min_dist**2:
            kept = np.vstack([kept, c])
    return kept


def _paste(canvas: torch.Tensor, images: torch.Tensor, centres: np.ndarray) -> None:
    """Add ``images`` ``(k, b, b)`` onto ``canvas`` ``(h, w)`` with their origin pixel at ``centres``
    (integer x, y); parts falling outside are dropped. Sub-pixel parts are the caller's shift."""
    if not len(centres):
        return
    h, w = canvas.shape
    k, b, _ = images.shape
    off = torch.arange(b, device=canvas.device) - b // 2
    cx = torch.as_tensor(centres[:, 0], device=canvas.device, dtype=torch.long)
    cy = torch.as_tensor(centres[:, 1], device=canvas.device, dtype=torch.long)
    ys = cy[:, None, None] + off[None, :, None]
    xs = cx[:, None, None] + off[None, None, :]
    ys, xs = torch.broadcast_tensors(ys, xs)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    flat = (ys * w + xs)[inside]
    canvas.view(-1).index_add_(0, flat, images[inside].to(canvas.dtype))


def _one_micrograph(
    structures: StructureSet,
    config: MicrographSimulation,
    gen: torch.Generator,
    shape: tuple[int, int],
    box: int,
    diameter_px: float,
    min_dist_px: float,
    peak: float,
    noise_std: float,
    defocus: tuple[float, float, float],
    device: str | torch.device,
) -> tuple[torch.Tensor, pd.DataFrame]:
    h, w = shape
    canvas = torch.zeros(shape, dtype=torch.float32, device=device)
    n_ice = int(
        torch.poisson(torch.tensor([float(config.ice_per_micrograph)]), generator=gen).item()
    )
    n_agg = int(
        torch.poisson(torch.tensor([float(config.aggregates_per_micrograph)]), generator=gen).item()
    )
    n_part = config.particles_per_micrograph
    centres = _place(n_part + n_ice + n_agg, shape, diameter_px / 2, min_dist_px, gen)
    kinds = np.array(["particle"] * n_part + ["ice"] * n_ice + ["aggregate"] * n_agg, dtype=object)[
        : len(centres)
    ]
    kinds = kinds[torch.randperm(len(kinds), generator=gen).numpy()]
    k = len(centres)
    structure = np.where(kinds == "particle", structures.draw(k, gen), -1)
    angles = random_euler_angles(k, gen)
    whole = np.floor(centres)
    frac = torch.as_tensor(centres - whole, dtype=torch.float32)

    # Particles: projection, sub-pixel shift, paste.
    sel = np.flatnonzero(kinds == "particle")
    if len(sel):
        spectra = fourier_shift(
            structures.slices(structure[sel], angles[sel]), frac[sel].to(device), (box, box)
        )
        _paste(canvas, irfft2_centered(spectra, (box, box)), whole[sel])
    # Aggregates: clumps of 3 to 6 projections in a box twice the particle box.
    sel = np.flatnonzero(kinds == "aggregate")
    if len(sel):
        _paste(canvas, aggregates(structures, len(sel), gen, 2 * box), whole[sel])
    # Ice crystals: dense faceted blobs about one to two particle diameters across.
    sel = np.flatnonzero(kinds == "ice")
    if len(sel):
        blobs = 1.5 * peak * ice_blobs(len(sel), (2 * box, 2 * box), gen, radius_px=0.6 * box)
        _paste(canvas, blobs.to(device=device, dtype=torch.float32), whole[sel])
    carbon = torch.rand((), generator=gen).item() < config.carbon_fraction
    if carbon:
        edge = carbon_edges(1, (max(h, w),) * 2, gen, max_offset_px=0.3 * min(h, w))[0]
        edge = edge[(edge.shape[0] - h) // 2 :][:h, (edge.shape[1] - w) // 2 :][:, :w]
        canvas += 0.8 * peak * edge.to(device=device, dtype=torch.float32)

    # CTF over the whole micrograph, on a square canvas with a margin of at least one particle
    # box, so CTF fringes (delocalised by well under a box) do not wrap around.
    side = _even(max(h, w) + 2 * max(box, 128), 0, 1 << 16)
    big = pad_images(_pad_to_square(canvas), side)
    du, dv, dang = defocus
    ctf = compute_ctf(
        (side, side),
        pixel_size=config.pixel_size,
        defocus_u=du,
        defocus_v=dv,
        defocus_angle=dang,
        voltage=config.optics.voltage,
        spherical_aberration=config.optics.spherical_aberration,
        amplitude_contrast=config.optics.amplitude_contrast,
        device=device,
    )
    signal = irfft2_centered(rfft2_centered(big) * ctf, (side, side))
    signal = _crop_from_square(signal, side, (h, w))

    # Ice gradient: background level and noise strength ramp across the micrograph.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    direction = 2 * torch.pi * torch.rand((), generator=gen)
    ramp = (xx * direction.cos() + yy * direction.sin()) / 2**0.5
    ramp = ramp + 0.3 * smooth_noise(1, (h, w), max(h, w) / 8, gen)[0].float()
    strength = (1.0 + config.ice_gradient * ramp).clamp(min=0.2).to(device)
    white = torch.randn((h, w), generator=gen).to(device)
    if config.ice_scattering > 0:
        # amorphous ice: white noise through the same CTF, scaled to its share of the variance
        ice = torch.randn((side, side), generator=gen).to(device)
        ice = irfft2_centered(rfft2_centered(ice) * ctf, (side, side))
        ice = _crop_from_square(ice, side, (h, w))
        ice = ice / ice.std().clamp(min=1e-12)
        f = config.ice_scattering
        white = (1 - f) ** 0.5 * white + f**0.5 * ice
    noise = white * noise_std * strength
    background = -config.ice_gradient * noise_std * ramp.to(device)
    image = background - signal + noise

    ang = angles.numpy()
    objects = pd.DataFrame(
        {
            "x": centres[:, 0],
            "y": centres[:, 1],
            "kind": kinds,
            "structure": np.where(structure >= 0, structure + 1, 0),
            "rot": ang[:, 0],
            "tilt": ang[:, 1],
            "psi": ang[:, 2],
            "defocus_u": du,
            "defocus_v": dv,
            "defocus_angle": dang,
            "carbon_edge_in_micrograph": carbon,
        }
    )
    return image, objects


def _pad_to_square(img: torch.Tensor) -> torch.Tensor:
    h, w = img.shape
    n = max(h, w)
    out = img.new_zeros((n, n))
    out[(n - h) // 2 : (n - h) // 2 + h, (n - w) // 2 : (n - w) // 2 + w] = img
    return out


def _crop_from_square(img: torch.Tensor, side: int, shape: tuple[int, int]) -> torch.Tensor:
    h, w = shape
    n = max(h, w)
    o = side // 2 - n // 2
    sq = img[o : o + n, o : o + n]
    return sq[(n - h) // 2 : (n - h) // 2 + h, (n - w) // 2 : (n - w) // 2 + w].contiguous()
