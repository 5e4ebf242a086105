"""Fourier-slice projection of a volume at many orientations, batched.

The volume is zero-padded ``pad`` times, pre-divided by the trilinear interpolation's real-space
envelope (``sinc²`` per axis), transformed once, and central slices are read by trilinear
interpolation (``grid_sample``) at ``A^T k`` (RELION's convention, see :mod:`tamis.geometry`).
Slices come out in the half-plane layout of :mod:`tamis.fourier`, so a CTF and shifts can be
applied before the inverse transform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tamis.fourier import irfft2_centered, rfft_frequencies

__all__ = ["Projector"]


class Projector:
    """Projects one volume ``(n, n, n)`` (z, y, x).

    Parameters
    ----------
    volume
        Real-space density, origin at voxel ``n // 2``.
    pad
        Padding factor of the Fourier grid (2 is RELION's default).
    """

    def __init__(self, volume: torch.Tensor, *, pad: int = 2) -> None:
        n = volume.shape[-1]
        self.box_size = n
        self.pad = pad
        m = pad * n
        self._m = m
        device = volume.device
        # Undo the attenuation of trilinear interpolation in Fourier space (gridding correction).
        r = (torch.arange(n, device=device, dtype=torch.float64) - n // 2) / m
        env = torch.sinc(r) ** 2
        corrected = volume.to(torch.float64) / (
            env[:, None, None] * env[None, :, None] * env[None, None, :]
        )
        padded = torch.zeros((m, m, m), dtype=torch.float64, device=device)
        o = m // 2 - n // 2
        padded[o : o + n, o : o + n, o : o + n] = corrected
        spec = torch.fft.fftshift(
            torch.fft.fftn(torch.fft.ifftshift(padded), norm="forward")
        )  # DC at index m // 2 along every axis
        # Scale so that a slice equals the forward-normalised 2D transform of the n x n projection.
        spec = spec * (m**3 / n**2)
        self._grid = torch.stack([spec.real, spec.imag]).to(torch.float32)[None]  # (1, 2, m, m, m)

    @property
    def device(self) -> torch.device:
        return self._grid.device

    def slices(self, rotations: torch.Tensor) -> torch.Tensor:
        """Central slices for rotation matrices ``(b, 3, 3)``: complex ``(b, n, n // 2 + 1)``."""
        n, m = self.box_size, self._m
        ky, kx = rfft_frequencies((n, n), device=self.device, dtype=torch.float32)
        k = torch.stack([kx, ky, torch.zeros_like(kx)], dim=-1).reshape(-1, 3)  # (p, 3) as (x,y,z)
        rot = rotations.to(device=self.device, dtype=torch.float32)
        # A^T k for every rotation: (b, p, 3), in padded-grid frequency units.
        q = torch.einsum("bji,pj->bpi", rot, k) * self.pad
        # grid_sample coordinates (x, y, z) in [-1, 1]; frequency 0 sits at index m // 2.
        coords = (q + m // 2) * (2.0 / (m - 1)) - 1.0
        b = rot.shape[0]
        out = F.grid_sample(
            self._grid.expand(1, -1, -1, -1, -1),
            coords.reshape(1, b, -1, 1, 3),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )  # (1, 2, b, p, 1)
        out = out[0, :, :, :, 0]
        return torch.complex(out[0], out[1]).reshape(b, n, n // 2 + 1)

    def project(self, rotations: torch.Tensor) -> torch.Tensor:
        """Real-space projections ``(b, n, n)`` for rotation matrices ``(b, 3, 3)``."""
        n = self.box_size
        return irfft2_centered(self.slices(rotations), (n, n))
