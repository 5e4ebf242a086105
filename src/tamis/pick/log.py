"""RELION's Laplacian-of-Gaussian picker (``relion_autopick --LoG``).

The micrograph is normalised (outliers beyond 8 sd set to the mean), inverted unless particles are
white (``invert``), Fourier-binned to a pixel of ``lowpass / 2`` Å (RELION's GUI passes
``--lowpass 20 --shrink 0``) and filtered with scale-normalised LoG kernels for diameters
``min/5 ... min/2, min, (min+max)/2, max, 2 max ... 5 max``; in Fourier space the kernel is
``(2 d f)² exp(-(2 d f)² / 2)`` (``d`` the diameter in Å, ``f`` the frequency in 1/Å), RELION's
``r² exp(-r²/2s²)/s²``. Each pixel keeps its best response and diameter; pixels whose best
diameter lies outside [min, max] get 0, the threshold is ``mean + adjust x sd`` of the others,
and picks are taken greedily, each removing a disc of radius ``(its diameter + min) x neighbour / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tamis.errors import TamisError
from tamis.pick.micrograph import Micrograph, working_image
from tamis.pick.peaks import Picks, find_peaks

__all__ = ["LogOptions", "log_diameters", "log_fom", "pick_log"]


@dataclass
class LogOptions:
    """RELION's LoG options (``--LoG_diam_min`` ... in Å)."""

    diameter_min: float
    diameter_max: float
    adjust_threshold: float = 0.0  # --LoG_adjust_threshold: + fewer, - more
    upper_threshold: float = 99999.0  # --LoG_upper_threshold (in sd above the mean)
    invert: bool = False  # --Log_invert: particles are white
    neighbour: float = 1.0  # --LoG_neighbour / 100
    lowpass: float = 20.0  # Å: working pixel lowpass / 2
    max_search: int = 5
    edge: float | None = None  # Å excluded at the sides; default half the minimum diameter

    def check(self) -> None:
        if not 0 < self.diameter_min <= self.diameter_max:
            raise TamisError(
                f"LoG diameters: need 0 < min <= max (got {self.diameter_min}, {self.diameter_max})"
            )


def log_diameters(dmin: float, dmax: float, max_search: int = 5) -> list[float]:
    """The diameters RELION filters with (rounded as RELION rounds them)."""
    ds = [float(np.floor(dmin / i + 0.5)) for i in range(max_search, 1, -1)]
    ds += [dmin, (dmin + dmax) / 2.0, dmax]
    ds += [float(np.floor(dmax * i + 0.5)) for i in range(2, max_search + 1)]
    return ds


def log_fom(
    image: torch.Tensor, pixel_size: float, diameters: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best LoG response and its diameter per pixel of ``image`` (already prepared). The image
    is mirrored at its sides by the widest filter's reach before the FFT filters, so a bright
    border does not wrap round onto the opposite side (where it would be picked)."""
    h0, w0 = image.shape
    pad = min(h0 - 1, w0 - 1, int(np.ceil(max(diameters) / pixel_size)))
    image = torch.nn.functional.pad(image.to(torch.float32)[None, None], (pad,) * 4,
                                    mode="reflect")[0, 0]  # fmt: skip
    h, w = image.shape
    spec = torch.fft.rfft2(image, norm="forward")
    fy = torch.fft.fftfreq(h, d=pixel_size, device=image.device)[:, None]
    fx = torch.fft.rfftfreq(w, d=pixel_size, device=image.device)[None, :]
    f2 = fx * fx + fy * fy
    best = torch.full((h, w), -torch.inf, device=image.device)
    size = torch.zeros((h, w), device=image.device)
    for d in diameters:
        x2 = 4.0 * d * d * f2
        resp = torch.fft.irfft2(spec * (x2 * torch.exp(-0.5 * x2)), s=(h, w), norm="forward")
        better = resp > best
        best = torch.where(better, resp, best)
        size = torch.where(better, torch.full_like(size, d), size)
    return best[pad : pad + h0, pad : pad + w0], size[pad : pad + h0, pad : pad + w0]


def pick_log(mic: Micrograph, options: LogOptions) -> Picks:
    """LoG picks on one micrograph (coordinates in its pixels, FOM, detected diameter)."""
    options.check()
    small, (sy, sx), pw = working_image(mic, options.lowpass, options.invert)
    best, size = log_fom(
        small, pw, log_diameters(options.diameter_min, options.diameter_max, options.max_search)
    )
    ok = (size >= options.diameter_min) & (size <= options.diameter_max)
    vals = best[ok]
    if vals.numel() < 2:
        return Picks.empty()
    mean, sd = float(vals.mean()), float(vals.std())
    threshold = mean + options.adjust_threshold * sd
    upper = mean + options.upper_threshold * sd
    fom = torch.where(ok, best, torch.zeros_like(best))
    edge_a = options.edge if options.edge is not None else 0.5 * options.diameter_min
    edge = int(edge_a / pw)
    radius = (size + options.diameter_min) * options.neighbour / 2.0 / pw
    rows, cols, vals = find_peaks(
        fom, radius, threshold=max(threshold, 0.0), upper=upper, edge=edge
    )
    diam = size[torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)]
    return Picks(
        cols / sx, rows / sy, vals.astype(np.float64), diam.cpu().numpy().astype(np.float64)
    )
