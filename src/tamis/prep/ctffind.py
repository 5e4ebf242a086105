"""CTF estimation from a micrograph's Thon rings (the role CTFFIND-4 plays in RELION's ``ctffind``
job), on the CTF of :mod:`tamis.ctf`.

1. Amplitude spectrum: the square root of the mean power spectrum of overlapping tiles
   (``box`` pixels, half overlapping, each with its mean removed), on the half-plane grid.
2. Mean defocus: the radial profile between ``min_resolution`` and ``max_resolution`` is fitted,
   for every trial defocus (``defocus_min`` to ``defocus_max`` in ``defocus_step``, then a tenth
   of it around the best), by a least-squares model ``background(r) + envelope(r) * CTF²(r)``
   with low-order polynomials in r; the trial with the largest share of the variance explained
   over the background-only fit wins.
3. Astigmatism: the 2D spectrum minus that background is correlated with ``CTF²`` over a grid of
   astigmatism (up to ``astigmatism_max``) and angles, then refined by Nelder-Mead on
   (defocus U, defocus V, angle).
4. Fit quality: ``figure_of_merit`` is the correlation over the whole fitted ring;
   ``max_resolution`` (``rlnCtfMaxResolution``) is the highest resolution up to which the
   correlation in every annulus of one CTF period stays above 0.25 (CTFFIND reports its own
   "fit resolution"; this is the same idea, not the same number).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from tamis.ctf import compute_ctf, electron_wavelength
from tamis.errors import InputFileError, TamisError
from tamis.io.coords import pipeline_relative
from tamis.io.images import read_micrograph
from tamis.io.micrographs import MicrographSet
from tamis.io.mrc import write_mrc
from tamis.io.star import atomic_path, write_star
from tamis.workers import Workers, map_items

__all__ = ["CtfFindOptions", "CtfFit", "amplitude_spectrum", "estimate_ctf", "run_ctffind"]


@dataclass
class CtfFindOptions:
    """RELION's ctffind job options (``box``, ``resmin``, ``resmax``, ``dfmin``, ``dfmax``,
    ``dfstep``, ``dast``)."""

    box: int = 512
    min_resolution: float = 30.0
    max_resolution: float = 5.0
    defocus_min: float = 5000.0
    defocus_max: float = 50000.0
    defocus_step: float = 500.0
    astigmatism_max: float = 2000.0  # largest |dU - dV| searched (Å)
    correlation_threshold: float = 0.25  # for max_resolution


@dataclass
class CtfFit:
    defocus_u: float
    defocus_v: float
    defocus_angle: float
    figure_of_merit: float
    max_resolution: float
    #: The amplitude spectrum the fit used (half plane, rfft2 order); None when read from a file.
    spectrum: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def astigmatism(self) -> float:
        return self.defocus_u - self.defocus_v


def amplitude_spectrum(image: torch.Tensor, box: int) -> torch.Tensor:
    """``sqrt(mean |FFT(tile)|²)`` over half-overlapping ``box`` x ``box`` tiles; ``(box,
    box // 2 + 1)`` in torch.fft.rfft2 order (origin at [0, 0])."""
    img = image.to(torch.float64)
    h, w = img.shape
    if min(h, w) < box:
        raise TamisError(f"micrograph {h}x{w} is smaller than the CTF box {box}")
    step = box // 2
    tiles = img.unfold(0, box, step).unfold(1, box, step).reshape(-1, box, box)
    tiles = tiles - tiles.mean(dim=(-2, -1), keepdim=True)
    power = torch.zeros(box, box // 2 + 1, dtype=torch.float64)
    for chunk in tiles.split(16):
        power += (torch.fft.rfft2(chunk).abs() ** 2).sum(0)
    return (power / len(tiles)).sqrt()


def full_plane(half: torch.Tensor) -> torch.Tensor:
    """A half-plane amplitude spectrum ``(n, n // 2 + 1)`` completed to ``(n, n)`` (fft2 order)
    by ``|F(-k)| = |F(k)|``: column ``kx > n/2`` is row ``-ky`` of column ``n - kx``."""
    return torch.cat([half, half.flip(0).roll(1, 0)[:, 1:-1].flip(-1)], dim=1)


def _radius(box: int, pixel_size: float) -> torch.Tensor:
    """Spatial frequency (1/Å) of every half-plane element."""
    ky = torch.fft.fftfreq(box, d=pixel_size, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box, d=pixel_size, dtype=torch.float64)
    return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)


def _ctf1d(
    s: np.ndarray, defocus: np.ndarray, lam: float, cs_a: float, phase0: float
) -> np.ndarray:
    """CTF² on frequencies ``s`` (1/Å) for each defocus (rows), no astigmatism."""
    gamma = (
        -math.pi * lam * defocus[:, None] * s[None] ** 2
        + 0.5 * math.pi * cs_a * lam**3 * s[None] ** 4
        - phase0
    )
    return np.sin(gamma) ** 2


def _poly(x: np.ndarray, degree: int) -> np.ndarray:
    return np.stack([x**k for k in range(degree + 1)], axis=-1)


def estimate_ctf(
    image: torch.Tensor,
    pixel_size: float,
    *,
    voltage: float = 300.0,
    spherical_aberration: float = 2.7,
    amplitude_contrast: float = 0.1,
    options: CtfFindOptions | None = None,
    spectrum: torch.Tensor | None = None,
) -> CtfFit:
    """Estimate defocus U/V/angle of one micrograph (see the module docstring). With
    ``spectrum`` (an amplitude spectrum ``(n, n // 2 + 1)`` in rfft2 order at ``pixel_size``,
    e.g. motion correction's ``_PS.mrc``) the fit uses it and ``image`` is not read."""
    o = options or CtfFindOptions()
    if spectrum is not None:
        amp = spectrum.to(torch.float64)
        box = amp.shape[-2]
    else:
        box = min(o.box, *(2 * (d // 2) for d in image.shape))
        amp = amplitude_spectrum(image, box)
    r = _radius(box, pixel_size)
    s_lo = 1.0 / o.min_resolution
    s_hi = min(1.0 / o.max_resolution, 0.45 / pixel_size)
    if s_hi <= s_lo:
        raise TamisError(
            f"CTF fit range {o.min_resolution}-{o.max_resolution} A is empty at {pixel_size} A/px"
        )
    ring = (r >= s_lo) & (r <= s_hi)
    lam = float(electron_wavelength(voltage))
    cs_a = spherical_aberration * 1e7
    phase0 = math.atan(amplitude_contrast / math.sqrt(1 - amplitude_contrast**2))

    # --- 1D: radial profile in one-pixel shells ---------------------------------------------
    shell = torch.round(r * box * pixel_size).to(torch.int64)
    sel = ring.flatten()
    idx = shell.flatten()[sel]
    n_sh = int(idx.max()) + 1
    prof = torch.zeros(n_sh, dtype=torch.float64).index_add_(0, idx, amp.flatten()[sel])
    cnt = torch.zeros(n_sh, dtype=torch.float64).index_add_(
        0, idx, torch.ones_like(idx, dtype=torch.float64)
    )
    keep = (cnt > 0).numpy()
    prof_np = (prof / cnt.clamp(min=1)).numpy()[keep]
    s1 = np.arange(n_sh)[keep] / (box * pixel_size)
    x = (s1 - s_lo) / (s_hi - s_lo)
    bg_basis = _poly(x, 4)
    env_basis = _poly(x, 2)
    y = prof_np
    bg_coef, *_ = np.linalg.lstsq(bg_basis, y, rcond=None)
    rss_bg = float(((y - bg_basis @ bg_coef) ** 2).sum())

    def scan(defoci: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        c2 = _ctf1d(s1, defoci, lam, cs_a, phase0)
        scores, coefs = [], []
        for c in c2:
            a = np.concatenate([bg_basis, env_basis * c[:, None]], axis=1)
            coef, *_ = np.linalg.lstsq(a, y, rcond=None)
            rss = float(((y - a @ coef) ** 2).sum())
            scores.append(1.0 - rss / max(rss_bg, 1e-30))
            coefs.append(coef)
        return np.array(scores), coefs

    coarse = np.arange(o.defocus_min, o.defocus_max + 0.5 * o.defocus_step, o.defocus_step)
    sc, _ = scan(coarse)
    d0 = float(coarse[int(np.argmax(sc))])
    fine = np.arange(d0 - o.defocus_step, d0 + o.defocus_step + 1e-6, o.defocus_step / 10)
    sc, coefs = scan(fine)
    best = int(np.argmax(sc))
    d0 = float(fine[best])
    coef = coefs[best]

    # --- 2D: background-subtracted spectrum against CTF² with astigmatism ----------------------
    x2 = ((r - s_lo) / (s_hi - s_lo)).clamp(0, 1).numpy()
    bg2 = torch.from_numpy(_poly(x2, 4) @ coef[:5])
    sub = (amp - bg2)[ring]
    sub = sub - sub.mean()
    sub_norm = sub.norm()

    def ctf2(du: torch.Tensor, dv: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
        c = compute_ctf(
            (box, box),
            pixel_size=pixel_size,
            defocus_u=du,
            defocus_v=dv,
            defocus_angle=ang,
            voltage=voltage,
            spherical_aberration=spherical_aberration,
            amplitude_contrast=amplitude_contrast,
            dtype=torch.float64,
        )
        return c**2

    def correlation(du: torch.Tensor, dv: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(du), 32):
            m = ctf2(du[i : i + 32], dv[i : i + 32], ang[i : i + 32])[:, ring]
            m = m - m.mean(-1, keepdim=True)
            out.append((m @ sub) / (m.norm(dim=-1) * sub_norm).clamp(min=1e-30))
        return torch.cat(out)

    asts = np.arange(0.0, o.astigmatism_max + 1e-6, max(o.astigmatism_max / 8, 1.0))
    angs = np.arange(0.0, 180.0, 15.0)
    dmeans = d0 + np.array([-2, -1, 0, 1, 2]) * o.defocus_step / 2
    g = np.array([(dm, a, t) for dm in dmeans for a in asts for t in angs])
    du_t = torch.from_numpy(g[:, 0] + g[:, 1] / 2)
    dv_t = torch.from_numpy(g[:, 0] - g[:, 1] / 2)
    cc = correlation(du_t, dv_t, torch.from_numpy(g[:, 2]))
    b = int(torch.argmax(cc))
    start = np.array([float(du_t[b]), float(dv_t[b]), float(g[b, 2])])

    def negcc(p: np.ndarray) -> float:
        t = torch.from_numpy(np.asarray(p, dtype=np.float64))
        return -float(correlation(t[0:1], t[1:2], t[2:3])[0])

    from scipy.optimize import minimize

    res = minimize(
        negcc,
        start,
        method="Nelder-Mead",
        options={
            "initial_simplex": start + np.array([[0, 0, 0], [200, 0, 0], [0, 200, 0], [0, 0, 10]]),
            "xatol": 5.0,
            "fatol": 1e-5,
            "maxiter": 200,
        },
    )
    du, dv, ang = (float(v) for v in res.x)
    if du < dv:  # RELION/CTFFIND convention: U is the larger defocus
        du, dv, ang = dv, du, ang + 90.0
    ang = ang % 180.0
    fom = -float(res.fun)

    # --- resolution of the fit: correlation per annulus of one CTF period -----------------------
    model = ctf2(
        torch.tensor([du], dtype=torch.float64),
        torch.tensor([dv], dtype=torch.float64),
        torch.tensor([ang], dtype=torch.float64),
    )[0]
    full_sub = amp - bg2
    max_res = 1.0 / s_lo
    dmean = 0.5 * (du + dv)
    # CTF period at s: d(gamma)/ds ~ 2 pi lam dmean s  -> period ds = 1 / (lam dmean s)
    s = s_lo
    while s < s_hi:
        width = max(1.0 / (lam * dmean * s), 2.0 / (box * pixel_size))
        band = (r >= s) & (r < min(s + width, s_hi))
        if int(band.sum()) < 20:
            break
        a = full_sub[band] - full_sub[band].mean()
        m = model[band] - model[band].mean()
        c = float((a @ m) / (a.norm() * m.norm()).clamp(min=1e-30))
        if c < o.correlation_threshold:
            break
        max_res = 1.0 / min(s + width, s_hi)
        s += width
    return CtfFit(du, dv, ang, fom, max_res, amp)


def _result_files(micrograph: str, out_dir: Path) -> tuple[Path, Path]:
    rel = pipeline_relative(micrograph)
    base = out_dir / rel.parent / rel.stem
    return base.with_suffix(".txt"), base.with_suffix(".ctf")


def _write_result(txt: Path, fit: CtfFit) -> None:
    """CTFFIND-4's one-line result file (columns as its header says; phase shift 0)."""
    txt.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(txt) as tmp:
        tmp.write_text(
            "# Output from tamis CTF estimation (CTFFIND-4 column layout)\n"
            "# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; "
            "#4 - azimuth of astigmatism; #5 - additional phase shift [radians]; "
            "#6 - cross correlation; #7 - spacing (in Angstroms) up to which CTF rings were "
            "fit successfully\n"
            f"1.000000 {fit.defocus_u:.6f} {fit.defocus_v:.6f} {fit.defocus_angle:.6f} "
            f"0.000000 {fit.figure_of_merit:.6f} {fit.max_resolution:.6f}\n"
        )


def _read_result(txt: Path) -> CtfFit:
    line = [v for v in txt.read_text().splitlines() if v and not v.startswith("#")][0]
    vals = [float(v) for v in line.split()]
    return CtfFit(vals[1], vals[2], vals[3], vals[5], vals[6])


def _given_spectrum(ms: MicrographSet, i: int, star: str | Path) -> tuple[float, torch.Tensor]:
    """Motion correction's ``_PS.mrc`` of micrograph ``i`` (centred full-plane amplitudes, its
    own pixel size in the header) as the fit's half-plane spectrum."""
    from tamis.io.mrc import read_mrc
    from tamis.io.paths import checked

    name = str(ms.micrographs["rlnCtfPowerSpectrum"].iloc[i]).split(":")[0]
    p = checked(Path(name) if Path(name).is_absolute() else ms.root / name, star)
    full, pixel = read_mrc(p)
    full = full[0] if full.ndim == 3 else full
    n = full.shape[-1]
    if full.shape != (n, n) or n % 2 or pixel <= 0:
        raise InputFileError(p, f"not a square power spectrum with a pixel size ({full.shape})")
    half = torch.fft.ifftshift(torch.from_numpy(full))[:, : n // 2 + 1]
    return float(pixel), half


def _estimate_one(
    i: int,
    *,
    ms: MicrographSet,
    estimate_on: MicrographSet,
    source: str | Path,
    out: Path,
    options: CtfFindOptions,
    use_given_ps: bool,
) -> CtfFit:
    """Micrograph ``i``'s fit; its amplitude spectrum (``.ctf``) and ``.txt`` written, each
    atomically, the ``.txt`` (what a continued job looks for) last."""
    txt, spectrum = _result_files(ms.names[i], out)
    if use_given_ps:
        image, pixel, given = None, *_given_spectrum(ms, i, source)
    else:
        mic = read_micrograph(estimate_on.path(i), ms.pixel_size(i))
        image, pixel, given = mic.image, mic.pixel_size, None
    fit = estimate_ctf(
        image,
        pixel,
        spectrum=given,
        voltage=ms.optics_value(i, "rlnVoltage", 300.0),
        spherical_aberration=ms.optics_value(i, "rlnSphericalAberration", 2.7),
        amplitude_contrast=ms.optics_value(i, "rlnAmplitudeContrast", 0.1),
        options=options,
    )
    centred = torch.fft.fftshift(full_plane(fit.spectrum)).to(torch.float32).numpy()
    spectrum.parent.mkdir(parents=True, exist_ok=True)
    write_mrc(spectrum, np.log1p(centred / max(float(centred.mean()), 1e-30)), 1.0)
    _write_result(txt, fit)
    return replace(fit, spectrum=None)  # the numbers only travel back


def run_ctffind(
    micrographs: str | Path,
    out_dir: str | Path,
    options: CtfFindOptions | None = None,
    *,
    only_do_unfinished: bool = False,
    use_noDW: bool = False,
    use_given_ps: bool = False,
    log: Callable[[str], None] = print,
    show_progress: bool = False,
    workers: Workers = Workers(),
) -> Path:
    """Estimate the CTF of every micrograph of a micrographs STAR file (in this process, or on
    dask ``workers``); write per micrograph a
    CTFFIND-style ``.txt`` and its amplitude spectrum (``.ctf``, MRC, ``rlnCtfImage``), and
    ``<out_dir>/micrographs_ctf.star``. With ``only_do_unfinished``, micrographs with a result
    file are not estimated again. With ``use_noDW`` the CTF is estimated on the sums that are
    not dose-weighted (``rlnMicrographNameNoDW``, from motion correction's ``save_noDW``), whose
    Thon rings reach further; the output still names the dose-weighted micrographs."""
    o = options or CtfFindOptions()
    ms = MicrographSet.from_star(micrographs)
    if use_given_ps and "rlnCtfPowerSpectrum" not in ms.micrographs:
        raise TamisError(
            f"{micrographs}: use_given_ps needs rlnCtfPowerSpectrum (motion correction with "
            "do_save_ps Yes)"
        )
    if use_noDW:
        if "rlnMicrographNameNoDW" not in ms.micrographs:
            raise TamisError(
                f"{micrographs}: use_noDW needs rlnMicrographNameNoDW (motion correction with "
                "do_save_noDW Yes)"
            )
        estimate_on = MicrographSet(
            ms.optics,
            ms.micrographs.assign(rlnMicrographName=ms.micrographs["rlnMicrographNameNoDW"]),
            ms.root,
            ms.source,
        )
    else:
        estimate_on = ms
    out = Path(out_dir)
    fits: list[CtfFit | None] = []
    images, todo = [], []
    for i, name in enumerate(ms.names):
        txt, spectrum = _result_files(name, out)
        images.append(f"{spectrum}:mrc")
        if only_do_unfinished and txt.is_file():
            fits.append(_read_result(txt))
        else:
            fits.append(None)
            todo.append(i)
    work = functools.partial(
        _estimate_one,
        ms=ms,
        estimate_on=estimate_on,
        source=micrographs,
        out=out,
        options=o,
        use_given_ps=use_given_ps,
    )
    for k, fit in map_items(
        work, todo, workers, label="CTF estimation", show_progress=show_progress, log=log
    ):
        fits[todo[k]] = fit
    n_new = len(todo)
    table = ms.micrographs.copy()
    table["rlnCtfImage"] = images
    table["rlnDefocusU"] = [f.defocus_u for f in fits]
    table["rlnDefocusV"] = [f.defocus_v for f in fits]
    table["rlnCtfAstigmatism"] = [f.astigmatism for f in fits]
    table["rlnDefocusAngle"] = [f.defocus_angle for f in fits]
    table["rlnCtfFigureOfMerit"] = [f.figure_of_merit for f in fits]
    table["rlnCtfMaxResolution"] = [f.max_resolution for f in fits]
    star = out / "micrographs_ctf.star"
    write_star({"optics": ms.optics, "micrographs": table}, star)
    log(
        f"estimated the CTF of {n_new} micrographs ({len(fits) - n_new} done before); "
        f"defocus {min(f.defocus_u for f in fits):.0f}-{max(f.defocus_u for f in fits):.0f} A: "
        f"{star}"
    )
    return star
