"""Initial noise spectra and references for a fresh 2D run (RELION's ``initialise`` without ``--ref``).

1. From the first ``nr_parts_sigma2noise`` particles of every optics group (micrograph order):
   sigma2 = mean particle power / 2 - power of the average image / 2, per shell.
2. Initial references: CTF-weighted averages of those particles at random psi, class
   ``position mod K``, limited to ``ROUND(0.07 N) / 2`` Fourier radius; low-passed at shell
   ``ROUND(0.07 N)``; replaced by a pattern of Gaussian blobs (40 positive, 40 negative at half
   weight, sigma ``d / (10 sqrt 2)``, centres ``N(N/2, d/7)``) whose amplitudes are read from the
   average and whose std matches it; low-passed again; soft-masked to the mean background.

RELION draws psi and blob positions with C ``rand()``; tamis uses a seeded numpy generator, so runs
are reproducible but not bitwise equal to RELION's.
"""

from __future__ import annotations

import numpy as np
import torch

from tamis.class2d.fourier2d import FourierWindow, reconstruct, relion_round
from tamis.class2d.mstep import fill_low_shells
from tamis.class2d.space import InPlaneSpace, ReferenceSpace, back
from tamis.fourier import (
    irfft2_centered,
    irfft3_centered,
    radial_average,
    rfft2_centered,
    rfft3_centered,
    rfft_frequencies,
    shell_index,
)
from tamis.masks import soft_mask_outside

__all__ = [
    "initial_sigma2_and_references",
    "low_pass",
    "gaussian_blobs",
    "gaussian_blobs_3d",
    "random_psi",
]


def low_pass(images: torch.Tensor, shell: float, ndim: int = 2) -> torch.Tensor:
    """Raised-cosine low-pass: 1 below ``shell - 1``, 0 above ``shell + 1`` (Fourier pixels), of
    images ``(..., N, N)`` (volumes ``(..., N, N, N)`` with ``ndim=3``)."""
    n = images.shape[-1]
    freqs = rfft_frequencies((n,) * ndim, device=images.device, dtype=torch.float64)
    r = torch.sqrt(sum(k * k for k in freqs))
    f = 0.5 + 0.5 * torch.cos(torch.pi * (r - (shell - 1)) / 2.0)
    f = torch.where(r < shell - 1, torch.ones_like(f), f)
    f = torch.where(r > shell + 1, torch.zeros_like(f), f)
    if ndim == 2:
        return irfft2_centered(rfft2_centered(images.to(torch.float64)) * f, (n, n)).to(
            images.dtype
        )
    spec = rfft3_centered(images.to(torch.float64)) * f
    return irfft3_centered(spec, (n, n, n)).to(images.dtype)


def gaussian_blobs(
    reference: torch.Tensor, diameter_px: float, rng: np.random.Generator, n_blobs: int = 40
) -> torch.Tensor:
    """One blob image ``(N, N)``: ``n_blobs`` Gaussians, amplitudes ``|reference|`` at their centres."""
    n = reference.shape[-1]
    centres = rng.normal(size=(n_blobs, 2)) * diameter_px / 7.0 + n / 2
    ix = centres[:, 0].astype(int)
    iy = centres[:, 1].astype(int)
    inside = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n)
    ref = reference.detach().cpu().numpy()
    amp = np.where(inside, np.abs(ref[iy.clip(0, n - 1), ix.clip(0, n - 1)]), 0.0)
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    d2 = (x[None] - centres[:, 0, None, None]) ** 2 + (y[None] - centres[:, 1, None, None]) ** 2
    img = (amp[:, None, None] * np.exp(-d2 * (10.0 / diameter_px) ** 2)).sum(0)
    return torch.from_numpy(img).to(reference)


def gaussian_blobs_3d(
    reference: torch.Tensor, diameter_px: float, rng: np.random.Generator, n_blobs: int = 40
) -> torch.Tensor:
    """One blob volume ``(N, N, N)`` as RELION's ``make_blobs_3d``: centres ``N(N/2, d/6)`` per
    coordinate, amplitude ``|reference|`` at the truncated centre (0 beyond the box), profile
    ``exp(-|r - c|² (10/d)²)`` evaluated inside a cube of half-width ``d/3`` about the centre."""
    n = reference.shape[-1]
    centres = rng.normal(size=(n_blobs, 3)) * diameter_px / 6.0 + n / 2  # (x, y, z)
    idx = centres.astype(int)
    inside = (idx < n).all(1)
    ref = reference.detach().cpu().numpy()
    c = np.clip(idx, 0, n - 1)
    amp = np.where(inside, np.abs(ref[c[:, 2], c[:, 1], c[:, 0]]), 0.0)
    grid = np.arange(n, dtype=np.float64)
    out = np.zeros((n, n, n))
    half = diameter_px / 3.0
    for (cx, cy, cz), a in zip(centres, amp, strict=True):
        if a <= 0:
            continue
        gx = np.exp(-((grid - cx) ** 2) * (10.0 / diameter_px) ** 2) * (np.abs(grid - cx) <= half)
        gy = np.exp(-((grid - cy) ** 2) * (10.0 / diameter_px) ** 2) * (np.abs(grid - cy) <= half)
        gz = np.exp(-((grid - cz) ** 2) * (10.0 / diameter_px) ** 2) * (np.abs(grid - cz) <= half)
        out += a * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return torch.from_numpy(out).to(reference)


def random_psi(rng: np.random.Generator) -> torch.Tensor:
    """RELION's random psi ~ U[0, 360) for the initial references."""
    return torch.tensor(rng.uniform(0.0, 360.0), dtype=torch.float64)


def initial_sigma2_and_references(
    images_iter,
    *,
    n_classes: int,
    box: int,
    n_optics: int,
    diameter_px: float,
    zero_mask: bool,
    init_blobs: bool,
    seed: int,
    pad: int = 2,
    device: torch.device | str = "cpu",
    space: ReferenceSpace | None = None,
    random_orientation=random_psi,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Compute (sigma2 ``(n_optics, N/2+1)``, references ``(K, N, N)`` (volumes ``(K, N, N, N)``
    in a 3D ``space``), number of particles used).

    ``images_iter`` yields ``(positions, images (B, N, N), ctf (B, N, N//2+1), optics (B,),
    particle_ids (B,))`` for the particles to use, in order; ``positions`` are their ranks in the
    sorted list (class = rank mod K), ``particle_ids`` seed their random orientation
    (``random_orientation(rng)``: a psi in 2D, a rotation matrix in 3D). In 3D the blobs are
    RELION's 3D blobs (centres spread by d/6).
    """
    space = space if space is not None else InPlaneSpace()
    nd = space.ndim
    nsh = box // 2 + 1
    shells = shell_index((box, box), device=device)
    cs0 = int(relion_round(torch.tensor(0.07 * box)))
    cs0 = max(cs0, 2)
    window = FourierWindow.create(box, cs0, device=device)
    power = torch.zeros((n_optics, nsh), dtype=torch.float64, device=device)
    counts = torch.zeros(n_optics, dtype=torch.float64, device=device)
    mavg = torch.zeros((box, box), dtype=torch.float64, device=device)
    m = pad * box
    d = torch.zeros((n_classes,) + (m,) * nd, dtype=torch.complex128, device=device)
    w = torch.zeros((n_classes,) + (m,) * nd, dtype=torch.float64, device=device)
    total = 0
    for positions, images, ctf, optics, ids in images_iter:
        images = images.to(device=device, dtype=torch.float64)
        if zero_mask:
            images = soft_mask_outside(images, diameter_px / 2, 5.0)
        mavg += images.sum(0)
        spec = rfft2_centered(images)
        ps = radial_average(spec.abs() ** 2, shells, nsh)  # all half-plane pixels
        power.index_add_(0, optics.to(device), ps)
        counts.index_add_(0, optics.to(device), torch.ones_like(ps[:, 0]))
        total += images.shape[0]
        orient = torch.stack(
            [random_orientation(np.random.default_rng(seed + int(i))) for i in ids.tolist()]
        ).to(device)
        cls = torch.as_tensor(positions, device=device) % n_classes
        x = window.gather(spec) * window.gather(ctf.to(device, torch.float64))
        cw = window.gather(ctf.to(device, torch.float64)) ** 2
        for k in range(n_classes):
            sel = cls == k
            if sel.any():
                dk, wk = back(space, x[sel][None], cw[sel][None], orient[sel], window, pad, cs0 / 2)
                d[k] += dk[0]
                w[k] += wk[0]
    if total == 0:
        raise ValueError("no particles to initialise from")
    avg_power = radial_average(rfft2_centered(mavg / total).abs() ** 2, shells, nsh)
    sigma2 = power / (2 * counts.clamp(min=1))[:, None] - avg_power[None] / 2
    sigma2 = fill_low_shells(sigma2)
    refs = reconstruct(d, w, box=box, r_max=cs0 // 2, tau2=None, pad=pad).to(torch.float64)
    refs = low_pass(refs, float(cs0), nd)
    blobs = gaussian_blobs if nd == 2 else gaussian_blobs_3d
    if init_blobs:
        blobbed = []
        for k in range(n_classes):
            rng = np.random.default_rng([seed, 7919, k])
            pos = blobs(refs[k], diameter_px, rng)
            neg = blobs(refs[k], diameter_px, rng)
            blob = pos - neg / 2
            target = refs[k].std()
            std = blob.std()
            blobbed.append(blob * (target / std) if std > 0 else blob)
        refs = low_pass(torch.stack(blobbed), float(cs0), nd)
    refs = soft_mask_outside(refs, diameter_px / 2, 5.0, ndim=nd)
    return sigma2, refs.to(torch.float32), total
