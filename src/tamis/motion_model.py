"""A moving, radiation-damaged specimen, as motion correction models it: MotionCor2's
third-order polynomial deformation (RELION's ``ThirdOrderPolynomialModel``: 18 coefficients per
axis, no constant term), the per-pixel shift field it implies, bilinear resampling by a shift
field, and Grant & Grigorieff's critical exposure. Used by motion correction and by the movie
simulator alike.

Conventions: coordinates ``x = px / width - 0.5``, ``y = py / height - 0.5``; time ``z`` in
frames from the first frame used; a shift ``(sx, sy)`` resamples ``out(x) = in(x - s)``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "polynomial_basis",
    "fit_polynomial",
    "evaluate_polynomial",
    "shift_field",
    "resample",
    "resample_polynomial",
    "critical_exposure",
]


def polynomial_basis(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The 18 basis functions of RELION's ``ThirdOrderPolynomialModel`` (``(m, 18)``, in its
    order: z, z², z³, x·(z, z², z³), x²·(…), y·(…), y²·(…), xy·(…)); ``x``, ``y`` normalised
    (``px / width - 0.5``), ``z`` in frames."""
    x, y, z = (np.asarray(v, dtype=np.float64) for v in (x, y, z))
    zs = np.stack([z, z**2, z**3], -1)
    spatial = [np.ones_like(x), x, x**2, y, y**2, x * y]
    return np.concatenate([s[..., None] * zs for s in spatial], -1)


def fit_polynomial(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, shifts: np.ndarray, *, robust_iter: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients ``(2, 18)`` (x then y) of the deformation model for observed
    local shifts ``(m, 2)`` at normalised ``x``, ``y`` and time ``z``; and the RMS residual per
    axis ``(2,)``. Singular values below 1e-10 are dropped, as in RELION's SVD solve. With
    ``robust_iter`` > 0, that many reweighted fits follow with Huber weights (1.345 robust
    sigmas) on the length of each observation's residual, so a patch that locked onto noise
    pulls the model less (RELION fits plain least squares)."""
    a = polynomial_basis(x, y, z)
    s = np.asarray(shifts, dtype=np.float64)
    coeffs = np.linalg.lstsq(a, s, rcond=1e-10)[0].T
    for _ in range(robust_iter):  # Huber weights on each observation's residual length
        r = np.hypot(*(a @ coeffs.T - s).T)
        scale = 1.4826 * np.median(r) + 1e-9
        w = np.sqrt(np.minimum(1.0, 1.345 * scale / np.maximum(r, 1e-12)))
        coeffs = np.linalg.lstsq(a * w[:, None], s * w[:, None], rcond=1e-10)[0].T
    resid = a @ coeffs.T - s
    return coeffs, np.sqrt((resid**2).mean(0))


def evaluate_polynomial(
    coeffs: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> np.ndarray:
    """The model's shifts ``(..., 2)`` at normalised ``x``, ``y`` and time ``z``."""
    return polynomial_basis(x, y, z) @ np.asarray(coeffs, dtype=np.float64).T


def shift_field(
    coeffs: torch.Tensor, image_shape: tuple[int, int], z: torch.Tensor
) -> torch.Tensor:
    """The model's shifts on every pixel of ``image_shape`` for frames at times ``z`` (``(F,)``):
    ``(F, h, w, 2)`` float32 in the pixels the coefficients are in."""
    h, w = image_shape
    dev = coeffs.device
    y = (torch.arange(h, device=dev, dtype=torch.float64) / h - 0.5)[:, None]
    x = (torch.arange(w, device=dev, dtype=torch.float64) / w - 0.5)[None, :]
    spatial = torch.stack(
        torch.broadcast_tensors(
            torch.ones_like(x * y), x + 0 * y, x**2 + 0 * y, y + 0 * x, y**2 + 0 * x, x * y
        )  # fmt: skip
    ).float()  # (6, h, w)
    c = coeffs.double().reshape(2, 6, 3)  # axis, spatial term, power of z
    zz = torch.stack([z, z**2, z**3], -1).double()  # (F, 3)
    per_frame = torch.einsum("asp,fp->fas", c, zz).float()  # (F, 2, 6)
    return torch.einsum("fas,shw->fhwa", per_frame, spatial)


def resample(frames: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``out(ix, iy) = frame(ix - sx, iy - sy)`` by bilinear interpolation, edges clamped
    (RELION's ``realSpaceInterpolation_ThirdOrderPolynomial``). ``frames (F, h, w)``,
    ``shifts (F, h, w, 2)`` (x, y) in pixels."""
    f, h, w = frames.shape
    gy, gx = torch.meshgrid(
        torch.arange(h, device=frames.device, dtype=torch.float32),
        torch.arange(w, device=frames.device, dtype=torch.float32),
        indexing="ij",
    )
    grid = torch.empty((f, h, w, 2), device=frames.device, dtype=torch.float32)
    grid[..., 0] = (gx - shifts[..., 0]) * (2.0 / max(w - 1, 1)) - 1.0
    grid[..., 1] = (gy - shifts[..., 1]) * (2.0 / max(h - 1, 1)) - 1.0
    out = torch.nn.functional.grid_sample(
        frames[:, None], grid, mode="bilinear", padding_mode="border", align_corners=True
    )
    return out[:, 0]


def resample_polynomial(
    frames: torch.Tensor, coeffs: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """``resample(frames, shift_field(coeffs, frames.shape[-2:], z))`` without the per-pixel
    field: the model is a row term (1, x, x²), a column term (y, y²) and an outer product (xy)
    per frame, so the sampling grid is two broadcast sums and one scaled outer product.
    ``frames (F, h, w)`` or ``(F, C, h, w)`` (C images per frame share its grid), ``coeffs
    (2, 18)`` in pixels of these frames, ``z (F,)``."""
    channels = frames.ndim == 4
    if not channels:
        frames = frames[:, None]
    f, _, h, w = frames.shape
    dev = frames.device
    x = torch.arange(w, device=dev, dtype=torch.float64) / w - 0.5
    y = torch.arange(h, device=dev, dtype=torch.float64) / h - 0.5
    c = coeffs.to(dev, torch.float64).reshape(2, 6, 3)
    zz = torch.stack([z, z**2, z**3], -1).to(dev, torch.float64)  # (F, 3)
    per = torch.einsum("asp,fp->fas", c, zz)  # (F, axis, term): 1, x, x², y, y², xy
    scale = (2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1))
    ix = torch.arange(w, device=dev, dtype=torch.float64)
    iy = torch.arange(h, device=dev, dtype=torch.float64)
    xy = torch.outer(y, x).float()
    grid = torch.empty((f, h, w, 2), device=dev, dtype=torch.float32)
    for i in range(f):
        for a, (own, along_x) in enumerate(((ix, True), (iy, False))):
            p = per[i, a]
            row = -(p[0] + p[1] * x + p[2] * x**2)  # depends on x only
            col = -(p[3] * y + p[4] * y**2)  # depends on y only
            if along_x:
                row = (row + own) * scale[0] - 1.0
                col = col * scale[0]
            else:
                row = row * scale[1]
                col = (col + own) * scale[1] - 1.0
            g = grid[i, ..., a]
            torch.add(col.float()[:, None], row.float()[None, :], out=g)
            g.add_(xy, alpha=float(-p[5] * scale[a]))
    out = torch.nn.functional.grid_sample(
        frames, grid, mode="bilinear", padding_mode="border", align_corners=True
    )
    return out if channels else out[:, 0]


def critical_exposure(k: torch.Tensor) -> torch.Tensor:
    """Grant & Grigorieff's critical exposure ``0.245 k^-1.665 + 2.81`` (e/Å²) at spatial
    frequency ``k`` (1/Å); infinite at ``k = 0``."""
    return torch.where(k > 0, 0.245 * k.clamp(min=1e-30) ** -1.665 + 2.81, torch.inf)
