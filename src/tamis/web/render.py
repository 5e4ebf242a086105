"""Pictures for the monitor: class-average thumbnails, binned micrographs with picks (the pick
jobs' overlay), a map's central slices, the CTF fit (PNG bytes), and small line plots (SVG
text). PNGs are cached in memory by file
and modification time, so a page of 200 classes or a list of 10,000 micrographs is drawn once.
"""

from __future__ import annotations

import html
import io
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from threading import Lock

import numpy as np
from PIL import Image

from tamis.io.images import read_micrograph
from tamis.io.mrc import open_stack, read_mrc
from tamis.pick.overlay import overlay_image
from tamis.pictures import central_slices, to_uint8

__all__ = ["PngCache", "class_png", "ctf_png", "micrograph_png", "slices_png", "line_plot_svg"]


class PngCache:
    """An LRU of rendered PNGs keyed by (what, file, its mtime)."""

    def __init__(self, size: int = 2048) -> None:
        self.size, self._items, self._lock = size, OrderedDict(), Lock()

    def get(self, key: tuple, path: Path, make: Callable[[], bytes]) -> bytes:
        full = (*key, str(path), path.stat().st_mtime_ns)
        with self._lock:
            if full in self._items:
                self._items.move_to_end(full)
                return self._items[full]
        png = make()
        with self._lock:
            self._items[full] = png
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return png


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def class_png(stack: Path, number: int, size: int = 128) -> bytes:
    """Class ``number`` (1-based) of an MRC stack as a ``size`` px greyscale PNG."""
    with open_stack(stack) as st:
        img = st.read([number - 1])[0]
    return _png_bytes(Image.fromarray(to_uint8(img, 1, 99.5)).resize((size, size), Image.BILINEAR))


def micrograph_png(path: Path, picks: np.ndarray, diameter_px: float, size: int = 768) -> bytes:
    """A micrograph binned to at most ``size`` px and low-passed, its picks circled (the pick
    jobs' overlay picture)."""
    mic = read_micrograph(path)
    xy = np.asarray(picks, float).reshape(-1, 2)
    return _png_bytes(overlay_image(mic.image, xy[:, 0], xy[:, 1], diameter_px, max_side=size))


def slices_png(path: Path, scale: int = 3) -> bytes:
    """A map's three central slices side by side, each to its own range."""
    vol, _ = read_mrc(path)
    im = Image.fromarray(central_slices(vol))
    return _png_bytes(im.resize((im.width * scale, im.height * scale), Image.NEAREST))


def ctf_png(spectrum: Path, fit: dict, size: int = 384) -> bytes:
    """CTFFIND's diagnostic picture: the micrograph's amplitude spectrum on the left half, the
    fitted CTF's ``|CTF|`` on the right, so the Thon rings can be compared across the middle."""
    import torch

    from tamis.ctf import compute_ctf

    ps, _ = read_mrc(spectrum)
    ps = ps.reshape(ps.shape[-2], ps.shape[-1]).astype(np.float64)
    n = ps.shape[-1]
    model = compute_ctf(
        (n, n), pixel_size=fit["pixel_size"], defocus_u=fit["defocus_u"],
        defocus_v=fit["defocus_v"], defocus_angle=fit["defocus_angle"], voltage=fit["voltage"],
        spherical_aberration=fit["cs"], amplitude_contrast=fit["q0"], rfft=False,
        dtype=torch.float64,
    )  # fmt: skip
    model = np.fft.fftshift(np.abs(model.numpy()))
    res = fit.get("max_resolution", float("nan"))
    if np.isfinite(res) and res > 0:  # the model only where the fit saw rings
        yy, xx = np.mgrid[:n, :n] - n // 2
        model[np.hypot(yy, xx) > n * fit["pixel_size"] / res] = 0.5
    left = to_uint8(ps, 1, 99.5)
    right = (np.clip(model, 0.0, 1.0) * 255).astype(np.uint8)  # |CTF| is already in [0, 1]
    img = np.concatenate([left[:, : n // 2], right[:, n // 2 :]], axis=1)
    return _png_bytes(Image.fromarray(img).resize((size, size), Image.BILINEAR))


_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def line_plot_svg(
    x: np.ndarray,
    series: dict[str, np.ndarray],
    *,
    title: str,
    xlabel: str,
    hlines: dict[str, float] | None = None,
    width: int = 520,
    height: int = 220,
) -> str:
    """A small SVG line plot (no scripts); NaN points are skipped; ``hlines`` are dashed
    reference lines (thresholds)."""
    x = np.asarray(x, float)
    pad_l, pad_t, pad_b = 48, 24, 32
    pad_r = 12 if len(series) <= 1 else 78  # several series: the legend beside the plot
    ys = [np.asarray(v, float) for v in series.values()] + [
        np.asarray([v]) for v in (hlines or {}).values()
    ]
    finite = np.concatenate([y[np.isfinite(y)] for y in ys]) if ys else np.zeros(0)
    y0, y1 = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 1, y1 + 1
    x0, x1 = (float(np.nanmin(x)), float(np.nanmax(x))) if x.size else (0.0, 1.0)
    if x1 - x0 < 1e-12:
        x1 = x0 + 1

    def px(a: float) -> float:
        return pad_l + (a - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def py(a: float) -> float:
        return height - pad_b - (a - y0) / (y1 - y0) * (height - pad_t - pad_b)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{pad_l}" y="16" font-size="13">{html.escape(title)}</text>',
        f'<rect x="{pad_l}" y="{pad_t}" width="{width - pad_l - pad_r}" '
        f'height="{height - pad_t - pad_b}" fill="none" stroke="#999"/>',
        f'<text x="{pad_l - 4}" y="{py(y1) + 4:.1f}" font-size="10" text-anchor="end">{y1:.3g}</text>',
        f'<text x="{pad_l - 4}" y="{py(y0):.1f}" font-size="10" text-anchor="end">{y0:.3g}</text>',
        f'<text x="{pad_l}" y="{height - 18}" font-size="10">{x0:.3g}</text>',
        f'<text x="{width - pad_r}" y="{height - 18}" font-size="10" text-anchor="end">{x1:.3g}</text>',
        f'<text x="{(width + pad_l) / 2:.0f}" y="{height - 4}" font-size="11" '
        f'text-anchor="middle">{html.escape(xlabel)}</text>',
    ]
    for i, (name, y) in enumerate(series.items()):
        c = _COLOURS[i % len(_COLOURS)]
        y = np.asarray(y, float)
        pts = " ".join(
            f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, y, strict=False) if np.isfinite(b)
        )
        if pts:
            parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>')
        if np.isfinite(y).sum() <= 60:  # few points: mark them
            parts.extend(
                f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.5" fill="{c}"/>'
                for a, b in zip(x, y, strict=False)
                if np.isfinite(b)
            )
        lx, anchor = (width - 2, "end") if len(series) > 1 else (width - pad_r - 4, "end")
        parts.append(
            f'<text x="{lx}" y="{pad_t + 14 + 13 * i}" font-size="11" fill="{c}" '
            f'text-anchor="{anchor}">{html.escape(name)}</text>'
        )
    for name, v in (hlines or {}).items():
        parts.append(
            f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
            f'stroke="#666" stroke-dasharray="4 3"/><text x="{pad_l + 4}" y="{py(v) - 3:.1f}" '
            f'font-size="10" fill="#666">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
