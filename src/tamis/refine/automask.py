"""A soft mask from a map (``relion_mask_create``'s role, ``src/mask.cpp: autoMask``).

Steps, as RELION: an optional low-pass (RELION's raised cosine over two shells), a binary mask of the
voxels at or above the threshold, a single-step extension (a voxel joins when a voxel of the
*original* binary mask lies closer than ``extend`` pixels; a negative value shrinks instead), then a
soft edge: a voxel outside at distance ``d < width`` from the nearest mask voxel gets
``0.5 + 0.5 cos(pi d / width)``. Distances are Euclidean between voxel centres and only voxels inside
the box count, as RELION's neighbourhood loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from tamis.class2d.init import low_pass
from tamis.errors import TamisError

__all__ = ["MaskOptions", "create_mask", "low_pass_filter", "create_mask_file"]


#: ``--ini_threshold`` <= 0 (tamis): the threshold is this fraction of the low-passed maximum.
AUTO_THRESHOLD_FRACTION = 0.2


@dataclass(frozen=True)
class MaskOptions:
    """``relion_mask_create``'s options, with the GUI's defaults (the program's own are no
    low-pass, threshold 0.01, no extension, no edge)."""

    lowpass: float = 15.0  # Å; 0 for none
    ini_threshold: float = 0.02  # <= 0: AUTO_THRESHOLD_FRACTION of the low-passed maximum
    extend_inimask: float = 3.0  # px; negative shrinks
    width_soft_edge: float = 3.0  # px
    invert: bool = False


def low_pass_filter(volume: torch.Tensor, pixel_size: float, resolution: float) -> torch.Tensor:
    """RELION's ``lowPassFilterMap`` (edge width 2): the raised cosine of
    :func:`tamis.class2d.init.low_pass` around shell ``ROUND(N p / resolution)``, for images or
    volumes (square/cubic)."""
    n = volume.shape[-1]
    return low_pass(volume, round(n * pixel_size / resolution), ndim=volume.ndim)


def _extend(binary: np.ndarray, extend: float) -> np.ndarray:
    if extend > 0:
        # distance of each voxel outside to the nearest voxel inside
        d = ndimage.distance_transform_edt(~binary)
        return binary | (d < extend)
    d = ndimage.distance_transform_edt(binary)  # inside: distance to the nearest outside voxel
    return binary & ~(d < -extend)


def create_mask(volume: torch.Tensor, pixel_size: float, options: MaskOptions) -> torch.Tensor:
    """The soft mask (float64, values in [0, 1]) of ``volume`` (``(n, n, n)``, or an image)."""
    v = volume.to(torch.float64)
    if options.lowpass > 0:
        v = low_pass_filter(v, pixel_size, options.lowpass)
    threshold = options.ini_threshold
    if threshold <= 0:
        # tamis: the threshold follows the map (unattended schemes, where no one picks it):
        # a fifth of the low-passed map's maximum (cryoSPARC's dynamic-mask default)
        threshold = AUTO_THRESHOLD_FRACTION * float(v.max())
    binary = (v >= threshold).cpu().numpy()
    if not binary.any():
        raise TamisError(
            f"no voxel at or above --ini_threshold {threshold:.4g} "
            f"(map range {float(v.min()):.4g} .. {float(v.max()):.4g}): lower the threshold"
        )
    if options.extend_inimask != 0:
        binary = _extend(binary, options.extend_inimask)
    mask = binary.astype(np.float64)
    w = options.width_soft_edge
    if w > 0:
        d = ndimage.distance_transform_edt(~binary)
        edge = (~binary) & (d < w)
        mask[edge] = 0.5 + 0.5 * np.cos(math.pi * d[edge] / w)
    if options.invert:
        mask = 1.0 - mask
    return torch.from_numpy(mask).to(volume.device)


def create_mask_file(
    i: str | Path, o: str | Path, options: MaskOptions, *, angpix: float | None = None
) -> tuple[torch.Tensor, float]:
    """Read a map, write its mask (with the map's pixel size, or ``angpix``); returns the mask
    and the fraction of the box it covers (voxels > 0.5)."""
    from tamis.io.mrc import read_mrc, write_mrc

    data, header_pixel = read_mrc(i)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise TamisError(f"{i}: a cubic 3D map is needed, got shape {data.shape}")
    pixel = angpix if angpix else header_pixel
    if not pixel or pixel <= 0:
        raise TamisError(f"{i}: no pixel size in the header; give --angpix")
    mask = create_mask(torch.from_numpy(np.asarray(data, dtype=np.float64)), pixel, options)
    write_mrc(o, mask.cpu().numpy(), pixel)
    return mask, float((mask > 0.5).double().mean())
