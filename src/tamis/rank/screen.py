"""Particle screen: after the class selection, check every selected particle against its own class
average and drop the ones that do not look like it.

A class selection cannot be cleaner than its classes: junk boxes that 2D classification put into
a class of real particles (empty boxes, clumps of particles, ice or carbon) go through with it.
Each of those is visible at the particle level once the particle is compared with the model that
classified it. For particle ``X`` with class average ``A`` in its pose (psi, origin) and its CTF
``C``, with the job's noise power ``sigma²(k)`` (``rlnSigma2Noise``):

- **amplitude** ``a = sum Re(X* CA) / sigma² / sum |CA|² / sigma²``: the least-squares scale of
  the class in the box. About 1 for a real particle, near 0 for an empty box (a little above,
  since its pose was fitted to noise).
- **misfit**: the low-resolution density the scaled class leaves unexplained inside the particle
  mask: both images whitened by the noise spectrum, low-passed to ``lowres`` and put in units of
  the box's own noise level (its power beyond 0.7 x Nyquist, so a box that extraction normalised
  by a bright background is not favoured); the masked residual's excess over pure noise, as a
  z-score. Neighbouring particles, ice, film and clumps add density the class does not have.
  Where the particles carry micrograph coordinates, a particle whose nearest boxes all hold more
  than noise (it sits on carbon film or in thick ice) is judged against them instead
  (:func:`local_misfit`): the film is not the particle's fault, a blob among clean boxes is.
  There the amplitude, too, is judged against the brightness of the surroundings where they
  are fainter than their classes (:func:`local_amplitude_level`): extraction normalises each
  box by its own background, so every particle on film or in thick ice comes out fainter,
  while an empty box is faint among any neighbours.

Thresholds adapt to the job (``adaptive``, the default). The misfits of the particles that
look like their class form a core whose centre and spread are estimated robustly (a median
trimmed to the core, the spread from the core's outlier-free side, at least 1: the misfit's own
spread for pure noise); junk adds an excess above it. With the core taken as symmetric, the
expected number of clean particles beyond any threshold follows from it, the rest of what lies
beyond is junk, and the threshold is put where the expected errors (clean dropped + junk kept)
are fewest: where junk becomes as common as clean particles. It is never closer to the core
than ``min_misfit`` spreads (a data set without junk loses almost nothing) and never further than
``max_misfit``. A class whose own members misfit more than the selection's core (two
conformations that 2D classification did not separate, a blurred class of box-filling
particles) has its misfit cut moved up by the distance between its core and the selection's,
at most ``class_shift`` spreads (so ``max_misfit`` + ``class_shift`` spreads above the
selection's core at the most): its particles are judged against their own class, while no class
can excuse more than that (a chosen class made mostly of junk gets the whole raise, but ice,
film and clumps lie far beyond it). The
amplitude, as a fraction of its class's median, gets the same treatment on its low side, between
``min_amplitude`` (dropped below: an empty box explains the data as well as the class does) and
``min_misfit`` spreads under the core; when the core itself reaches below ``min_amplitude``
(faint class averages, particles of varied contrast), the cut moves below it, down to zero, only
as far as low values outnumber what the core accounts for. With ``adaptive=False``, the fixed
rule of earlier versions: amplitude below ``min_amplitude`` x the class median, misfit more than
``max_misfit`` robust SDs above the selection's median (the local misfit and amplitude level,
where the particles have coordinates, apply to both rules). Defaults chosen on the ranker's
training jobs (``scripts/tune_screen.py``; BENCHMARKS.md).

The sums use the E-step's own projector (:func:`tamis.class2d.fourier2d.project`) and RELION's
pose convention: the class rotated by psi, then moved by ``-origin``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis._progress import progress_bar
from tamis.class2d.fourier2d import FourierWindow, project, reference_grids, relion_round
from tamis.errors import InputFileError, TamisError
from tamis.fourier import (
    duplicate_half_column,
    irfft2_centered,
    rfft2_centered,
    rfft_frequencies,
    shift_phases,
)
from tamis.io.particles import ParticleSet
from tamis.masks import soft_edge

__all__ = [
    "ScreenOptions",
    "particle_fit",
    "screen_particles",
    "noise_spectra",
    "core_of",
    "excess_threshold",
    "local_statistics",
    "local_misfit",
    "local_amplitude_level",
]


#: The surroundings excuse at most this much of a particle's amplitude (a box among neighbours
#: at half their class's brightness is judged at twice its own; :func:`local_amplitude_level`).
AMPLITUDE_LEVEL_FLOOR = 0.5

#: The per-particle statistics of :func:`particle_fit` (besides ``class`` and the re-aligned pose).
_FIT_STATS = (
    "amplitude", "misfit", "signal", "amplitude_low", "amplitude_plain", "excess", "misfit_unit",
)  # fmt: skip


@dataclass
class ScreenOptions:
    #: drop particles whose low-resolution misfit is this many spreads above the core (the
    #: fixed rule: robust SDs above the median)
    max_misfit: float = 5.0
    #: drop particles whose amplitude is below this fraction of their class's median (below 0.5
    #: the box is better explained by no particle than by its class scaled to the median);
    #: adaptive: lower where the class's own core of amplitudes reaches below it
    min_amplitude: float = 0.6
    #: drop particles whose plain low-resolution amplitude (``amplitude_plain``: unwhitened,
    #: low-passed to ``lowres``, in its own re-aligned pose) is below this fraction of their
    #: class's median; 0: off. Empty boxes in classes of particles, which the whitened
    #: amplitude passes when the noise spectrum is not noise (denoised or 8-bit images); 0.35
    #: chosen on real EMPIAR-10017 boxes, checked on 24 held-apart simulated jobs (BENCHMARKS.md)
    min_plain_amplitude: float = 0.35
    #: thresholds placed per job where junk outnumbers clean particles (see the module text),
    #: no closer to the core than ``min_misfit`` spreads; False: the fixed thresholds above
    adaptive: bool = True
    #: (for the amplitude's cut too, below the core). 2.5, chosen with ``class_shift`` 3: the
    #: training jobs' false-positive rate of the earlier defaults (3, no shift; set both to go
    #: back) with fewer real particles dropped (``scripts/tune_screen.py``, BENCHMARKS.md)
    min_misfit: float = 2.5
    #: re-align each particle to its class average first (the job's psi step and offset
    #: range): a job's stored poses can be stale (VDAM), and a stale pose misfits any particle
    realign: bool = True
    #: the misfit is measured up to this resolution (Angstrom)
    lowres: float = 25.0
    #: judge the misfit against the particle's surroundings: its this many nearest boxes on the
    #: same micrograph (rlnCoordinateX/Y), where they hold more than noise (carbon film, thick
    #: ice), set the background level and spread (:func:`local_misfit`); 0, or particles
    #: without coordinates: against pure noise alone
    local_neighbours: int = 10
    #: adaptive: a chosen class whose own misfit core lies above the selection's moves its misfit
    #: cut up by that distance, at most this many spreads (mixed or blurred classes of real
    #: particles); 0: one cut for every class
    class_shift: float = 3.0
    #: fewer selected particles than this: no screen (the medians would mean little)
    min_particles: int = 20
    batch_size: int = 256
    #: torch device for the screen: "auto" (CUDA when present), "cpu", "cuda:N"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.max_misfit > 0:
            raise TamisError(f"--screen_max_misfit {self.max_misfit}: must be > 0")
        if not 0 <= self.min_amplitude < 1:
            raise TamisError(f"--screen_min_amplitude {self.min_amplitude}: must be in [0, 1)")
        if not 0 <= self.min_plain_amplitude < 1:
            raise TamisError(
                f"--screen_min_plain_amplitude {self.min_plain_amplitude}: must be in [0, 1)"
            )
        if self.adaptive and not 0 < self.min_misfit <= self.max_misfit:
            raise TamisError(
                f"--screen_min_misfit {self.min_misfit}: must be > 0 and <= --screen_max_misfit"
            )
        if not self.lowres > 0:
            raise TamisError(f"screen resolution {self.lowres}: must be > 0")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise TamisError(f"--device {self.device}: use auto, cpu or cuda[:N]")
        if not self.class_shift >= 0:
            raise TamisError(f"--screen_class_shift {self.class_shift}: must be >= 0")
        if self.local_neighbours < 0:
            raise TamisError(f"screen local_neighbours {self.local_neighbours}: must be >= 0")
        if self.batch_size < 1 or self.min_particles < 0:
            raise TamisError("screen batch_size must be >= 1 and min_particles >= 0")


def noise_spectra(model: dict, model_path: str | Path = "<model>") -> dict[int, np.ndarray]:
    """``rlnSigma2Noise`` per optics group (1-based) from a RELION 3.1+ model STAR file."""
    out = {}
    for name, table in model.items():
        if name.startswith("model_optics_group_") and isinstance(table, pd.DataFrame):
            if "rlnSigma2Noise" in table.columns:
                out[int(name.rsplit("_", 1)[1])] = table["rlnSigma2Noise"].to_numpy(np.float64)
    if not out:
        raise InputFileError(model_path, "has no data_model_optics_group_N with rlnSigma2Noise")
    return out


def particle_fit(
    particles: ParticleSet,
    classes: np.ndarray,
    sigma2: dict[int, np.ndarray],
    rows: np.ndarray | None = None,
    *,
    lowres: float = 25.0,
    diameter_px: float | None = None,
    ctf_flags: dict | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    realign: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """Amplitude and low-resolution misfit of each particle (``rows``, 0-based; default all)
    against its class average in its pose. ``classes`` is ``(K, n, n)``; the particles' table
    needs ``rlnClassNumber``, ``rlnAnglePsi`` and ``rlnOriginX/YAngst``. Returns a table indexed
    by row with ``amplitude``, ``misfit`` (z-score), ``signal`` (``sum |CA|² / sigma²``),
    ``amplitude_low`` (the least-squares scale of the class inside the mask in the misfit's
    whitened, low-passed images; reported only), ``amplitude_plain`` (the scale over the whole
    box in images low-passed to ``lowres`` without whitening: the low-resolution blob itself,
    which whitening by the noise spectrum weights little; in its own re-aligned pose, psi and
    shift, with ``realign``, else at the best whole-pixel shift within 3 px of the stored pose;
    :attr:`ScreenOptions.min_plain_amplitude` cuts on it) and
    ``class`` (1-based).

    ``realign=(psi_step, offset_range_px)``: first re-align every particle to its class average,
    the pose with the largest amplitude over psi (the stored psi plus multiples of ``psi_step``,
    all round) and whole-pixel shifts within ``offset_range_px`` of the stored origin (the stored
    pose is one of them). A job's stored poses can be stale: VDAM updates a particle only in
    the mini-batches it belongs to, and the class averages keep moving after that. The table then
    also has ``psi`` and ``shift_x``/``shift_y`` (pixels, the change of origin) of the pose used."""
    table = particles.particles
    where = particles.source or Path("<particles>")
    need = ["rlnClassNumber", "rlnAnglePsi"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise InputFileError(where, f"lacks {', '.join(missing)} (not a 2D job's data.star?)")
    if rows is None:
        rows = np.arange(len(table))
    else:
        rows = np.asarray(rows)
        if rows.dtype == bool or not np.issubdtype(rows.dtype, np.integer):
            raise TamisError("particle_fit: rows must be integer row numbers")
        if len(np.unique(rows)) != len(rows) or ((rows < 0) | (rows >= len(table))).any():
            raise TamisError("particle_fit: rows must be distinct row numbers of the table")
        rows = rows.astype(np.int64)
    n = particles.box_size
    if classes.shape[-2:] != (n, n):
        raise InputFileError(where, f"particles are {n} px but class averages {classes.shape[-1]}")
    dev = torch.device(device)
    pixel = particles.optics["rlnImagePixelSize"].to_numpy(np.float64)  # per optics group
    pixel_of = particles.pixel_sizes  # per particle
    window = _half_plane(n, dev)
    shell = window.shell.long().reshape(n, n // 2 + 1)
    grids = reference_grids(torch.from_numpy(np.ascontiguousarray(classes, np.float32)).to(dev))
    flags = ctf_flags or {}
    half = n // 2
    counted = (shell >= 1) & (shell <= half) & ~duplicate_half_column((n, n), device=dev)
    high = counted & (shell >= math.ceil(0.7 * half))
    kx_grid = window.kx.reshape(shell.shape)
    radius = 0.45 * n if diameter_px is None else min(0.5 * diameter_px, half - 1.0)
    mask = (1.0 - soft_edge(n, radius, 4.0, device=dev)).to(torch.float32)
    area = float(mask.sum())
    ogroup = particles.optics_group_index
    group_numbers = particles.optics["rlnOpticsGroup"].astype(int).to_numpy()
    # per optics group: weights for the amplitude, for the noise level (and their count), the
    # whitening low-pass filter, the low band's full-plane pixel count and the plain low band
    weights: dict[int, tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, float, torch.Tensor]]
    weights = {}
    used = set(np.unique(ogroup[rows]).tolist())
    for g, number in enumerate(group_numbers):
        if g not in used:
            continue
        s2 = sigma2.get(int(number))
        if s2 is None or len(s2) <= math.ceil(0.7 * half):
            raise TamisError(
                f"the 2D job's model STAR file has no usable rlnSigma2Noise for optics group "
                f"{number} (--no_particle_screen selects by class only)"
            )
        s2 = torch.as_tensor(np.array(s2), dtype=torch.float64, device=dev)
        ok = (shell >= 1) & (shell < min(len(s2), half + 1))
        s2_px = s2[shell.clamp(max=len(s2) - 1)]
        w = torch.where(ok & (s2_px > 0), 1.0 / s2_px.clamp(min=1e-30), 0.0)
        low = ok & (shell <= max(3, int(n * float(pixel[g]) / lowres)))
        # full-plane pixels in the low band (the half plane holds kx > 0 once for two)
        # (the Nyquist column kx = n/2 of an even box is its own mirror: once)
        twice = (kx_grid > 0) & ~((n % 2 == 0) & (kx_grid == half))
        n_full = float((low * torch.where(twice, 2, 1)).sum())
        w = w.float()
        hw = w * high
        weights[g] = (
            w * counted, hw, max(1, int((hw > 0).sum())), torch.sqrt(w * low), n_full,
            low.float(),
        )  # fmt: skip
    white_band = {g: wts[0] for g, wts in weights.items()}
    # (each independent Fourier component once, as the whitened weights: the E-step's counting)
    plain_band = {g: wts[5] * counted for g, wts in weights.items()}
    # without re-alignment, whole-pixel shifts searched for the plain amplitude (wrapped
    # indices of the correlation)
    reach = 3
    dy, dx = torch.meshgrid(
        torch.arange(-reach, reach + 1, device=dev),
        torch.arange(-reach, reach + 1, device=dev),
        indexing="ij",
    )
    near = dx * dx + dy * dy <= reach * reach
    shift_rows, shift_cols = dy[near] % n, dx[near] % n
    k_of = table["rlnClassNumber"].to_numpy(np.int64) - 1
    if (k_of[rows] < 0).any() or (k_of[rows] >= len(classes)).any():
        raise InputFileError(where, "rlnClassNumber outside the job's classes")
    psi_all = table["rlnAnglePsi"].to_numpy(np.float64)
    ox = table.get("rlnOriginXAngst", pd.Series(np.zeros(len(table)))).to_numpy(np.float64)
    oy = table.get("rlnOriginYAngst", pd.Series(np.zeros(len(table)))).to_numpy(np.float64)
    ctf_all = particles.ctf_params()
    out = []
    with progress_bar(len(rows), "particle screen", enabled=progress) as bar:
        for batch in particles.batches(batch_size, indices=rows, device=dev):
            idx = batch.indices
            b = len(idx)
            x = rfft2_centered(batch.images.to(torch.float32))  # (B, n, n//2+1)
            k = torch.as_tensor(k_of[idx], device=dev)
            psi = torch.as_tensor(psi_all[idx], device=dev)
            px = torch.as_tensor(pixel_of[idx], device=dev)
            shift = -torch.stack([torch.as_tensor(ox[idx], device=dev),
                                  torch.as_tensor(oy[idx], device=dev)], -1) / px[:, None]  # fmt: skip
            ramp = shift_phases(shift[:, None, :], window.kx[None], window.ky[None], (n, n))
            ctf = ctf_all[torch.as_tensor(idx)].compute((n, n), **flags).to(dev, torch.float32)
            moved = np.zeros((b, 2))
            plain_aligned = None
            if realign is not None:
                # the whitened pose, and the plain low-resolution amplitude in its own pose:
                # aligned on the blob that whitening weights little
                (psi, extra, _), (_, _, plain_aligned) = _realign(
                    x, grids, k, psi, ramp.reshape(x.shape), ctf, window,
                    [white_band, plain_band], ogroup[idx], realign, n,
                )  # fmt: skip
                moved = extra.cpu().numpy()
                shift = shift + extra.to(shift.dtype)
                ramp = shift_phases(shift[:, None, :], window.kx[None], window.ky[None], (n, n))
            proj = _own_class_projections(grids, k, psi, window)
            ca = (proj * ramp.to(torch.complex64)).reshape(x.shape) * ctf
            stats = {key: np.empty(b) for key in _FIT_STATS}
            stats["class"] = k_of[idx] + 1
            if realign is not None:
                stats["psi"] = psi.cpu().numpy()
                stats["shift_x"], stats["shift_y"] = moved[:, 0], moved[:, 1]
            for g in np.unique(ogroup[idx]):
                sel = torch.as_tensor(ogroup[idx] == g, device=dev)
                wc, hw, n_high, lowpass, n_full, plain = weights[int(g)]
                xg, cg = x[sel], ca[sel]
                s = _sum(wc * (cg.real**2 + cg.imag**2))
                cross = _sum(wc * (xg.real * cg.real + xg.imag * cg.imag))
                noise = _sum(hw * (xg.real**2 + xg.imag**2)) / n_high
                # whitened, low-passed, in units of the box's own noise; fitted inside the mask
                filt = (lowpass[None] / noise.clamp(min=1e-30).sqrt()[:, None, None]).float()
                xr = irfft2_centered(xg * filt, (n, n))
                cr = irfft2_centered(cg * filt, (n, n))
                a_m = _sum(mask * xr * cr) / _sum(mask * cr * cr).clamp(min=1e-30)
                resid = _sum(mask * (xr - a_m.float()[:, None, None] * cr) ** 2)
                # pure noise: per-pixel variance n_full, about n_full x area / n² independent terms
                ratio = resid / (n_full * area) - 1.0
                dof = max(1.0, n_full * area / (n * n))
                sel_np = sel.cpu().numpy()
                stats["amplitude"][sel_np] = (cross / s).cpu().numpy()
                stats["misfit"][sel_np] = (ratio * math.sqrt(dof / 2)).cpu().numpy()
                stats["excess"][sel_np] = ratio.cpu().numpy()
                stats["misfit_unit"][sel_np] = math.sqrt(dof / 2)
                stats["signal"][sel_np] = s.cpu().numpy()
                stats["amplitude_low"][sel_np] = a_m.cpu().numpy()
                if plain_aligned is not None:  # the plain scale in its own re-aligned pose
                    a_p = plain_aligned[sel]
                else:  # the scale without whitening, at the best whole-pixel shift near the pose
                    xp = irfft2_centered(xg * plain, (n, n))
                    cp = irfft2_centered(cg * plain, (n, n))
                    corr = torch.fft.irfft2(
                        torch.fft.rfft2(xp) * torch.fft.rfft2(cp).conj(), s=(n, n)
                    )  # corr[s] = sum_r xp(r + s) cp(r)
                    best = corr[:, shift_rows, shift_cols].amax(1)
                    a_p = best / _sum(cp * cp).clamp(min=1e-30)
                stats["amplitude_plain"][sel_np] = a_p.cpu().numpy()
            out.append(pd.DataFrame(stats, index=idx))
            bar.advance(b)
    fit = (
        pd.concat(out) if out else pd.DataFrame(columns=[*_FIT_STATS, "class"])
    )  # batches come in the order of rows
    fit.loc[fit["signal"] <= 0, [k for k in _FIT_STATS if k != "signal"]] = np.nan
    return fit


def _neighbour_median(
    values: list[np.ndarray], table: pd.DataFrame, rows: np.ndarray, neighbours: int
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """For each of ``rows`` (rows of the particle ``table``) and each array of ``values`` (one
    value per row), the median of the values over its ``neighbours`` nearest other boxes on the
    same micrograph and their normal-consistent median deviation (NaN for a box alone on its
    micrograph or among undefined values); one neighbour search for all arrays. ``None``
    without micrograph coordinates or with ``neighbours`` 0."""
    cols = ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY")
    if neighbours < 1 or any(c not in table.columns for c in cols) or not len(rows):
        return None
    xy = table[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(np.float64)[rows]
    if not np.isfinite(xy).all():
        return None
    from scipy.spatial import cKDTree

    out = [(np.full(len(rows), np.nan), np.full(len(rows), np.nan)) for _ in values]
    mics = pd.Series(table["rlnMicrographName"].to_numpy()[rows])
    for members in mics.groupby(mics, sort=False).indices.values():
        if len(members) < 2:
            continue
        k = min(neighbours, len(members) - 1)
        _, near = cKDTree(xy[members]).query(xy[members], k=k + 1)
        for v, (level, spread) in zip(values, out, strict=True):
            # the first neighbour is the box itself (or one at the same place)
            around = v[members][near[:, 1:]]
            with warnings.catch_warnings():  # neighbours all undefined (blank classes): NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                centre = np.nanmedian(around, axis=1)
                level[members] = centre
                spread[members] = 1.4826 * np.nanmedian(np.abs(around - centre[:, None]), axis=1)
    return out


def local_statistics(
    fit: pd.DataFrame, table: pd.DataFrame, neighbours: int, min_particles: int = 20
) -> dict[str, np.ndarray] | None:
    """The screen's statistics against each particle's surroundings, from one search for its
    ``neighbours`` nearest other boxes on the same micrograph (rows of ``fit``, whose index is
    rows of the particle ``table``): ``misfit_local`` (:func:`local_misfit`; where ``fit`` has
    ``misfit_unit``) and, for the amplitudes ``fit`` has, ``amplitude_level`` and
    ``amplitude_plain_level`` (:func:`local_amplitude_level`). ``None`` without micrograph
    coordinates or with ``neighbours`` 0."""
    rows = fit.index.to_numpy()
    cls = fit["class"].to_numpy() if "class" in fit.columns else np.zeros(len(fit), int)
    columns = [c for c in ("amplitude", "amplitude_plain") if c in fit.columns]
    everyone = np.ones(len(fit), bool)
    ratios = [
        _to_class_median(fit[c].to_numpy(np.float64), cls, everyone, min_particles) for c in columns
    ]
    excess = fit["excess"].to_numpy(np.float64)
    around = _neighbour_median([excess, *ratios], table, rows, neighbours)
    if around is None:
        return None
    # the background: the neighbours' median relative excess and its spread
    level, spread = np.nan_to_num(around[0][0], nan=0.0), np.nan_to_num(around[0][1])
    textured = level > 0  # the neighbourhood holds more than noise
    out = {}
    if "misfit_unit" in fit.columns:
        unit = fit["misfit_unit"].to_numpy(np.float64)
        misfit = fit["misfit"].to_numpy(np.float64).copy()
        scale = np.maximum((1.0 + level[textured]) / unit[textured], spread[textured])
        misfit[textured] = (excess[textured] - level[textured]) / scale
        out["misfit_local"] = misfit
    for column, (bright, _) in zip(columns, around[1:], strict=True):
        bright = np.where(textured, np.nan_to_num(bright, nan=1.0), 1.0)
        out[f"{column}_level"] = np.clip(bright, AMPLITUDE_LEVEL_FLOOR, 1.0)
    return out


def local_misfit(fit: pd.DataFrame, table: pd.DataFrame, neighbours: int) -> np.ndarray | None:
    """Each particle's misfit against its surroundings rather than pure noise, for the rows of
    ``fit`` (:func:`particle_fit`; its index: rows of the particle ``table``), or ``None`` when
    the table has no micrograph coordinates or ``neighbours`` is 0.

    A particle on carbon film or in thick ice sits among boxes whose residuals all carry that
    density, while an ice blob or a clump stands out from its neighbours. The surroundings are
    the ``neighbours`` nearest other boxes on the same micrograph: their median relative excess
    power ``b`` (``excess``) and its spread ``s`` (normal-consistent median deviation). Where
    ``b`` is above zero (the neighbourhood holds more than noise), the misfit becomes a z-score
    against them, ``(excess - b) / max(s0 (1 + b), s)`` with ``s0`` the excess's spread for pure
    noise (``1 / misfit_unit``): the residual in units of the background's power, and its
    box-to-box variation where the background varies more than noise does. Elsewhere the misfit
    is kept as it is, so a particle among clean neighbours is judged exactly as before."""
    stats = local_statistics(fit, table, neighbours)
    return None if stats is None else stats["misfit_local"]


def local_amplitude_level(
    fit: pd.DataFrame, table: pd.DataFrame, neighbours: int, min_particles: int = 20
) -> dict[str, np.ndarray] | None:
    """How bright each particle's surroundings are, where they hold more than noise: for
    ``amplitude`` and ``amplitude_plain``, the median over its ``neighbours`` nearest other
    boxes on the same micrograph of their value as a fraction of their class's median (of every
    row of ``fit`` in that class; of all rows for classes with fewer than ``min_particles``),
    clipped to [``AMPLITUDE_LEVEL_FLOOR``, 1]; 1 where those boxes' median ``excess`` is not
    above zero (the condition of :func:`local_misfit`) or the level is undefined. Extraction
    normalises each box by its own background, so on textured carbon film or in thick ice every
    particle comes out fainter than its class; an empty box is faint among bright neighbours
    and among faint ones alike. ``None`` without micrograph coordinates or with ``neighbours``
    0."""
    stats = local_statistics(fit, table, neighbours, min_particles)
    if stats is None:
        return None
    return {k[: -len("_level")]: v for k, v in stats.items() if k.endswith("_level")}


def _realign(
    x: torch.Tensor,
    grids: torch.Tensor,
    k: torch.Tensor,
    psi: torch.Tensor,
    ramp: torch.Tensor,
    ctf: torch.Tensor,
    window: FourierWindow,
    bands: list[dict[int, torch.Tensor]],
    groups: np.ndarray,
    search: tuple[float, float],
    n: int,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per entry of ``bands`` (half-plane weights per optics group: whitened, or a plain low
    band), the pose of largest amplitude for a batch: psi (degrees), the whole-pixel change of
    shift (``(B, 2)``, x, y) from the stored pose (``ramp``: its phase shift) and that amplitude
    (float64), the least-squares scale of the class under those weights. Each trial psi's
    projections serve every band; the amplitude at every shift comes from one inverse FFT of
    the weighted cross-spectrum."""
    step, radius = search
    n_psi = max(1, int(round(360.0 / step)))
    dev = x.device
    b = len(psi)
    ky_neg = torch.nonzero(duplicate_half_column((n, n), device=dev), as_tuple=True)

    def weights_of(band: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # the E-step's sums count each independent Fourier component once (half the full plane,
        # the kx = n/2 column whole); irfft2 sums the full plane: halve all, keep that column
        # whole. Returns (x times the full-plane weights, the once-counted weights).
        full = torch.zeros((b,) + x.shape[1:], dtype=torch.float32, device=dev)
        once = torch.zeros_like(full)
        for g in np.unique(groups):
            sel = torch.as_tensor(groups == g, device=dev)
            wc = band[int(g)]
            once[sel] = wc
            sym = wc.clone()
            sym[ky_neg] = wc[(-ky_neg[0]) % n, ky_neg[1]]  # the kx = 0 mirror pixels
            if n % 2 == 0:
                sym[n // 2, 0] = 0.0
                sym[:, -1] = 2.0 * sym[:, -1]
            full[sel] = 0.5 * sym
        return x * full, once

    weighted = [weights_of(band) for band in bands]
    yy = torch.fft.fftfreq(n, d=1.0 / n, device=dev)
    d2 = yy[:, None] ** 2 + yy[None, :] ** 2
    allowed = d2 <= radius * radius + 1e-9
    best = [torch.full((b,), -torch.inf, dtype=torch.float64, device=dev) for _ in bands]
    best_psi = [psi.clone() for _ in bands]
    best_shift = [torch.zeros((b, 2), dtype=torch.float64, device=dev) for _ in bands]
    for j in range(n_psi):
        trial = psi + j * step
        ca = (
            _own_class_projections(grids, k, trial, window).reshape(x.shape)
            * ramp.to(torch.complex64)
            * ctf
        )
        power = ca.real**2 + ca.imag**2
        for m, (xw, once) in enumerate(weighted):
            signal = _sum(once * power)
            cross = torch.fft.irfft2(xw * ca.conj(), s=(n, n)) * (n * n)
            cross = torch.where(allowed, cross, -torch.inf)
            peak, where = cross.reshape(b, -1).max(dim=1)
            amp = peak.double() / signal.clamp(min=1e-30)
            better = amp > best[m]
            best[m] = torch.where(better, amp, best[m])
            best_psi[m] = torch.where(better, trial, best_psi[m])
            dy = yy[torch.div(where, n, rounding_mode="floor")].double()
            dx = yy[where % n].double()
            shift = torch.stack([dx, dy], -1)
            best_shift[m] = torch.where(better[:, None], shift, best_shift[m])
    return [
        (torch.remainder(p + 180.0, 360.0) - 180.0, sh, a)
        for p, sh, a in zip(best_psi, best_shift, best, strict=True)
    ]


def _own_class_projections(
    grids: torch.Tensor, k: torch.Tensor, psi: torch.Tensor, window: FourierWindow
) -> torch.Tensor:
    """``(B, C)``: each particle's own class (0-based ``k``) projected at its ``psi``."""
    out = torch.empty((len(k), len(window)), dtype=torch.complex64, device=grids.device)
    for c in torch.unique(k).tolist():
        m = k == c
        out[m] = project(grids[c : c + 1], psi[m], window)[0]
    return out


def _sum(values: torch.Tensor) -> torch.Tensor:
    """Per-image sum over the last two dimensions, accumulated in float64."""
    return values.sum((1, 2), dtype=torch.float64)


def _half_plane(n: int, device: torch.device) -> FourierWindow:
    """Every pixel of the ``n`` box's half plane as a window (projections on the whole grid)."""
    ky, kx = rfft_frequencies((n, n), device=device, dtype=torch.float64)
    kx, ky = kx.reshape(-1), ky.reshape(-1)
    r2 = kx * kx + ky * ky
    return FourierWindow(
        box=n, size=n, index=torch.arange(len(kx), device=device), kx=kx, ky=ky,
        shell=relion_round(torch.sqrt(r2)), in_disc=r2 <= (n // 2) ** 2,
    )  # fmt: skip


def screen_particles(
    fit: pd.DataFrame, options: ScreenOptions, *, cuts_from: np.ndarray | None = None
) -> np.ndarray:
    """Which particles of ``fit`` (from :func:`particle_fit`) to keep.

    ``cuts_from`` (boolean over the rows of ``fit``; default all): the rows whose statistics set
    the adaptive cuts (the selected classes' particles); the cuts are then applied to every row,
    so that a class left out of the selection can be judged by the same standard. The amplitude
    is compared with the median of the particle's class (of the ``cuts_from`` rows for classes
    with fewer than ``options.min_particles``): a class average can be brighter or fainter than
    its members, and a whole class of real particles must not fail together. The misfit is
    already in noise units and is compared with the core of the ``cuts_from`` rows (adaptive:
    the cut raised per chosen class by ``options.class_shift`` at most, :func:`_class_shifts`);
    where ``fit`` has ``misfit_local`` (:func:`local_misfit`) and ``options.local_neighbours``
    is above 0, that one, and where it has ``amplitude_level`` / ``amplitude_plain_level``
    (:func:`local_amplitude_level`) the amplitude ratios are divided by them first. Particles
    without a defined amplitude (a blank class average) are kept. With fewer than
    ``options.min_particles`` rows in ``cuts_from`` everything is kept. The plain amplitude's
    cut (``options.min_plain_amplitude``, against its class's median the same way) applies where
    ``fit`` has ``amplitude_plain``. The cuts used are left in ``fit.attrs["cuts"]`` (for the
    log)."""
    local = options.local_neighbours > 0
    mis = fit["misfit_local" if local and "misfit_local" in fit else "misfit"].to_numpy(np.float64)
    keep = np.ones(len(fit), dtype=bool)
    base = np.ones(len(fit), dtype=bool) if cuts_from is None else np.asarray(cuts_from, bool)
    if base.shape != (len(fit),):
        raise TamisError("screen_particles: cuts_from must be one flag per row of the fit")
    if base.sum() < options.min_particles:
        return keep
    cls = fit["class"].to_numpy() if "class" in fit.columns else np.zeros(len(fit), int)

    def against_class(column: str) -> np.ndarray:
        """The column over its class's median, and over the surroundings' brightness where
        ``fit`` has it (fainter surroundings: carbon, thick ice)."""
        out = _to_class_median(fit[column].to_numpy(np.float64), cls, base, options.min_particles)
        if local and f"{column}_level" in fit.columns:
            out = out / fit[f"{column}_level"].to_numpy(np.float64)
        return out

    ratio = against_class("amplitude")
    if options.min_plain_amplitude > 0 and "amplitude_plain" in fit.columns:
        plain = against_class("amplitude_plain")
        with np.errstate(invalid="ignore"):
            keep &= ~(plain < options.min_plain_amplitude)
    if not options.adaptive:
        with np.errstate(invalid="ignore"):
            keep &= ~(ratio < options.min_amplitude)
        med_m = np.nanmedian(mis[base])
        # The misfit is a z-score against noise: its spread is at least 1 whatever the MAD says.
        scale = max(1.0, 1.4826 * float(np.nanmedian(np.abs(mis[base] - med_m))))
        if np.isfinite(med_m):
            keep &= ~((mis - med_m) / scale > options.max_misfit)
        fit.attrs["cuts"] = {"amplitude": options.min_amplitude, "centre": med_m,
                             "spread": scale, "spreads": options.max_misfit,
                             "misfit": med_m + options.max_misfit * scale}  # fmt: skip
        return keep
    # misfit: junk in the upper tail, spread at least 1 (pure noise)
    centre, spread = core_of(mis[base], upper=True, floor=1.0)
    cuts = {"centre": centre, "spread": spread, "misfit": math.nan, "spreads": math.nan}
    if np.isfinite(centre):
        limit = excess_threshold(
            mis[base], centre, spread, centre + options.min_misfit * spread,
            centre + options.max_misfit * spread, upper=True,
        )  # fmt: skip
        shift = np.zeros(len(fit))
        if options.class_shift > 0:
            shift = _class_shifts(mis, cls, base, centre, spread * options.class_shift,
                                  options.min_particles)  # fmt: skip
        keep &= ~(mis > limit + shift)
        cuts.update(misfit=limit, spreads=(limit - centre) / spread,
                    class_raise=float(shift.max(initial=0.0)) / spread)  # fmt: skip
    # amplitude / class median: junk (empty boxes) in the lower tail
    centre, spread = core_of(ratio[base], upper=False, floor=0.0)
    if np.isfinite(centre):
        low = options.min_amplitude
        edge = centre - options.min_misfit * spread
        if edge >= low:  # the usual core: the cut between min_amplitude and the core's edge
            limit = excess_threshold(ratio[base], centre, spread, edge, low, upper=False)
        else:
            # A core so broad that min_amplitude would cut into it (faint class averages,
            # particles of varied contrast: real data seen through little signal): the cut goes
            # below min_amplitude, down to zero, only as far as the low values outnumber what
            # the core accounts for there.
            limit = excess_threshold(ratio[base], centre, spread, low, 0.0, upper=False)
        with np.errstate(invalid="ignore"):
            keep &= ~(ratio < limit)
        cuts["amplitude"] = limit
    fit.attrs["cuts"] = cuts
    return keep


def _class_shifts(
    mis: np.ndarray,
    cls: np.ndarray,
    base: np.ndarray,
    centre: float,
    most: float,
    min_particles: int,
) -> np.ndarray:
    """Per row, how far its class's misfit core (:func:`core_of` over the class's ``base``
    rows) lies above the selection's ``centre``, clipped to [0, ``most``]; 0 for classes with
    fewer than ``min_particles`` (and 3) base rows, classes outside the selection among them.
    No allowance for the core's own sampling noise: in a job of one kind of particle about half
    the classes get a small raise (a tenth of a spread on average for classes of 20); the
    defaults were chosen with it."""
    shift = np.zeros(len(mis))
    for c in np.unique(cls[base]):
        members = cls == c
        if (members & base).sum() < max(min_particles, 3):
            continue
        own, _ = core_of(mis[members & base], upper=True, floor=1.0)
        if np.isfinite(own):
            shift[members] = min(max(own - centre, 0.0), most)
    return shift


def _to_class_median(
    values: np.ndarray, cls: np.ndarray, base: np.ndarray, min_particles: int
) -> np.ndarray:
    """Each value as a fraction of its class's median (of the ``base`` rows' median for classes
    with fewer than ``min_particles``); NaN where that median is not positive or the value is
    undefined (a blank class average leaves its members' values undefined)."""
    ref = np.full(len(values), np.nanmedian(values[base]))
    for c in np.unique(cls):
        members = cls == c
        if members.sum() >= min_particles and np.isfinite(values[members]).any():
            ref[members] = np.nanmedian(values[members])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ref > 0, values / ref, np.nan)


def core_of(values: np.ndarray, *, upper: bool, floor: float) -> tuple[float, float]:
    """Centre and spread of the core of ``values`` whose outliers lie on one side (``upper``:
    above). The centre is the median of the values within two spreads of a first estimate (so
    that a tail of junk does not pull it), the spread the normal-consistent median deviation of
    the values on the side without outliers, at least ``floor``."""
    x = values[np.isfinite(values)]
    if len(x) < 3:
        return math.nan, math.nan
    centre = float(np.median(x))
    spread = floor
    for _ in range(3):
        clean = x[x <= centre] if upper else x[x >= centre]
        spread = max(floor, 1.4826 * float(np.median(np.abs(clean - centre))), 1e-12)
        core = x[np.abs(x - centre) <= 2.0 * spread]
        if len(core) < 3:
            break
        centre = float(np.median(core))
    return centre, spread


def excess_threshold(
    values: np.ndarray, centre: float, spread: float, near: float, far: float, *, upper: bool
) -> float:
    """Where to cut a tail of outliers (``upper``: values above the cut are dropped): the cut
    between ``near`` (closest to the core allowed) and ``far`` that minimises the expected
    clean values dropped plus outliers kept, with the clean values a normal core of ``centre``
    and ``spread`` counted from the side without outliers (twice the values beyond the
    centre on that side). Returns ``far`` when ``near`` lies beyond it."""
    from scipy.special import ndtr

    x = values[np.isfinite(values)]
    sign = 1.0 if upper else -1.0
    y = np.sort(sign * (x - centre) / spread)  # outliers now at large y
    lo, hi = sign * (near - centre) / spread, sign * (far - centre) / spread
    if not len(y) or lo >= hi:
        return far
    n_clean = min(len(y), 2.0 * float((y <= 0).sum()))
    cuts = np.concatenate([[lo], y[(y > lo) & (y < hi)], [hi]])
    beyond = len(y) - np.searchsorted(y, cuts, side="right")  # values dropped at each cut
    clean_beyond = n_clean * ndtr(-cuts)
    # clean dropped + (outliers - outliers dropped); the outlier total is a constant
    cost = 2.0 * clean_beyond - beyond
    best = cuts[int(np.argmin(cost))]
    return centre + sign * best * spread
