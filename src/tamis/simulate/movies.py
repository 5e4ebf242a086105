"""Simulated movies with known motion, for motion correction's tests, benchmarks and the demo.

A clean micrograph (particles through the CTF, from :mod:`tamis.simulate.micrographs` without
noise) is the specimen. Frame ``i`` records electrons counted (Poisson) at ``dose_per_frame``
e/Å² with the specimen moved by a global trajectory plus a smooth local deformation, its
high-resolution signal faded by radiation damage (Grant & Grigorieff's critical exposure), seen
through a gain pattern (per-pixel sensitivity, dead pixels), with hot pixels.

Output directory layout::

    movies.star                 RELION import output (optics + data_movies)
    Movies/movie_NNNNN.tif|mrc  the movies (TIFF: LZW, uint8, stored upside down as TIFF is)
    gain.mrc                    the gain reference to multiply (0 at dead pixels)
    truth/movie_NNNNN.star      the true motion as a motion-correction metadata file: global
                                shifts per frame and the local model, in the sign convention
                                of the shifts motion correction applies
    truth/movie_NNNNN_clean.mrc the clean specimen (unit-mean exposure) for FRC checks
    micrographs.star, truth/... the clean micrographs' particle truth (picking, CTF)
    simulation.json             parameters and seed
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis._progress import progress_bar
from tamis.errors import TamisError
from tamis.fourier import fourier_shift, rfft_frequencies
from tamis.io.motion_star import MovieMotion, write_motion_star
from tamis.io.mrc import read_mrc, write_mrc
from tamis.io.star import atomic_path, write_star
from tamis.motion_model import critical_exposure, polynomial_basis, resample_polynomial
from tamis.simulate.common import write_json
from tamis.simulate.junk import smooth_noise
from tamis.simulate.micrographs import MicrographSimulation

__all__ = ["MovieSimulation", "simulate_movies", "write_tiff_movie"]


@dataclass
class MovieSimulation:
    """What to simulate; lengths in pixels of the movie unless named otherwise."""

    n_movies: int = 2
    height_px: int = 1024
    width_px: int = 1024
    n_frames: int = 40
    dose_per_frame: float = 1.0  # e/Å² per frame
    pixel_size: float = 1.0  # Å
    voltage: float = 300.0
    particles_per_movie: int = 30
    structures: tuple[str, ...] = ("builtin:8zpm",)
    contrast: float = 0.15  # standard deviation of the specimen's exposure modulation
    drift_px: float = 20.0  # length of the global track
    local_px: float = 2.0  # largest local displacement at the last frame
    gain_spread: float = 0.1  # relative sensitivity spread of the detector
    dead_pixels: int = 16
    hot_pixels: int = 8
    damage: bool = True
    file_format: str = "tiff"  # "tiff" or "mrc"
    #: "epu": also an EPU-like session tree (Images-Disc1/GridSquare_*/Data/ with one exposure
    #: XML beside each movie, *_fractions.tiff), for `tamis it --session`
    session: str = ""
    seed: int = 0

    def check(self) -> None:
        if self.session not in ("", "epu"):
            raise TamisError(f"session {self.session!r}: use epu or leave it empty")
        if self.file_format not in ("tiff", "mrc"):
            raise TamisError(f"file format {self.file_format!r}: use tiff or mrc")
        if self.n_frames < 3:
            raise TamisError(f"{self.n_frames} frames: motion correction needs at least 3")
        if self.height_px % 2 or self.width_px % 2:
            raise TamisError("movie sizes must be even")
        if self.dose_per_frame <= 0:
            raise TamisError("dose_per_frame must be positive")


def write_tiff_movie(path: str | Path, frames: np.ndarray, pixel_size: float) -> None:
    """Frames ``(n, ny, nx)`` (in the grid as RELION reads it) as an LZW TIFF, each page stored
    upside down as TIFF's origin is top-left; the pixel size in XResolution (cm)."""
    import tifffile

    from tamis.io.star import atomic_path

    res = 1e8 / pixel_size  # pixels per cm
    with atomic_path(Path(path)) as tmp, tifffile.TiffWriter(tmp) as tif:
        for f in frames:
            tif.write(
                np.ascontiguousarray(f[::-1]),
                compression="lzw",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                contiguous=False,
            )


_EPU_XML = """<MicroscopeImage xmlns="http://schemas.datacontract.org/2004/07/Fei.SharedObjects" \
xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
<CustomData xmlns:a="http://schemas.microsoft.com/2003/10/Serialization/Arrays">
<a:KeyValueOfstringanyType><a:Key>Dose</a:Key><a:Value>{dose_m2!r}</a:Value></a:KeyValueOfstringanyType>
<a:KeyValueOfstringanyType><a:Key>AppliedDefocus</a:Key><a:Value>-1.5E-06</a:Value></a:KeyValueOfstringanyType>
<a:KeyValueOfstringanyType><a:Key>DetectorCommercialName</a:Key><a:Value>tamis simulated counting camera</a:Value></a:KeyValueOfstringanyType>
</CustomData>
<SpatialScale><pixelSize><x><numericValue>{pixel_m!r}</numericValue></x><y><numericValue>{pixel_m!r}</numericValue></y></pixelSize></SpatialScale>
<microscopeData><acquisition><camera>
<Binning xmlns:a="http://schemas.datacontract.org/2004/07/System.Drawing"><a:x>1</a:x><a:y>1</a:y></Binning>
<CameraSpecificInput xmlns:a="http://schemas.microsoft.com/2003/10/Serialization/Arrays">
<a:KeyValueOfstringanyType><a:Key>SuperResolutionFactor</a:Key><a:Value>1</a:Value></a:KeyValueOfstringanyType>
<a:KeyValueOfstringanyType><a:Key>FractionationSettings</a:Key>\
<a:Value xmlns:b="http://schemas.datacontract.org/2004/07/Fei.Applications.Common.Omp.Interface">\
<b:NumberOffractions>{frames}</b:NumberOffractions></a:Value></a:KeyValueOfstringanyType>
<a:KeyValueOfstringanyType><a:Key>ElectronCountingEnabled</a:Key><a:Value>true</a:Value></a:KeyValueOfstringanyType>
</CameraSpecificInput>
<ExposureTime>{seconds}</ExposureTime><Name>EF-CCD</Name>
</camera></acquisition>
<gun><AccelerationVoltage>{volts}</AccelerationVoltage></gun>
<instrument><InstrumentID>9999</InstrumentID></instrument>
</microscopeData>
</MicroscopeImage>
"""


def _epu_exposure(root: Path, m: int, movie: Path, config: MovieSimulation) -> str:
    """One EPU exposure: its XML (the fields MDCatch reads, EPU's namespaces and units: metres,
    volts, e/m²) and the movie linked beside it as ``*_fractions.tiff``."""
    data = root / "Images-Disc1" / f"GridSquare_{1000 + m // 4}" / "Data"
    data.mkdir(parents=True, exist_ok=True)
    stem = f"FoilHole_{2000 + m}_Data_3000_{m + 1}_20261204_120000"
    dose = config.dose_per_frame * config.n_frames
    (data / f"{stem}.xml").write_text(
        _EPU_XML.format(
            dose_m2=dose * 1e20, pixel_m=config.pixel_size * 1e-10, frames=config.n_frames,
            seconds=1.0, volts=int(config.voltage * 1000),
        )
    )  # fmt: skip
    link = data / f"{stem}_fractions{movie.suffix}f" if movie.suffix == ".tif" else None
    link = link or data / f"{stem}_fractions{movie.suffix}"
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(Path("../../../..") / movie.relative_to(root.parent))
    if m == 0:  # the camera's gain reference, where EPU's K3 sessions keep it
        shutil.copy(root.parent / "gain.mrc", data / f"{stem}_gain.mrc")
    return str(link.relative_to(root))


def _write_mrc_counts(path: Path, frames: np.ndarray, pixel_size: float) -> None:
    """Counts as an MRC stack of mode 6 (uint16), as counting cameras' MRC movies are."""
    import mrcfile

    from tamis.io.star import atomic_path

    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(frames.astype(np.uint16))
        mrc.set_image_stack()
        mrc.voxel_size = pixel_size


def _trajectory(n: int, drift: float, gen: torch.Generator) -> np.ndarray:
    """Specimen displacement per frame ``(n, 2)``: a fast start that slows (exponential), a
    random direction change, and a small random walk; 0 at frame 0."""
    u = torch.rand(4, generator=gen, dtype=torch.float64).numpy()
    t = np.arange(n, dtype=np.float64)
    tau = n * (0.15 + 0.2 * u[0])
    a1, a2 = 2 * np.pi * u[1], 2 * np.pi * u[1] + (u[2] - 0.5) * 1.5
    path = (1 - np.exp(-t / tau))[:, None] * np.array([np.cos(a1), np.sin(a1)])
    path += (t / n)[:, None] * 0.3 * np.array([np.cos(a2), np.sin(a2)])
    walk = torch.randn((n, 2), generator=gen, dtype=torch.float64).numpy() * 0.03
    path += np.cumsum(walk, 0)
    path -= path[0]
    length = np.abs(np.diff(path, axis=0)).sum() or 1.0
    return path * drift / length


def _local_coeffs(n: int, amplitude: float, gen: torch.Generator) -> np.ndarray:
    """RELION-model coefficients ``(2, 18)`` of a smooth deformation with zero spatial mean
    over the image, reaching about ``amplitude`` px at the last frame."""
    c = np.zeros((2, 18))
    r = torch.randn((2, 5), generator=gen, dtype=torch.float64).numpy()
    zl = float(n - 1)
    for a in range(2):
        # linear-in-time terms of x, y, x², y², xy (x² and y² made zero-mean by the z term)
        c[a, 3], c[a, 9], c[a, 15] = r[a, 0], r[a, 1], r[a, 2]
        c[a, 6], c[a, 12] = r[a, 3], r[a, 4]
        c[a, 0] = -(r[a, 3] + r[a, 4]) / 12.0
    # scale: largest displacement over a coarse grid at the last frame
    g = np.linspace(-0.5, 0.5, 9)
    xx, yy = np.meshgrid(g, g)
    basis = polynomial_basis(xx.ravel(), yy.ravel(), np.full(xx.size, zl))
    peak = np.abs(basis @ c.T).max() or 1.0
    return c * amplitude / peak


def simulate_movies(
    config: MovieSimulation,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
    specimen: MicrographSimulation | None = None,
) -> Path:
    """Simulate movies into ``out_dir`` (see the module docstring); returns ``movies.star``.

    ``specimen``: the micrograph simulation whose images are the specimens (its noise then moves
    with the specimen, as ice does; its size, pixel size, count and seed are the movies'); by
    default noise-free micrographs of ``config.structures``."""
    from tamis.simulate.micrographs import simulate_micrographs

    config.check()
    out = Path(out_dir)
    (out / "Movies").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(config.seed)
    h, w, n = config.height_px, config.width_px, config.n_frames
    # the specimens: noise-free micrographs with particles (and their truth files)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        if specimen is None:
            specimen = MicrographSimulation(
                structures=list(config.structures),
                particles_per_micrograph=config.particles_per_movie,
                snr=1e9,
                ice_gradient=0.0,
                ice_per_micrograph=0.0,
            )
        specimen = replace(
            specimen, n_micrographs=config.n_movies, height_px=h, width_px=w,
            pixel_size=config.pixel_size, seed=config.seed,
        )  # fmt: skip
        simulate_micrographs(specimen, tmp, device=device)
        cleans = []
        for m in range(config.n_movies):
            img, _ = read_mrc(Path(tmp) / "Micrographs" / f"mic_{m + 1:05d}.mrc")
            img = img - img.mean()
            cleans.append(img / max(float(img.std()), 1e-12) * config.contrast)
        for name in ("micrographs.star", "ground_truth.csv"):
            shutil.copy(Path(tmp) / name, out / name)
        shutil.copytree(Path(tmp) / "truth", out / "truth", dirs_exist_ok=True)
    # the detector: sensitivity (gain = 1 / sensitivity), dead and hot pixels
    sens = 1.0 + config.gain_spread * (
        0.5 * smooth_noise(1, (h, w), max(h, w) / 6, gen)[0].numpy()
        + 0.5 * torch.randn((h, w), generator=gen, dtype=torch.float64).numpy()
    )
    sens = np.clip(sens, 0.3, None)
    flat = torch.randperm(h * w, generator=gen).numpy()
    dead = flat[: config.dead_pixels]
    hot = flat[config.dead_pixels : config.dead_pixels + config.hot_pixels]
    gain = (1.0 / sens).astype(np.float32)
    gain.reshape(-1)[dead] = 0.0
    sens.reshape(-1)[dead] = 0.0
    write_mrc(out / "gain.mrc", gain, config.pixel_size)
    lam = config.dose_per_frame * config.pixel_size**2  # electrons per pixel per frame
    ky, kx = rfft_frequencies((h, w), device=device, dtype=torch.float64)
    k = torch.sqrt((ky / h) ** 2 + (kx / w) ** 2) / config.pixel_size
    ne = critical_exposure(k)
    names: list[str] = []
    index: list[tuple[str, str, str, str]] = []
    suffix = ".tif" if config.file_format == "tiff" else ".mrc"
    sens_t = torch.as_tensor(sens, dtype=torch.float32, device=device)
    with progress_bar(config.n_movies, "simulating movies", enabled=show_progress) as bar:
        for m in range(config.n_movies):
            track = _trajectory(n, config.drift_px, gen)  # specimen displacement
            coeffs = _local_coeffs(n, config.local_px, gen)  # specimen local displacement
            clean = torch.as_tensor(cleans[m], dtype=torch.float64, device=device)
            spec = torch.fft.rfft2(clean, norm="forward")
            frames = np.empty((n, h, w), dtype=np.uint8 if suffix == ".tif" else np.uint16)
            for i in range(n):
                f = spec
                if config.damage:
                    dose = config.dose_per_frame * (i + 0.5)
                    f = f * torch.exp(-dose / (2.0 * ne))
                f = fourier_shift(f, torch.as_tensor(track[i], device=device), (h, w))
                img = torch.fft.irfft2(f, s=(h, w), norm="forward").float()
                # local part: out(x) = img(x - d_loc(x)) (displacement d moves content by +d)
                img = resample_polynomial(
                    img[None], torch.as_tensor(coeffs, device=device),
                    torch.tensor([float(i)], device=device),
                )[0]  # fmt: skip
                rate = (lam * sens_t * (1.0 + img).clamp(min=0.0)).float()
                counts = torch.poisson(rate, generator=gen if device == "cpu" else None)
                counts.view(-1)[torch.as_tensor(hot, device=device)] += 20.0 * lam + 5
                frames[i] = counts.clamp(max=np.iinfo(frames.dtype).max).cpu().numpy()
            name = f"Movies/movie_{m + 1:05d}{suffix}"
            if suffix == ".tif":
                write_tiff_movie(out / name, frames, config.pixel_size)
            else:
                _write_mrc_counts(out / name, frames, config.pixel_size)
            names.append(name)
            exposure = ""
            if config.session == "epu":
                exposure = _epu_exposure(out / "session", m, out / name, config)
            index.append((name, exposure, f"Micrographs/mic_{m + 1:05d}.mrc",
                          f"truth/movie_{m + 1:05d}.star"))  # fmt: skip
            # truth in motion-correction terms: the shift that aligns is minus the displacement
            shifts = -track
            truth = MovieMotion(
                n_frames=n, shape=(h, w), first=0, global_shifts=shifts, local_coeffs=-coeffs
            )
            write_motion_star(
                out / "truth" / f"movie_{m + 1:05d}.star", truth, movie=name,
                pixel_size=config.pixel_size, voltage=config.voltage,
                dose_per_frame=config.dose_per_frame,
            )  # fmt: skip
            write_mrc(
                out / "truth" / f"movie_{m + 1:05d}_clean.mrc", 1.0 + cleans[m], config.pixel_size
            )
            bar.advance()
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [config.pixel_size],
            "rlnVoltage": [config.voltage],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    star = out / "movies.star"
    write_star(
        {
            "optics": optics,
            "movies": pd.DataFrame({"rlnMicrographMovieName": names, "rlnOpticsGroup": 1}),
        },  # fmt: skip
        star,
    )
    with atomic_path(out / "truth" / "movies.csv") as tmp:
        pd.DataFrame(index, columns=["movie", "session_movie", "specimen", "motion"]).to_csv(
            tmp, index=False
        )
    write_json(out / "simulation.json", {"product": "movies", "config": config})
    return star
