"""Figure-of-merit maps -> picks: local maxima, greedy non-maximum suppression, thresholds.

The suppression is RELION's: take the highest remaining peak, remove everything within a disc
around it, repeat. Candidates are the local maxima of the map (3 x 3), so a pick never lands on
the rim of a removed disc (RELION's pixel-wise search can). Distances are given in pixels of the
map; callers convert from Å.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

__all__ = ["Picks", "find_peaks", "local_maxima"]


@dataclass
class Picks:
    """Picked positions in micrograph pixels (RELION's convention), best first."""

    x: np.ndarray
    y: np.ndarray
    fom: np.ndarray
    diameter: np.ndarray | None = None  # Å, where the picker estimates it (LoG)

    def __len__(self) -> int:
        return len(self.x)

    def top(self, n: int) -> Picks:
        return Picks(
            self.x[:n],
            self.y[:n],
            self.fom[:n],
            None if self.diameter is None else self.diameter[:n],
        )

    def above(self, threshold: float) -> Picks:
        keep = self.fom >= threshold
        return Picks(
            self.x[keep],
            self.y[keep],
            self.fom[keep],
            None if self.diameter is None else self.diameter[keep],
        )

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"x": self.x, "y": self.y, "fom": self.fom})

    @classmethod
    def empty(cls) -> Picks:
        z = np.zeros(0)
        return cls(z, z.copy(), z.copy())


def local_maxima(fom: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns and values of the 3 x 3 local maxima above ``threshold``, highest first."""
    pooled = F.max_pool2d(fom[None, None], 3, stride=1, padding=1)[0, 0]
    mask = (fom >= pooled) & (fom > threshold)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    vals = fom[rows, cols]
    order = torch.argsort(vals, descending=True)
    return rows[order].cpu().numpy(), cols[order].cpu().numpy(), vals[order].cpu().numpy()


def find_peaks(
    fom: torch.Tensor,
    radius: float | np.ndarray | torch.Tensor,
    *,
    threshold: float = -np.inf,
    upper: float = np.inf,
    max_peaks: int | None = None,
    edge: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy non-maximum suppression on ``fom`` ``(h, w)``.

    ``radius`` (map pixels) is the suppression radius around an accepted peak: a number, or a map
    (``(h, w)``) giving it per peak (RELION's LoG uses the detected size). Peaks closer than
    ``edge`` pixels to a side are dropped; peaks at or above ``upper`` are not returned but still
    suppress their neighbours (RELION's upper threshold). Returns rows, columns and values, best
    first, at most ``max_peaks``.
    """
    h, w = fom.shape
    fom = fom.clone()
    if edge > 0:
        fom[:edge] = -np.inf
        fom[-edge:] = -np.inf
        fom[:, :edge] = -np.inf
        fom[:, -edge:] = -np.inf
    rows, cols, vals = local_maxima(fom, threshold)
    rmap = None
    if isinstance(radius, (np.ndarray, torch.Tensor)):
        rmap = torch.as_tensor(radius).cpu().numpy()
    blocked = np.zeros((h, w), dtype=bool)
    keep: list[int] = []
    n_out = 0
    for i in range(len(rows)):
        r, c = int(rows[i]), int(cols[i])
        if blocked[r, c]:
            continue
        rad = float(rmap[r, c]) if rmap is not None else float(radius)
        ri = int(np.ceil(rad))
        r0, r1, c0, c1 = max(r - ri, 0), min(r + ri + 1, h), max(c - ri, 0), min(c + ri + 1, w)
        yy, xx = np.ogrid[r0 - r : r1 - r, c0 - c : c1 - c]
        blocked[r0:r1, c0:c1] |= yy * yy + xx * xx < rad * rad
        blocked[r, c] = True
        if vals[i] >= upper:
            continue
        keep.append(i)
        n_out += 1
        if max_peaks is not None and n_out >= max_peaks:
            break
    idx = np.asarray(keep, dtype=np.int64)
    return rows[idx], cols[idx], vals[idx]
