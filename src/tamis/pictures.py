"""Arrays as 8-bit pictures for people: one contrast rule (clip at percentiles, scale to 0-255)
shared by the pick overlays, the class gallery, the demo summary and the web monitor."""

from __future__ import annotations

import numpy as np

__all__ = ["to_uint8", "central_slices"]


def to_uint8(a: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.0) -> np.ndarray:
    """``a`` clipped to its ``lo_pct``/``hi_pct`` percentiles and scaled to 0-255 (uint8)."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = np.percentile(a, [lo_pct, hi_pct])
    return (np.clip((a - lo) / max(hi - lo, 1e-12), 0.0, 1.0) * 255).astype(np.uint8)


def central_slices(vol: np.ndarray, hi_pct: float = 99.9) -> np.ndarray:
    """A map's three central slices (z, y, x) side by side, each scaled to its own range."""
    n = vol.shape[-1]
    parts = (vol[n // 2], vol[:, n // 2], vol[:, :, n // 2])
    return np.concatenate([to_uint8(p, 1.0, hi_pct) for p in parts], axis=1)
