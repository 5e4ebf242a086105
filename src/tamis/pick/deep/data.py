"""Training data for the deep picker: micrographs binned to the network's pixel, with target
maps (discs at labelled centres), and patch sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tamis.pick.deep.network import DIAMETER_PX
from tamis.pick.micrograph import Micrograph, fourier_bin, normalise

__all__ = ["PreparedMicrograph", "prepare", "target_map", "TARGET_RADIUS"]

#: Radius of the positive disc around a labelled centre, in network pixels (a quarter diameter).
TARGET_RADIUS = 0.25 * DIAMETER_PX


@dataclass
class PreparedMicrograph:
    image: torch.Tensor  # (h, w) normalised, binned to the network pixel
    scale: tuple[float, float]  # (sy, sx): network pixels per micrograph pixel
    pixel: float  # Å per network pixel


def prepare(
    mic: Micrograph, diameter: float, *, lowpass: float | None = None, normalize: bool = True
) -> PreparedMicrograph:
    """Bin ``mic`` so ``diameter`` (Å) spans :data:`DIAMETER_PX` pixels, optionally low-pass it
    at ``lowpass`` Å, and normalise it (mean 0, sd 1; particles dark as recorded)."""
    p = mic.pixel_size
    target = diameter / DIAMETER_PX
    img = mic.image.to(torch.float32)
    img, (sy, sx) = fourier_bin(img, max(1.0, target / p))
    pw = p / ((sy + sx) / 2)
    if lowpass and lowpass > 2 * pw:
        h, w = img.shape
        fy = torch.fft.fftfreq(h, d=pw)[:, None]
        fx = torch.fft.rfftfreq(w, d=pw)[None, :]
        f2 = fx * fx + fy * fy
        filt = torch.exp(-f2 * lowpass * lowpass / 2.0)  # Gaussian, 1/e^0.5 at 1/lowpass
        img = torch.fft.irfft2(torch.fft.rfft2(img) * filt, s=(h, w))
    if normalize:
        img = normalise(img)
    return PreparedMicrograph(img.contiguous(), (sy, sx), pw)


def target_map(shape: tuple[int, int], x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """1 within :data:`TARGET_RADIUS` network pixels of any centre ``(x, y)`` (network pixels)."""
    h, w = shape
    out = torch.zeros((h, w))
    r = TARGET_RADIUS
    ri = int(np.ceil(r))
    for cx, cy in zip(x, y, strict=True):
        c0, r0 = int(round(cx)), int(round(cy))
        ys = slice(max(r0 - ri, 0), min(r0 + ri + 1, h))
        xs = slice(max(c0 - ri, 0), min(c0 + ri + 1, w))
        yy, xx = torch.meshgrid(
            torch.arange(ys.start, ys.stop, dtype=torch.float32),
            torch.arange(xs.start, xs.stop, dtype=torch.float32),
            indexing="ij",
        )
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        out[ys, xs] = torch.maximum(out[ys, xs], disc.float())
    return out
