"""Post-processing of two half maps (``relion_postprocess``'s role; ``src/postprocessing.cpp``).

In RELION's order: the FSC of the unmasked half maps; with a mask, the FSC of the masked maps and of
the masked maps whose phases were randomised beyond the shell where the unmasked FSC first drops
below 0.8; the corrected FSC ``(FSC_masked - FSC_random) / (1 - FSC_random)`` from two shells past
the randomisation on; the resolution at 0.143; then the average map is FSC-weighted
(``sqrt(2 FSC / (1 + FSC))``), its B-factor fitted on the Guinier plot (``ln`` of the mean amplitude
per shell against ``1 / d^2``, 10 Å to the last weighted shell) and applied, and the map low-passed
if asked. FSCs sum over the whole half transform with shells ``ROUND(|k|)`` (RELION's ``getFSC``).

Phases are randomised from a seeded torch generator, not RELION's ``rand()``: the corrected FSC
agrees with RELION's in distribution, not bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis.errors import TamisError
from tamis.fourier import fsc, radial_average, rfft_frequencies, shell_index
from tamis.refine.automask import low_pass_filter

__all__ = [
    "PostprocessOptions",
    "PostprocessResult",
    "shell_fsc",
    "randomize_phases_beyond",
    "corrected_fsc",
    "guinier_plot",
    "fit_straight_line",
    "postprocess",
    "run_postprocess",
]


@dataclass(frozen=True)
class PostprocessOptions:
    """``relion_postprocess``'s options (the GUI sets ``--auto_bfac --autob_lowres 10``)."""

    auto_bfac: bool = True
    autob_lowres: float = 10.0  # Å: the fit's low-resolution end
    autob_highres: float = 0.0  # Å: its high-resolution end (0: as far as the weighted map goes)
    adhoc_bfac: float = 0.0  # used without auto_bfac
    randomize_at_fsc: float = 0.8
    randomize_at_A: float = -1.0  # > 0: randomise from this resolution instead
    low_pass: float = 0.0  # Å; negative: the 0.143 resolution
    skip_fsc_weighting: bool = False
    force_mask: bool = False
    random_seed: int = 0


@dataclass
class PostprocessResult:
    """What ``postprocess.star`` records, plus the sharpened map."""

    resolution: float  # Å, FSC 0.143 of the corrected (or, without a mask, unmasked) FSC
    bfactor: float
    fsc: pd.DataFrame  # RELION's data_fsc columns
    guinier: pd.DataFrame  # RELION's data_guinier columns
    sharpened: torch.Tensor = field(repr=False)
    randomize_from: float = math.nan  # Å
    mask_fraction: float = math.nan  # RELION's rlnParticleBoxFractionSolventMask
    slope: float = 0.0
    intercept: float = 0.0
    fit_r2: float = 0.0
    mask_ignored: bool = False
    warnings: list[str] = field(default_factory=list)


def _rfft(volume: torch.Tensor) -> torch.Tensor:
    return torch.fft.rfftn(volume.to(torch.float64), dim=(-3, -2, -1))


def _irfft(spec: torch.Tensor, n: int) -> torch.Tensor:
    return torch.fft.irfftn(spec, s=(n, n, n), dim=(-3, -2, -1))


def shell_fsc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RELION's ``getFSC`` of two cubic maps (shells ``ROUND(|k|)`` 0..n/2 over the whole half
    transform), in float64: :func:`tamis.fourier.fsc`."""
    return fsc(a.to(torch.float64), b.to(torch.float64))


def randomize_phases_beyond(
    volume: torch.Tensor, shell: int, generator: torch.Generator
) -> torch.Tensor:
    """The map with the phases of every coefficient with ``|k|^2 >= shell^2`` replaced by uniform
    random phases (amplitudes kept), as RELION's ``randomizePhasesBeyond``."""
    n = volume.shape[-1]
    spec = _rfft(volume)
    kz, ky, kx = rfft_frequencies((n, n, n), device=volume.device, dtype=torch.float64)
    beyond = kz * kz + ky * ky + kx * kx >= shell * shell
    phase = torch.rand(spec.shape, generator=generator, dtype=torch.float64) * (2 * math.pi)
    phase = phase.to(volume.device)
    rnd = torch.polar(spec.abs(), phase)
    return _irfft(torch.where(beyond, rnd, spec), n)


def corrected_fsc(
    masked: torch.Tensor, random_masked: torch.Tensor, randomize_at: int
) -> torch.Tensor:
    """RELION's ``calculateFSCtrue``: the masked FSC below shell ``randomize_at + 2``,
    ``(FSC_masked - FSC_random) / (1 - FSC_random)`` from there on (not clipped); a shell-0 value
    <= 0 counts as 1."""
    m = masked.clone()
    r = random_masked.clone()
    for v in (m, r):
        if v[0] <= 0:
            v[0] = 1.0
    shells = torch.arange(len(m), device=m.device)
    true = (m - r) / (1.0 - r)
    return torch.where(shells < randomize_at + 2, m, true)


def check_mask(mask: torch.Tensor, shape: tuple[int, ...], name: str, what: str) -> torch.Tensor:
    """A soft mask as float64, or one error naming ``name`` when it is not of ``shape`` (the
    shape of ``what``) or has values outside [0, 1]."""
    m = mask.to(torch.float64)
    if tuple(m.shape) != tuple(shape):
        raise TamisError(f"{name}: the mask is {tuple(m.shape)} but {what} {tuple(shape)}")
    if float(m.min()) < -1e-6 or float(m.max()) - 1.0 > 1e-6:
        raise TamisError(
            f"{name}: mask values must lie in [0, 1], got {float(m.min()):.4g} .. "
            f"{float(m.max()):.4g}"
        )
    return m


def masked_fscs(
    h1: torch.Tensor, h2: torch.Tensor, mask: torch.Tensor, randomize_at: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked FSC, the masked FSC of the maps with random phases from shell
    ``randomize_at`` on, and the corrected FSC (:func:`corrected_fsc`)."""
    gen = torch.Generator().manual_seed(seed)
    r1 = randomize_phases_beyond(h1, randomize_at, gen)
    r2 = randomize_phases_beyond(h2, randomize_at, gen)
    masked = shell_fsc(h1 * mask, h2 * mask)
    random = shell_fsc(r1 * mask, r2 * mask)
    return masked, random, corrected_fsc(masked, random, randomize_at)


def _last_shell_above(curve: torch.Tensor, threshold: float) -> int:
    """The last shell before ``curve`` first drops below ``threshold`` (0 if shell 0 does)."""
    below = torch.nonzero(curve < threshold).squeeze(1)
    if len(below) == 0:
        return len(curve) - 1
    return max(int(below[0]) - 1, 0)


def guinier_plot(spec: torch.Tensor, n: int, pixel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """RELION's ``makeGuinierPlot``: per shell ``i`` up to Nyquist, ``x = 1 / d^2`` (Å^-2) and
    ``y = ln`` (mean amplitude), ``-99`` where the shell is empty of amplitude."""
    nsh = n // 2 + 1
    mean = radial_average(spec.abs(), shell_index((n, n, n), device=spec.device), nsh)
    i = np.arange(nsh, dtype=np.float64)
    with np.errstate(divide="ignore"):
        res = np.where(i > 0, n * pixel_size / i, np.inf)
    x = np.where(np.isfinite(res), 1.0 / res**2, 0.0)
    a = mean.cpu().numpy()
    with np.errstate(divide="ignore"):
        y = np.where(a > 0, np.log(a), -99.0)
    return x, y


def fit_straight_line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float, float]:
    """RELION's ``fitStraightLine``: weighted least squares; (slope, intercept, r^2), zeros when
    the points do not spread in x."""
    sw = float(w.sum())
    if sw <= 0:
        return 0.0, 0.0, 0.0
    ax, ay = float((w * x).sum() / sw), float((w * y).sum() / sw)
    sxx = float((w * x * x).sum()) - sw * ax * ax
    syy = float((w * y * y).sum()) - sw * ay * ay
    sxy = float((w * x * y).sum()) - sw * ax * ay
    if sxx <= 0:
        return 0.0, 0.0, 0.0
    slope = sxy / sxx
    return slope, ay - slope * ax, (sxy * sxy / (sxx * syy) if syy > 0 else 0.0)


def _fsc_weighting(spec: torch.Tensor, fsc: torch.Tensor, n: int) -> torch.Tensor:
    """RELION's ``applyFscWeighting``: ``sqrt(2 FSC / (1 + FSC))`` up to the last shell before the
    FSC first drops below 1e-4, zero beyond (and where FSC <= 0)."""
    ires_max = _last_shell_above(fsc, 1e-4)
    sh = shell_index((n, n, n), device=spec.device)
    f = fsc[sh.clamp(max=len(fsc) - 1)]
    wgt = torch.where(f > 0, torch.sqrt((2 * f / (1 + f)).clamp(min=0)), torch.zeros_like(f))
    return spec * torch.where(sh <= ires_max, wgt, torch.zeros_like(wgt))


def _apply_bfactor(spec: torch.Tensor, n: int, pixel_size: float, bfactor: float) -> torch.Tensor:
    """RELION's ``applyBFactorToMap``: ``exp(-(B / 4) s^2)`` up to Nyquist, zero beyond."""
    kz, ky, kx = rfft_frequencies((n, n, n), device=spec.device, dtype=torch.float64)
    s = torch.sqrt(kz * kz + ky * ky + kx * kx) / (n * pixel_size)
    f = torch.exp(-(bfactor / 4.0) * s * s)
    return spec * torch.where(s <= 1.0 / (2.0 * pixel_size), f, torch.zeros_like(f))


def postprocess(
    half1: torch.Tensor,
    half2: torch.Tensor,
    pixel_size: float,
    mask: torch.Tensor | None = None,
    options: PostprocessOptions | None = None,
    *,
    mask_name: str = "mask",
) -> PostprocessResult:
    """Post-process two cubic half maps (optionally with a soft mask in [0, 1]; ``mask_name``
    names it in errors)."""
    o = options or PostprocessOptions()
    if half1.shape != half2.shape or half1.ndim != 3 or len(set(half1.shape)) != 1:
        raise TamisError(
            f"the half maps must be cubic and of one shape, got {tuple(half1.shape)} and "
            f"{tuple(half2.shape)}"
        )
    n = half1.shape[-1]
    h1, h2 = half1.to(torch.float64), half2.to(torch.float64)
    warnings: list[str] = []
    fsc_unmasked = shell_fsc(h1, h2)
    nsh = n // 2 + 1
    shells = np.arange(nsh)
    with np.errstate(divide="ignore"):
        res_a = np.where(shells > 0, n * pixel_size / np.maximum(shells, 1), 999.0)
    table = {
        "rlnSpectralIndex": shells,
        "rlnResolution": 1.0 / res_a,
        "rlnAngstromResolution": res_a,
    }
    randomize_from = math.nan
    mask_fraction = math.nan
    mask_ignored = False
    if mask is not None:
        m = check_mask(mask, tuple(h1.shape), mask_name, "the half maps are")
        mask_fraction = 0.476 / max(float((m > 0.5).double().mean()), 1e-12)
        if o.randomize_at_A > 0:
            randomize_at = int(pixel_size * n / o.randomize_at_A)
        else:
            below = torch.nonzero(fsc_unmasked[1:] < o.randomize_at_fsc).squeeze(1)
            if len(below) == 0:
                raise TamisError(
                    f"the unmasked FSC never drops below --randomize_at_fsc "
                    f"{o.randomize_at_fsc}: give --randomize_at_A"
                )
            randomize_at = int(below[0]) + 1
        if randomize_at <= 0:
            raise TamisError(f"--randomize_at_A {o.randomize_at_A}: beyond the box's lowest shell")
        randomize_from = n * pixel_size / randomize_at
        fsc_masked, fsc_random, fsc_true = masked_fscs(h1, h2, m, randomize_at, o.random_seed)
        unmasked_ = fsc_unmasked.clone()
        if unmasked_[0] <= 0:
            unmasked_[0] = 1.0
        part = mask_fraction * unmasked_ / (1.0 + (mask_fraction - 1.0) * unmasked_)
        res_i = _last_shell_above(fsc_true, 0.143)
        unmasked_i = _last_shell_above(unmasked_, 0.143)
        if unmasked_i > res_i and not o.force_mask:
            warnings.append(
                "the unmasked FSC extends beyond the solvent-corrected FSC: the mask is ignored "
                "(adjust the mask, or --force_mask)"
            )
            mask_ignored = True
            fsc_final = unmasked_
            res_i = unmasked_i
        else:
            if unmasked_i > res_i:
                warnings.append("the unmasked FSC extends beyond the solvent-corrected FSC")
            elif float(fsc_random[res_i]) > 0.1:
                warnings.append(
                    "the phase-randomised FSC is above 0.10 at the estimated resolution: a softer "
                    "mask would give a more reliable estimate"
                )
            fsc_final = fsc_true
        table.update(
            rlnFourierShellCorrelationCorrected=fsc_true.cpu().numpy(),
            rlnFourierShellCorrelationParticleMaskFraction=part.cpu().numpy(),
            rlnFourierShellCorrelationUnmaskedMaps=fsc_unmasked.cpu().numpy(),
            rlnFourierShellCorrelationMaskedMaps=fsc_masked.cpu().numpy(),
            rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps=fsc_random.cpu().numpy(),
        )
    else:
        fsc_final = fsc_unmasked.clone()
        if fsc_final[0] <= 0:
            fsc_final[0] = 1.0
        res_i = _last_shell_above(fsc_final, 0.143)
        table["rlnFourierShellCorrelationUnmaskedMaps"] = fsc_unmasked.cpu().numpy()
    resolution = n * pixel_size / res_i if res_i > 0 else math.inf

    # sharpening of the average map
    spec = _rfft((h1 + h2) / 2)
    gx, g_in = guinier_plot(spec, n, pixel_size)
    if not o.skip_fsc_weighting:
        spec = _fsc_weighting(spec, fsc_final, n)
    _, g_weighted = guinier_plot(spec, n, pixel_size)
    slope = intercept = r2 = 0.0
    bfactor = 0.0
    if o.auto_bfac:
        with np.errstate(divide="ignore"):
            res_g = np.where(gx > 0, 1.0 / np.sqrt(np.maximum(gx, 1e-300)), np.inf)
        w = ((g_weighted > -99.0) & (res_g <= o.autob_lowres) & (res_g >= o.autob_highres)).astype(
            np.float64
        )
        slope, intercept, r2 = fit_straight_line(gx, g_weighted, w)
        bfactor = 4.0 * slope
        if math.isfinite(resolution) and resolution > o.autob_lowres:
            # tamis: the fit would lie beyond the map's resolution, on noise (RELION fits it)
            warnings.append(
                f"the resolution ({resolution:.1f} A) is worse than --autob_lowres "
                f"{o.autob_lowres:g} A: no B-factor fitted (lower --autob_lowres or give "
                "--adhoc_bfac)"
            )
            bfactor = 0.0
        elif w.sum() < 2:
            warnings.append(
                f"fewer than two shells between {o.autob_lowres} A and the last weighted shell: "
                "no B-factor fitted"
            )
    elif o.adhoc_bfac != 0:
        bfactor = o.adhoc_bfac
    if bfactor != 0:
        spec = _apply_bfactor(spec, n, pixel_size, bfactor)
    _, g_sharp = guinier_plot(spec, n, pixel_size)
    sharpened = _irfft(spec, n)
    if o.low_pass != 0:
        lp = resolution if o.low_pass < 0 else o.low_pass
        if math.isfinite(lp):
            sharpened = low_pass_filter(sharpened, pixel_size, lp)
    guinier = {"rlnResolutionSquared": gx, "rlnLogAmplitudesOriginal": g_in}
    if not o.skip_fsc_weighting:
        guinier["rlnLogAmplitudesWeighted"] = g_weighted
    if o.auto_bfac or o.adhoc_bfac != 0:
        guinier["rlnLogAmplitudesSharpened"] = g_sharp
    if o.auto_bfac:
        guinier["rlnLogAmplitudesIntercept"] = intercept + slope * gx
    return PostprocessResult(
        resolution=resolution,
        bfactor=bfactor,
        fsc=pd.DataFrame(table),
        guinier=pd.DataFrame(guinier),
        sharpened=sharpened,
        randomize_from=randomize_from,
        mask_fraction=mask_fraction,
        slope=slope,
        intercept=intercept,
        fit_r2=r2,
        mask_ignored=mask_ignored,
        warnings=warnings,
    )


def other_half(path: str | Path) -> Path:
    """RELION's rule: the second half map's name swaps ``half1`` for ``half2``."""
    p = Path(path)
    if "half1" not in p.name:
        raise TamisError(f"{p}: the first half map's name must contain 'half1' (its mate 'half2')")
    return p.with_name(p.name.replace("half1", "half2"))


def run_postprocess(
    i: str | Path,
    o: str | Path,
    *,
    mask: str | Path | None = None,
    angpix: float | None = None,
    options: PostprocessOptions | None = None,
) -> PostprocessResult:
    """``relion_postprocess --i half1 --o root [--mask m]``: writes ``root.mrc``,
    ``root_masked.mrc`` (with a mask), ``root.star`` and ``root_fsc.png``."""
    from tamis.io.mrc import read_mrc, write_mrc
    from tamis.io.star import write_star

    i = Path(i)
    i2 = other_half(i)
    for p in (i, i2) + ((Path(mask),) if mask else ()):
        if not p.exists():
            raise TamisError(f"{p}: no such file")
    d1, p1 = read_mrc(i)
    d2, p2 = read_mrc(i2)
    if d1.shape != d2.shape:
        raise TamisError(f"{i2}: shape {d2.shape} differs from {i}'s {d1.shape}")
    pixel = angpix if angpix else p1
    if not pixel or pixel <= 0:
        raise TamisError(f"{i}: no pixel size in the header; give --angpix")
    if not angpix and p2 and abs(p2 - p1) > 1e-3 * p1:
        raise TamisError(f"{i2}: pixel size {p2:.4g} A differs from {i}'s {p1:.4g} A")
    m = None
    if mask:
        m = torch.from_numpy(np.asarray(read_mrc(mask)[0], dtype=np.float64))
    res = postprocess(
        torch.from_numpy(np.asarray(d1, dtype=np.float64)),
        torch.from_numpy(np.asarray(d2, dtype=np.float64)),
        pixel,
        m,
        options,
        mask_name=str(mask),
    )
    root = Path(o)
    root.parent.mkdir(parents=True, exist_ok=True)
    sharp = res.sharpened.cpu().numpy()
    write_mrc(f"{root}.mrc", sharp, pixel)
    general: dict[str, object] = {
        "rlnFinalResolution": res.resolution,
        "rlnBfactorUsedForSharpening": res.bfactor,
        "rlnUnfilteredMapHalf1": str(i),
        "rlnUnfilteredMapHalf2": str(i2),
        "rlnPostprocessedMap": f"{root}.mrc",
    }
    if m is not None:
        write_mrc(f"{root}_masked.mrc", sharp * m.numpy(), pixel)
        general.update(
            rlnParticleBoxFractionSolventMask=res.mask_fraction,
            rlnMaskName=str(mask),
            rlnRandomiseFrom=res.randomize_from,
            rlnPostprocessedMapMasked=f"{root}_masked.mrc",
        )
    if options is None or options.auto_bfac:
        general.update(
            rlnFittedSlopeGuinierPlot=res.slope,
            rlnFittedInterceptGuinierPlot=res.intercept,
            rlnCorrelationFitGuinierPlot=res.fit_r2,
        )
    write_star({"general": general, "fsc": res.fsc, "guinier": res.guinier}, f"{root}.star")
    plot_fsc(res, f"{root}_fsc.png")
    return res


def plot_fsc(res: PostprocessResult, path: str | Path) -> None:
    """The FSC curves against resolution (1/Å) as a PNG, in RELION's colours (corrected black,
    unmasked green, masked blue, phase-randomised red) with the 0.143 line."""
    from PIL import Image, ImageDraw

    from tamis.io.star import atomic_path

    w, h, m = 640, 400, 52
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    x = res.fsc["rlnResolution"].to_numpy(float)
    x_max = float(x[-1]) if len(x) else 1.0
    y0, y1 = -0.2, 1.05

    def px(xv: float, yv: float) -> tuple[float, float]:
        return (
            m + xv / x_max * (w - 1.5 * m),
            h - m - (min(max(yv, y0), y1) - y0) / (y1 - y0) * (h - 1.5 * m),
        )

    d.rectangle([m, m // 2, w - m // 2, h - m], outline="black")
    for yv in (0.0, 0.143, 0.5, 1.0):
        a, b = px(0, yv), px(x_max, yv)
        d.line([a, b], fill=(200, 200, 200) if yv != 0.143 else (150, 150, 150), width=1)
        d.text((4, a[1] - 6), f"{yv:g}", fill="black")
    for k in range(1, 5):
        xv = x_max * k / 4
        a = px(xv, y0)
        d.text((a[0] - 14, h - m + 6), f"1/{1 / xv:.3g}", fill="black")
    curves = (
        ("rlnFourierShellCorrelationUnmaskedMaps", (44, 160, 44)),
        ("rlnFourierShellCorrelationMaskedMaps", (31, 119, 180)),
        ("rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps", (214, 39, 40)),
        ("rlnFourierShellCorrelationCorrected", (0, 0, 0)),
    )
    for col, color in curves:
        if col in res.fsc:
            pts = [px(a, b) for a, b in zip(x, res.fsc[col].to_numpy(float), strict=True)]
            d.line(pts, fill=color, width=3 if color == (0, 0, 0) else 2)
    d.text(
        (m, 4),
        f"FSC: resolution {res.resolution:.2f} A at 0.143; B-factor {res.bfactor:.0f} A^2 "
        "(black corrected, green unmasked, blue masked, red phase-randomised)",
        fill="black",
    )
    d.text((w // 2 - 40, h - m + 24), "resolution (1/A)", fill="black")
    with atomic_path(Path(path)) as tmp:
        im.save(tmp, format="PNG")
