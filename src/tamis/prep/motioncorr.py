"""Motion correction of movies (RELION's own implementation, ``relion_run_motioncorr --use_own``,
MotionCor2's model): gain and defects, global alignment of all frames, patch alignment fitted by
the third-order polynomial deformation model, dose weighting, binning, and RELION's outputs.

Per movie (``relion-motioncorr-mdcatch.md`` §A2): read the frames used (``first_frame_sum`` to
``last_frame_sum``), multiply by the gain, repair defects, gain zeros and hot pixels (sum above
mean + 6 sd; a seeded good neighbour, the same in every frame), FFT every frame (Fourier-cropped
at once with early binning), align all frames globally, then -- with more than 2 x 2 patches --
align the frame groups of each patch and fit the deformation model to the local residuals; sum
the frames resampled by the model, dose-weighted (and not, with ``save_noDW``), and write:

- ``<root>.mrc`` (and ``<root>_noDW.mrc``, ``<root>_PS.mrc``), ``<root>.star`` (RELION's
  per-movie metadata: blocks ``general``, ``global_shift``, ``local_motion_model``,
  ``hot_pixels``, ``local_shift``), ``<root>.log`` and ``<root>_shifts.png``;
- ``corrected_micrographs.star`` (optics with ``rlnMicrographPixelSize`` and
  ``rlnAccumMotionTotal/Early/Late``) and ``logfile.pdf`` in the job directory.

Differences from RELION 5.0.1, on purpose (README lists them): frame groups of a patch are
summed (RELION uses the last frame of each group, fixed upstream in PR #1359); the local model
is fitted and written in *unbinned* pixels (RELION writes binned ones under early binning,
3dem/relion#771; the per-movie STAR says so in a comment); the B-factor weight is isotropic;
fit and application use the same time convention; defect filling is seeded. The frames are
batched on the device: the FFTs, the CCFs of all frames or all patches, the resampling.
"""

from __future__ import annotations

import functools
import math
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis._malloc import keep_freed_memory
from tamis.errors import InputFileError, TamisError
from tamis.fourier import crop_fourier, fourier_shift_cropped, irfft2, pad_fourier
from tamis.io.coords import pipeline_relative
from tamis.io.motion_star import MovieMotion, read_motion_star, write_motion_star
from tamis.io.movies import (
    fill_bad_pixels,
    hot_pixel_mask,
    open_movie,
    read_defects,
    read_gain,
)
from tamis.io.mrc import write_mrc
from tamis.io.paths import checked
from tamis.io.star import atomic_path, read_star, write_star
from tamis.motion_model import evaluate_polynomial, fit_polynomial, resample_polynomial
from tamis.prep.motion import (
    DoseWeighting,
    accumulated_motion,
    align_spectra,
    ccf_shape,
    frame_groups,
    weight_band,
)
from tamis.workers import Workers, map_items

__all__ = [
    "MotionCorrOptions",
    "correct_movie",
    "run_motioncorr",
    "output_root",
    "parse_other_args",
]

#: A local model is kept only if its fit RMSD stays below this (unbinned pixels), as RELION.
FIT_RMSD_THRESHOLD = 10.0
#: Converged patches a local model needs: its 6 spatial terms per power of time are left
#: unconstrained between fewer patches (RELION asks only for more than 18 observations).
MIN_PATCHES = 9
#: Share of the patches' local shifts (median square length) a local model must explain.
MIN_EXPLAINED = 0.3


@dataclass
class MotionCorrOptions:
    """RELION's motion-correction options (``relion_run_motioncorr`` flag names; frames 1-based,
    ``last_frame_sum`` <= 0 for all)."""

    first_frame_sum: int = 1
    last_frame_sum: int = -1
    bfactor: float = 150.0
    patch_x: int = 1
    patch_y: int = 1
    group_frames: int = 1
    bin_factor: float = 1.0
    dose_per_frame: float = 1.0
    preexposure: float = 0.0
    dose_weighting: bool = True
    save_noDW: bool = False
    grouping_for_ps: int = -1  # frames per power-spectrum block; <= 0: no _PS.mrc
    ps_size: int = 512
    float16: bool = False
    gain: str = ""
    gain_rot: int = 0
    gain_flip: int = 0
    defect_file: str = ""
    skip_defect: bool = False
    eer_grouping: int = 40
    eer_upsampling: int = 1
    max_iter: int = 5
    ccf_downsample: float = 0.0
    early_binning: bool = True
    dose_motionstats_cutoff: float = 4.0
    seed: int = 0
    chunk: int = 8  # frames per batch on the device
    device: str = "cpu"

    def check(self) -> None:
        if self.first_frame_sum < 1:
            raise TamisError(f"--first_frame_sum {self.first_frame_sum}: frames count from 1")
        if self.bfactor <= 0:
            raise TamisError(f"--bfactor {self.bfactor}: must be positive (pixel²)")
        if self.group_frames < 1:
            raise TamisError(f"--group_frames {self.group_frames}: must be >= 1")
        if self.bin_factor < 1:
            raise TamisError(f"--bin_factor {self.bin_factor}: must be >= 1")
        if self.dose_weighting and self.dose_per_frame <= 0:
            raise TamisError(
                f"--dose_per_frame {self.dose_per_frame}: dose weighting needs the dose per "
                "frame in e/A² (> 0)"
            )
        if self.float16 and self.grouping_for_ps <= 0:
            raise TamisError("--float16 needs --grouping_for_ps > 0 (CTF estimation reads the PS)")
        if self.ps_size % 2:
            raise TamisError(f"--ps_size {self.ps_size}: must be even")

    @property
    def local(self) -> bool:
        return self.patch_x > 2 and self.patch_y > 2


def output_root(movie: str | Path, out_dir: str | Path) -> Path:
    """RELION's output name: the movie path relative to its job (or the project), the last
    extension removed and every other ``.`` made ``_`` (``Movies/a.b.eer`` -> ``Movies/a_b``)."""
    rel = pipeline_relative(str(movie))
    stem = rel.name.rsplit(".", 1)[0].replace(".", "_")
    return Path(out_dir) / rel.parent / stem


def _binned_shape(shape: tuple[int, int], bin_factor: float) -> tuple[int, int]:
    if abs(bin_factor - 1.0) < 0.01:
        return shape
    by, bx = int(shape[0] / bin_factor), int(shape[1] / bin_factor)
    if by % 2 or bx % 2:
        raise TamisError(
            f"--bin_factor {bin_factor}: the binned size {bx} x {by} must be even in both "
            "directions (as RELION requires)"
        )
    return by, bx


def _patches(shape: tuple[int, int], px: int, py: int) -> list[tuple[int, int, int, int]]:
    """RELION's patch tiling: ``(y0, x0, ph, pw)`` of ``px x py`` patches from the origin, each
    made even (at the far edge by dropping the first row/column, elsewhere the last)."""
    ny, nx = shape
    pny, pnx = ny // py, nx // px
    out = []
    for iy in range(py):
        for ix in range(px):
            x0, x1 = ix * pnx, (ix + 1) * pnx
            y0, y1 = iy * pny, (iy + 1) * pny
            if (x1 - x0) % 2:
                if ix == px - 1:
                    x0 += 1
                else:
                    x1 -= 1
            if (y1 - y0) % 2:
                if iy == py - 1:
                    y0 += 1
                else:
                    y1 -= 1
            out.append((y0, x0, y1 - y0, x1 - x0))
    return out


def correct_movie(
    path: str | Path,
    options: MotionCorrOptions,
    *,
    pixel_size: float,
    voltage: float,
    gain: np.ndarray | None = None,
    defects: np.ndarray | None = None,
    pre_exposure: float = 0.0,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[MovieMotion, dict[str, np.ndarray]]:
    """Motion-correct one movie; returns what was found and the images to write:
    ``"sum"`` (dose-weighted if asked, else the plain sum), ``"noDW"`` (with ``save_noDW``) and
    ``"PS"`` (with ``grouping_for_ps``), on the binned grid (pixel size ``pixel_size *
    bin_factor``).

    ``pixel_size`` is the movie's (Å), ``gain`` the multiplicative gain in the frame grid
    (see :func:`tamis.io.movies.read_gain`), ``defects`` a boolean mask (True = bad).
    """
    o = options
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    mark = [t0]

    def stage(name: str) -> None:
        now = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + now - mark[0]
        mark[0] = now

    dev = torch.device(o.device)
    with open_movie(path, eer_grouping=o.eer_grouping, eer_upsampling=o.eer_upsampling) as movie:
        n_total = movie.n_frames
        first = o.first_frame_sum - 1
        last = n_total if o.last_frame_sum <= 0 else min(o.last_frame_sum, n_total)
        if last - first < 3:
            raise InputFileError(
                path, f"frames {first + 1}-{last} of {n_total}: fewer than 3 frames to align"
            )
        if gain is not None and gain.shape != movie.shape:
            raise InputFileError(
                path,
                f"frames are {movie.shape[1]} x {movie.shape[0]} but the gain reference is "
                f"{gain.shape[1]} x {gain.shape[0]} (super-resolution vs counting, or a "
                "rotation: see --gain_rot)",
            )
        if defects is not None and defects.shape != movie.shape:
            raise InputFileError(path, f"the defect map is {defects.shape}, frames {movie.shape}")
        raw = movie.read(first, last, dtype=None)  # counts as stored: 1-2 bytes a pixel
        kind = movie.kind
        shape = movie.shape
    stage("read")
    n = last - first
    # gain, defects, hot pixels (in the frame grid as read); the sum of gain-corrected frames
    # is the gain times the sum of the counts
    hot = np.zeros((0, 2), np.int64)
    bad = None
    if not o.skip_defect:
        bad = np.zeros(shape, dtype=bool) if defects is None else defects.copy()
        if gain is not None:
            bad |= gain == 0
        total = raw.sum(0, dtype=np.float64)
        hot_mask = hot_pixel_mask(total * gain if gain is not None else total) & ~bad
        hy, hx = np.nonzero(hot_mask)
        hot = np.stack([hx, hy], 1)
        bad |= hot_mask
    stage("gain, defects")
    # spectra of every frame (gain, repair, FFT a batch at a time), Fourier-cropped at once with
    # early binning
    early = o.early_binning and abs(o.bin_factor - 1.0) >= 0.01
    out_shape = _binned_shape(shape, o.bin_factor)
    work = out_shape if early else shape
    prescale = o.bin_factor if early else 1.0
    spectra = torch.empty((n, work[0], work[1] // 2 + 1), dtype=torch.complex64, device=dev)
    for a in range(0, n, o.chunk):
        # the (possibly flipped) counts made contiguous first: converting a negative-stride
        # view to float directly is several times slower
        frames = np.ascontiguousarray(raw[a : a + o.chunk]).astype(np.float32, copy=False)
        if gain is None and bad is None:
            batch = torch.from_numpy(frames).to(dev)
        else:
            if gain is not None:
                frames *= gain
            if bad is not None and bad.any():
                fill_bad_pixels(frames, bad, seed=o.seed, half_width=4 if kind == "eer" else 2)
            batch = torch.from_numpy(frames).to(dev)
        if work == shape:
            torch.fft.rfft2(batch, norm="forward", out=spectra[a : a + o.chunk])
        else:
            spectra[a : a + o.chunk] = crop_fourier(torch.fft.rfft2(batch, norm="forward"), work)
    del raw, frames, batch
    images: dict[str, np.ndarray] = {}
    ps_apix = 0.0
    apix_work = pixel_size * prescale
    if o.grouping_for_ps > 0:
        images["PS"], ps_apix = _power_spectrum(spectra, work, apix_work, o)
    stage("FFT")
    # global alignment (the shifts are applied later, where the spectra are used)
    bf = o.bfactor / prescale**2
    g_shift, g_conv = align_spectra(
        spectra, work, bf, max_iter=o.max_iter, ccf_downsample=o.ccf_downsample
    )
    if not bool(g_conv):
        log(f"{path}: global alignment did not converge in {o.max_iter} iterations")
    global_px = g_shift.cpu().numpy() * prescale  # unbinned pixels
    stage("global alignment")
    # local alignment
    coeffs, obs, rmsd, kept = None, pd.DataFrame(), (0.0, 0.0), 0
    if o.local:
        coeffs, obs, rmsd, kept = _local_model(
            spectra, g_shift, work, shape, prescale, first, o, log, path
        )
    stage("local alignment")
    # sums
    z = torch.arange(n, dtype=torch.float64, device=dev)
    model = None if coeffs is None else torch.as_tensor(coeffs / prescale, device=dev)
    dose = doses = None
    if o.dose_weighting:
        doses = pre_exposure + o.preexposure + o.dose_per_frame * (torch.arange(first, last) + 1.0)
        dose = DoseWeighting(work, apix_work, doses, voltage, device=dev)
    plain = not o.dose_weighting or o.save_noDW
    sums = _sums(spectra, g_shift, work, model, z, dose, doses, plain, o)
    if o.dose_weighting:
        images["sum"] = sums[-1]
        if plain:
            images["noDW"] = sums[0]
    else:
        images["sum"] = sums[0]
    if not early and out_shape != shape:
        for k in ("sum", "noDW"):
            if k in images:
                f = torch.fft.rfft2(torch.from_numpy(images[k]), norm="forward")
                images[k] = irfft2(crop_fourier(f, out_shape), s=out_shape).numpy()
    stage("sums")
    shifts = np.full((n_total, 2), np.nan)
    shifts[first:last] = global_px
    motion = MovieMotion(
        n_frames=n_total,
        shape=shape,
        first=first,
        global_shifts=shifts,
        local_coeffs=coeffs,
        local_obs=obs,
        hot_pixels=hot,
        converged=bool(g_conv),
        fit_rmsd=rmsd,
        n_patches_kept=kept,
        seconds=time.perf_counter() - t0,
        stages=stages,
        ps_pixel_size=ps_apix,
    )
    return motion, images


def _local_model(
    spectra: torch.Tensor,
    g_shift: torch.Tensor,
    work: tuple[int, int],
    shape: tuple[int, int],
    prescale: float,
    first: int,
    o: MotionCorrOptions,
    log: Callable[[str], None],
    path: str | Path,
) -> tuple[np.ndarray | None, pd.DataFrame, tuple[float, float], int]:
    """Patch alignment of the globally aligned frames and the polynomial fit (unbinned px)."""
    n = spectra.shape[0]
    groups = frame_groups(n, o.group_frames)
    if len(groups) < 3:
        log(f"{path}: fewer than 3 frame groups, no local alignment")
        return None, pd.DataFrame(), (0.0, 0.0), 0
    patches = _patches(work, o.patch_x, o.patch_y)
    ph = min(p[2] for p in patches)
    pw = min(p[3] for p in patches)
    bf = o.bfactor / prescale**2
    # The patches are cut at the CCF box, or at the B-factor band where that is smaller (align_
    # spectra uses the band only; RELION's smallest CCF box, 192, is four times the band a 200-px
    # patch needs at B 150), with 8 frequencies of margin.
    cy, cx = weight_band((ph, pw), bf, ccf_shape((ph, pw), bf, o.ccf_downsample), margin=8)
    group_of = torch.zeros(n, dtype=torch.long, device=spectra.device)
    for gi, g in enumerate(groups):
        group_of[list(g)] = gi
    sums = torch.zeros(
        (len(patches), len(groups), cy, cx // 2 + 1), dtype=torch.complex64, device=spectra.device
    )
    # Only the CCF box of each patch is used: cut the patches from a Fourier-binned copy of
    # the frames in which a patch is cy x cx pixels (the same frequencies, a fraction of the
    # transforms; exact when the box is the whole patch)
    by = min(work[0], 2 * round(work[0] * cy / ph / 2))
    bx = min(work[1], 2 * round(work[1] * cx / pw / 2))
    starts = [
        (min(round(y0 * by / work[0]), by - cy), min(round(x0 * bx / work[1]), bx - cx))
        for y0, x0, _, _ in patches
    ]
    for a in range(0, n, o.chunk):
        small = fourier_shift_cropped(
            crop_fourier(spectra[a : a + o.chunk], (by, bx)), g_shift[a : a + o.chunk], work
        )
        real = irfft2(small, s=(by, bx), norm="forward").to(spectra.device)
        cut = torch.stack([real[:, y0 : y0 + cy, x0 : x0 + cx] for y0, x0 in starts], 0)
        f = torch.fft.rfft2(cut, norm="forward")  # (P, c, cy, cx // 2 + 1)
        sums.index_add_(1, group_of[a : a + o.chunk], f)
    shifts, conv = align_spectra(
        sums, (ph, pw), bf, max_iter=o.max_iter, ccf_downsample=o.ccf_downsample
    )
    shifts = shifts.cpu().numpy() * prescale  # (P, G, 2) unbinned px
    conv = conv.cpu().numpy()
    t = np.array([(g.start + g.stop - 1) / 2.0 for g in groups])  # mean frame index per group
    rows = []
    for p, (y0, x0, h, w) in enumerate(patches):
        if not conv[p]:
            continue
        s = shifts[p]
        # re-reference to the patch's position at frame 0 (linear from the first two groups)
        origin = s[0] - (s[1] - s[0]) * t[0] / (t[1] - t[0])
        s = s - origin
        cx_px = ((x0 + x0 + w - 1) // 2) * prescale
        cy_px = ((y0 + y0 + h - 1) // 2) * prescale
        for gi in range(len(groups)):
            rows.append((t[gi], cx_px, cy_px, s[gi, 0], s[gi, 1]))
    obs = pd.DataFrame(rows, columns=["z", "x", "y", "sx", "sy"])
    kept = int(conv.sum())
    if len(obs) <= 18 or kept < MIN_PATCHES:
        log(
            f"{path}: too few valid local trajectories ({kept} of {len(patches)} patches "
            f"converged, {MIN_PATCHES} needed), no local model"
        )
        return None, obs, (0.0, 0.0), kept
    coeffs, rmsd = fit_polynomial(
        obs["x"] / shape[1] - 0.5, obs["y"] / shape[0] - 0.5, obs["z"],
        obs[["sx", "sy"]].to_numpy(), robust_iter=3,
    )  # fmt: skip
    if max(rmsd) >= FIT_RMSD_THRESHOLD:
        log(f"{path}: local fit RMSD {rmsd[0]:.2f}, {rmsd[1]:.2f} px, model discarded")
        return None, obs, (float(rmsd[0]), float(rmsd[1])), kept
    # a model that explains little of the patches' shifts fits their noise (low-dose, low-
    # contrast movies): resampling by it would add motion, not remove it
    # (medians of squared lengths: a few patches locked onto noise do not decide it)
    seen = obs[["sx", "sy"]].to_numpy()
    fitted = evaluate_polynomial(
        coeffs, obs["x"] / shape[1] - 0.5, obs["y"] / shape[0] - 0.5, obs["z"]
    )
    resid = float(np.median(((fitted - seen) ** 2).sum(1)))
    explained = 1.0 - resid / max(float(np.median((seen**2).sum(1))), 1e-12)
    if explained < MIN_EXPLAINED:
        log(
            f"{path}: the local model explains {100 * max(explained, 0):.0f}% of the patches' "
            f"shifts (median), below {100 * MIN_EXPLAINED:.0f}%: no local model"
        )
        return None, obs, (float(rmsd[0]), float(rmsd[1])), kept
    obs["frame"] = np.floor(obs["z"]).astype(int) + first + 1
    return coeffs, obs, (float(rmsd[0]), float(rmsd[1])), kept


def _sums(
    spectra: torch.Tensor,
    g_shift: torch.Tensor,
    work: tuple[int, int],
    model: torch.Tensor | None,
    z: torch.Tensor,
    dose: DoseWeighting | None,
    doses: torch.Tensor | None,
    plain: bool,
    o: MotionCorrOptions,
) -> list[np.ndarray]:
    """The sums of the globally aligned frames: the plain one (with ``plain``) and the
    dose-weighted one (with ``dose``), in that order. With a local model each frame is resampled
    by it, both sums through one sampling grid per frame (batches sized to ~64 M pixels)."""
    n = spectra.shape[0]
    kinds = ([None] if plain else []) + ([dose] if dose is not None else [])
    if model is None:  # globally aligned sums: one inverse FFT each
        acc = [torch.zeros_like(spectra[0]) for _ in kinds]
        for a in range(0, n, o.chunk):
            f = fourier_shift_cropped(spectra[a : a + o.chunk], g_shift[a : a + o.chunk], work)
            for k, d in enumerate(kinds):
                acc[k] += (f if d is None else f * d.weights(doses[a : a + o.chunk])).sum(0)
        return [irfft2(x, s=work).cpu().numpy().astype(np.float32) for x in acc]
    total = torch.zeros((len(kinds), *work), dtype=torch.float64, device=spectra.device)
    step = max(1, min(o.chunk, (1 << 26) // (work[0] * work[1] * len(kinds))))
    for a in range(0, n, step):
        f = fourier_shift_cropped(spectra[a : a + step], g_shift[a : a + step], work)
        parts = [f if d is None else f * d.weights(doses[a : a + step]) for d in kinds]
        real = irfft2(torch.stack(parts, 1), s=work).to(spectra.device)  # (F, kinds, h, w)
        total += resample_polynomial(real, model, z[a : a + step]).sum(0)
    return [t.cpu().numpy().astype(np.float32) for t in total]


def _power_spectrum(
    spectra: torch.Tensor, work: tuple[int, int], apix: float, o: MotionCorrOptions
) -> tuple[np.ndarray, float]:
    """RELION's ``_PS.mrc``: amplitudes of sums of ``grouping_for_ps`` unaligned frames, summed,
    made square, cropped to 1.4 Å, resampled to ``ps_size``; centred. Returns it and its
    header pixel size."""
    n = spectra.shape[0]
    g = o.grouping_for_ps
    amp = torch.zeros(spectra.shape[1:], dtype=torch.float32, device=spectra.device)
    for a in range(0, n - g + 1, g):
        amp += spectra[a : a + g].sum(0).abs()
    side = min(work)
    amp = crop_fourier(amp.to(torch.complex64), (side, side)).real
    apix_ps = apix
    if apix < 1.4:
        need = int(math.ceil(side * apix / 1.4))
        need += need % 2
        amp = crop_fourier(amp.to(torch.complex64), (need, need)).real
        apix_ps = side * apix / need
        side = need
    full = torch.cat([amp, torch.flip(torch.roll(amp, -1, 0), (0, 1))[:, 1:-1]], 1)  # Friedel
    full = torch.fft.fftshift(full)
    if side != o.ps_size:  # resample the spectrum image (Fourier interpolation)
        f = torch.fft.rfft2(full, norm="forward")
        if o.ps_size < side:
            f = crop_fourier(f, (o.ps_size, o.ps_size))
        else:
            f = pad_fourier(f, o.ps_size)
        full = irfft2(f, s=(o.ps_size, o.ps_size)).to(f.device)
        # the same frequency range on ps_size pixels: Nyquist, hence the pixel size, is kept
    return full.cpu().numpy().astype(np.float32), float(apix_ps)


# ---------------------------------------------------------------------------------------------
# Files


def plot_shifts(motion: MovieMotion, path: str | Path, title: str = "") -> None:
    """The global track (black, start in red) and, with a local model, each patch's observed
    (grey) and fitted (blue) residual tracks drawn at the patch, magnified; as a PNG."""
    from PIL import Image, ImageDraw

    size, m = 480, 36
    im = Image.new("RGB", (size, size + 20), "white")
    d = ImageDraw.Draw(im)
    s = motion.global_shifts[np.all(np.isfinite(motion.global_shifts), 1)]
    span = float(np.abs(s - s.mean(0)).max()) if len(s) else 1.0
    scale = (size / 2 - m) / max(span, 1.0)
    cx, cy = size / 2, size / 2

    def pt(x: float, y: float, ox: float = cx, oy: float = cy, k: float = scale):
        return ox + x * k, oy - y * k  # y up, as RELION plots

    if len(s) > 1:
        centre = s.mean(0)
        d.line([pt(*(v - centre)) for v in s], fill="black", width=2)
        x0, y0 = pt(*(s[0] - centre))
        d.ellipse([x0 - 4, y0 - 4, x0 + 4, y0 + 4], fill="red")
    if motion.local_coeffs is not None and len(motion.local_obs):
        ny, nx = motion.shape
        k_local = 40.0 * (size - 2 * m) / max(nx, ny)
        for (x, y), ob in motion.local_obs.groupby(["x", "y"]):
            ox, oy = m + x / nx * (size - 2 * m), size - m - y / ny * (size - 2 * m)
            d.line([pt(a, b, ox, oy, k_local) for a, b in ob[["sx", "sy"]].to_numpy()],
                   fill=(160, 160, 160))  # fmt: skip
            zs = np.linspace(0, ob["z"].max(), 20)
            fit = evaluate_polynomial(
                motion.local_coeffs, np.full_like(zs, x / nx - 0.5),
                np.full_like(zs, y / ny - 0.5), zs,
            )  # fmt: skip
            d.line([pt(a, b, ox, oy, k_local) for a, b in fit], fill=(31, 119, 180))
    d.text((4, 4), title[:70], fill="black")
    d.text(
        (4, size + 4),
        f"global track (black, start red), full span {2 * span:.1f} px; "
        "patch residuals x40 (grey observed, blue fit)",
        fill="black",
    )
    with atomic_path(Path(path)) as tmp:
        im.save(tmp, format="PNG")


def _accumulated(motion: MovieMotion, o: MotionCorrOptions, pre: float) -> tuple[float, ...]:
    return accumulated_motion(
        motion.global_shifts, o.dose_per_frame, pre + o.preexposure, o.dose_motionstats_cutoff
    )


def parse_other_args(text: str, options: MotionCorrOptions) -> dict[str, int]:
    """RELION's ``other_args`` for motion correction: the expert flags of
    ``relion_run_motioncorr`` set options; ``--do_at_most N`` is returned. Unknown flags are an
    error (silently ignoring one would change the result without a word)."""
    words = shlex.split(text or "")
    extra: dict[str, int] = {}
    flags = {
        "--eer_upsampling": ("eer_upsampling", int),
        "--eer_grouping": ("eer_grouping", int),
        "--max_iter": ("max_iter", int),
        "--ccf_downsample": ("ccf_downsample", float),
        "--dose_motionstats_cutoff": ("dose_motionstats_cutoff", float),
        "--ps_size": ("ps_size", int),
        "--gain_rot": ("gain_rot", int),
        "--gain_flip": ("gain_flip", int),
        "--bfactor": ("bfactor", float),
        "--group_frames": ("group_frames", int),
    }
    switches = {
        "--skip_defect": ("skip_defect", True),
        "--no_early_binning": ("early_binning", False),
    }
    i = 0
    while i < len(words):
        w = words[i]
        if w in flags and i + 1 < len(words):
            name, kind = flags[w]
            try:
                setattr(options, name, kind(words[i + 1]))
            except ValueError:
                raise TamisError(f"other_args: {w} {words[i + 1]!r} is not a number") from None
            i += 2
        elif w == "--do_at_most" and i + 1 < len(words):
            extra["do_at_most"] = int(float(words[i + 1]))
            i += 2
        elif w in switches:
            setattr(options, *switches[w])
            i += 1
        elif w in ("--j", "--max_io_threads") and i + 1 < len(words):
            i += 2  # threads: torch decides
        elif w in ("--skip_logfile", "--only_do_unfinished"):
            i += 1
        else:
            raise TamisError(f"other_args: {w!r} is not a motion-correction option tamis knows")
    return extra


@dataclass
class _MovieTask:
    movie: str
    root: Path  # output root
    apix: float
    kv: float
    pre: float  # pre-exposure (e/A^2)


def _correct_one(
    task: _MovieTask, *, options: MotionCorrOptions, gain: np.ndarray | None, gain_name: str
) -> tuple[str | None, list[str]]:
    """One movie corrected and its files written (each atomically); returns ``(None, log
    lines)``, or ``(reason, log lines)`` when the movie is unusable (recorded as failed)."""
    o = options
    messages: list[str] = []
    keep_freed_memory()  # this process does the job's work: reuse freed pages, movie after movie
    try:
        defects = None
        if o.defect_file and not o.skip_defect:
            with open_movie(
                task.movie, eer_grouping=o.eer_grouping, eer_upsampling=o.eer_upsampling
            ) as mv:
                defects = read_defects(o.defect_file, mv.shape)
        motion, images = correct_movie(
            task.movie, o, pixel_size=task.apix, voltage=task.kv, gain=gain, defects=defects,
            pre_exposure=task.pre, log=messages.append,
        )  # fmt: skip
    except InputFileError as exc:
        return str(exc), messages
    _write_movie(task.root, task.movie, motion, images, o, task.apix, task.kv, gain_name, task.pre)
    local = (
        f", local model from {motion.n_patches_kept} patches"
        if motion.local_coeffs is not None
        else ""
    )
    messages.append(
        f"{task.movie}: {motion.seconds:.1f} s, accumulated motion "
        f"{_accumulated(motion, o, task.pre)[0]:.1f} px{local}"
    )
    return None, messages


def run_motioncorr(
    movies_star: str | Path,
    out_dir: str | Path,
    options: MotionCorrOptions | None = None,
    *,
    only_do_unfinished: bool = False,
    do_at_most: int = -1,
    log: Callable[[str], None] = print,
    show_progress: bool = False,
    is_aborted: Callable[[], bool] = lambda: False,
    workers: Workers = Workers(),
) -> Path:
    """Motion-correct the movies of a ``movies.star`` (RELION's import output) into
    ``<out_dir>``, in this process or on dask ``workers``; returns
    ``corrected_micrographs.star``.

    Pixel size and voltage come from each movie's optics group (``rlnMicrographOriginalPixelSize``,
    ``rlnVoltage``). With ``only_do_unfinished`` a movie whose outputs exist is not redone;
    ``do_at_most`` caps the movies processed in this call (others wait for the next). A movie
    that fails is recorded in ``failed_movies.star`` with the reason and not retried.
    The process that corrects the movies (this one, or each dask worker) keeps the memory it
    frees for the next movie (:func:`tamis._malloc.keep_freed_memory`: on a VM, fresh pages
    cost more than the arithmetic), so its memory stays near one movie's peak until it ends.
    """
    o = options or MotionCorrOptions()
    o.check()
    out = Path(out_dir)
    blocks = read_star(movies_star)
    if "movies" not in blocks or not isinstance(blocks["movies"], pd.DataFrame):
        raise InputFileError(movies_star, "has no data_movies table (import movies first)")
    movies = blocks["movies"]
    if "rlnMicrographMovieName" not in movies:
        raise InputFileError(movies_star, "data_movies has no rlnMicrographMovieName")
    optics = blocks.get("optics")
    if not isinstance(optics, pd.DataFrame) or "rlnMicrographOriginalPixelSize" not in optics:
        raise InputFileError(movies_star, "has no data_optics with rlnMicrographOriginalPixelSize")
    by_group = {int(r.rlnOpticsGroup): r for r in optics.itertuples()}
    gain = gain_name = None
    if o.gain:
        eer = any(str(m).lower().endswith(".eer") for m in movies["rlnMicrographMovieName"])
        gain = read_gain(
            o.gain, eer=eer, eer_upsampling=o.eer_upsampling, rot=o.gain_rot, flip=o.gain_flip
        )
        gain_name = o.gain
        first = str(movies["rlnMicrographMovieName"].iloc[0]) if len(movies) else ""
        if first and Path(first).is_file():
            with open_movie(
                first, eer_grouping=o.eer_grouping, eer_upsampling=o.eer_upsampling
            ) as mv:
                if mv.shape != gain.shape:
                    raise InputFileError(
                        o.gain,
                        f"the gain reference is {gain.shape[1]} x {gain.shape[0]} (after "
                        f"--gain_rot {o.gain_rot} --gain_flip {o.gain_flip}) but the movie "
                        f"{first} has {mv.shape[1]} x {mv.shape[0]} frames",
                    )
        if o.gain_rot or o.gain_flip:  # the gain actually used, as RELION writes it
            gain_name = str(out / "gain.mrc")
            write_mrc(gain_name, gain, 1.0)
    failed_path = out / "failed_movies.star"
    failed = _read_failed(failed_path)
    tasks, listed = [], []
    for _, row in movies.iterrows():
        name = str(row["rlnMicrographMovieName"])
        checked(name, movies_star)
        root = output_root(name, out)
        if name in failed:
            continue
        listed.append((row, root))
        done = root.with_suffix(".mrc").is_file() and root.with_suffix(".star").is_file()
        if o.grouping_for_ps > 0:
            done = done and Path(f"{root}_PS.mrc").is_file()
        if only_do_unfinished and done:
            continue
        if 0 <= do_at_most <= len(tasks):  # left for a later pass (done ones still listed)
            continue
        group = by_group.get(int(row.get("rlnOpticsGroup", 1)))
        if group is None:
            raise InputFileError(movies_star, f"{name}: optics group not in data_optics")
        tasks.append(
            _MovieTask(
                name, root, float(group.rlnMicrographOriginalPixelSize),
                float(getattr(group, "rlnVoltage", 300.0)),
                float(row.get("rlnMicrographPreExposure", 0.0) or 0.0),
            )
        )  # fmt: skip
    n_new = 0
    if is_aborted():
        raise TamisError("ABORT_NOW: aborted by the user")
    work = functools.partial(_correct_one, options=o, gain=gain, gain_name=gain_name or "")
    for k, (error, messages) in map_items(
        work, tasks, workers, label="Motion correction", show_progress=show_progress, log=log
    ):
        for line in messages:
            log(line)
        if error is not None:
            failed[tasks[k].movie] = error
            _write_failed(failed_path, failed)
            log(f"failed: {error}")
        else:
            n_new += 1
        if is_aborted():  # between movies, as RELION checks
            raise TamisError("ABORT_NOW: aborted by the user")
    rows = []
    for row, root in listed:
        if str(row["rlnMicrographMovieName"]) in failed:
            continue
        if root.with_suffix(".mrc").is_file():
            m = read_motion_star(root.with_suffix(".star"))
            pre = float(row.get("rlnMicrographPreExposure", 0) or 0)
            rows.append((row, root, _accumulated(m, o, pre)))
    if not rows:
        raise TamisError(
            f"{movies_star}: no movie was motion-corrected"
            + (f" ({len(failed)} failed: see {failed_path})" if failed else "")
        )
    star = _write_corrected(out, optics, rows, o)
    _write_logfile(out, rows)
    log(f"motion-corrected {n_new} movies ({len(rows) - n_new} done before): {star}")
    return star


def _write_movie(
    root: Path,
    movie: str,
    motion: MovieMotion,
    images: dict[str, np.ndarray],
    o: MotionCorrOptions,
    apix: float,
    kv: float,
    gain_name: str,
    pre: float,
) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    apix_out = apix * o.bin_factor
    if "noDW" in images:
        write_mrc(f"{root}_noDW.mrc", images["noDW"], apix_out, float16=o.float16)
    if "PS" in images:
        write_mrc(f"{root}_PS.mrc", images["PS"], motion.ps_pixel_size)
    write_motion_star(
        root.with_suffix(".star"), motion, movie=movie, pixel_size=apix, voltage=kv,
        dose_per_frame=o.dose_per_frame, pre_exposure=pre + o.preexposure,
        binning=o.bin_factor, gain_name=gain_name, defect_file=o.defect_file,
        eer=(o.eer_upsampling, o.eer_grouping) if movie.lower().endswith(".eer") else None,
    )  # fmt: skip
    total, early, late = _accumulated(motion, o, pre)
    with atomic_path(root.with_suffix(".log")) as tmp:
        tmp.write_text(
            f"movie {movie}: {motion.n_frames} frames of {motion.shape[1]} x {motion.shape[0]}, "
            f"frames {motion.first + 1}-{motion.n_frames} used\n"
            f"global alignment {'converged' if motion.converged else 'did not converge'}; "
            f"accumulated motion total {total:.2f} early {early:.2f} late {late:.2f} px\n"
            f"local model: "
            + (f"{motion.n_patches_kept} patches, fit RMSD {motion.fit_rmsd[0]:.3f} "
               f"{motion.fit_rmsd[1]:.3f} px\n" if motion.local_coeffs is not None else "none\n")
            + f"hot pixels repaired: {len(motion.hot_pixels)}\n"
            f"time {motion.seconds:.2f} s ("
            + ", ".join(f"{k} {v:.2f}" for k, v in motion.stages.items())
            + ")\n"
        )  # fmt: skip
    plot_shifts(motion, f"{root}_shifts.png", title=movie)
    # the micrograph last: its presence marks the movie done
    write_mrc(root.with_suffix(".mrc"), images["sum"], apix_out, float16=o.float16)


def _write_corrected(out: Path, optics: pd.DataFrame, rows: list, o: MotionCorrOptions) -> Path:
    opt = optics.copy()
    opt["rlnMicrographPixelSize"] = (
        opt["rlnMicrographOriginalPixelSize"].astype(float) * o.bin_factor
    )
    table: dict[str, list] = {}
    if o.dose_weighting and o.save_noDW:
        table["rlnMicrographNameNoDW"] = [f"{r}_noDW.mrc" for _, r, _ in rows]
    if o.grouping_for_ps > 0:
        table["rlnCtfPowerSpectrum"] = [f"{r}_PS.mrc" for _, r, _ in rows]
    table["rlnMicrographName"] = [str(r.with_suffix(".mrc")) for _, r, _ in rows]
    table["rlnMicrographMetadata"] = [str(r.with_suffix(".star")) for _, r, _ in rows]
    table["rlnOpticsGroup"] = [int(row.get("rlnOpticsGroup", 1)) for row, _, _ in rows]
    for i, lab in enumerate(("rlnAccumMotionTotal", "rlnAccumMotionEarly", "rlnAccumMotionLate")):
        table[lab] = [acc[i] for _, _, acc in rows]
    star = out / "corrected_micrographs.star"
    write_star({"optics": opt, "micrographs": pd.DataFrame(table)}, star)
    return star


def _write_logfile(out: Path, rows: list) -> None:
    """``logfile.pdf``: accumulated motion per micrograph, then the newest shift plots."""
    from PIL import Image, ImageDraw

    w, h, m = 800, 500, 50
    page = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(page)
    acc = np.array([a for _, _, a in rows])
    top = float(acc.max()) * 1.05 if acc.size and acc.max() > 0 else 1.0
    d.rectangle([m, m, w - m, h - m], outline="black")
    for i, color in enumerate(((0, 0, 0), (214, 39, 40), (31, 119, 180))):
        pts = [
            (m + (k + 0.5) / len(acc) * (w - 2 * m), h - m - v / top * (h - 2 * m))
            for k, v in enumerate(acc[:, i])
        ]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        else:
            d.ellipse([pts[0][0] - 3, pts[0][1] - 3, pts[0][0] + 3, pts[0][1] + 3], fill=color)
    d.text((m, 10), f"accumulated motion per micrograph (pixels, 0-{top:.1f}): "
                    "black total, red early, blue late", fill="black")  # fmt: skip
    d.text((m, h - m + 10), f"micrograph 1 .. {len(acc)}", fill="black")
    pages = [page]
    plots = [Path(f"{r}_shifts.png") for _, r, _ in rows[-48:]]
    for k in range(0, len(plots), 12):
        sheet = Image.new("RGB", (4 * 240, 3 * 250), "white")
        for j, p in enumerate(plots[k : k + 12]):
            if p.is_file():
                with Image.open(p) as im:
                    sheet.paste(
                        im.convert("RGB").resize((240, 250)), ((j % 4) * 240, (j // 4) * 250)
                    )
        pages.append(sheet)
    with atomic_path(out / "logfile.pdf") as tmp:
        pages[0].save(tmp, format="PDF", save_all=True, append_images=pages[1:])


def _read_failed(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    t = read_star(path).get("failed")
    if not isinstance(t, pd.DataFrame) or not len(t):
        return {}
    return dict(
        zip(t["rlnMicrographMovieName"].astype(str), t["tamisReason"].astype(str), strict=True)
    )


def _write_failed(path: Path, failed: dict[str, str]) -> None:
    write_star(
        {
            "failed": pd.DataFrame(
                {"rlnMicrographMovieName": list(failed), "tamisReason": list(failed.values())}
            )
        },  # fmt: skip
        path,
    )
