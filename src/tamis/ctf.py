"""The contrast transfer function exactly as RELION defines it (``ctf.h``, ``CTF::getCTF``).

Units follow the STAR labels: defocus in Å (``rlnDefocusU/V``), astigmatism angle and phase
shift in degrees, voltage in kV, spherical aberration in mm, B-factor in Å².

With spatial frequency ``(x, y)`` in 1/Å (``x = kx / (w p)``, ``y = ky / (h p)``) and ``u² = x² + y²``::

    lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))          (Å, V in volts)
    A      = Q(angle)^T diag(-dU, -dV) Q(angle)                 (Q: 2D rotation by the angle)
    gamma  = pi lambda (Axx x² + 2 Axy x y + Ayy y²) + pi/2 Cs lambda³ u⁴
             - phase_shift - atan(Q0 / sqrt(1 - Q0²))
    CTF    = scale * (-sin(gamma) * exp(-B u² / 4))

The quadratic-form definition is valid for any defocus pair, including ``dU < dV``.
Flags, in RELION's order: ``intact_first_peak`` sets ``-sin(gamma)`` to 1 where
``|gamma| < pi/2`` (gamma includes the amplitude-contrast and phase-shift terms, as in RELION 5);
then the B-factor envelope; then ``phase_flipped`` takes ``|CTF|`` or ``only_flip_phases`` takes
the sign (+1 at 0); the scale factor multiplies last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from tamis.fourier import rfft_frequencies

__all__ = ["CTFParams", "compute_ctf", "electron_wavelength"]


def electron_wavelength(voltage_kv: float | torch.Tensor) -> float | torch.Tensor:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kv * 1e3
    if isinstance(v, torch.Tensor):
        return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))
    return 12.2643247 / math.sqrt(v * (1.0 + v * 0.978466e-6))


@dataclass
class CTFParams:
    """Per-image CTF parameters as 1D tensors of equal length (RELION units).

    Attributes are named after what they hold, in the units of the matching STAR labels:
    ``defocus_u``/``defocus_v`` (Å), ``defocus_angle`` (deg), ``voltage`` (kV),
    ``spherical_aberration`` (mm), ``amplitude_contrast``, ``phase_shift`` (deg), ``bfactor`` (Å²),
    ``scale``, ``pixel_size`` (Å).
    """

    defocus_u: torch.Tensor
    defocus_v: torch.Tensor
    defocus_angle: torch.Tensor
    voltage: torch.Tensor
    spherical_aberration: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift: torch.Tensor
    bfactor: torch.Tensor
    scale: torch.Tensor
    pixel_size: torch.Tensor

    def __len__(self) -> int:
        return self.defocus_u.shape[0]

    def to(self, device: torch.device | str) -> CTFParams:
        return CTFParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, index: slice | torch.Tensor) -> CTFParams:
        return CTFParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def compute(
        self,
        image_shape: tuple[int, int],
        *,
        intact_first_peak: bool = False,
        phase_flipped: bool = False,
        only_flip_phases: bool = False,
    ) -> torch.Tensor:
        """The CTF of every image on the half-plane grid, ``(n, h, w // 2 + 1)``."""
        return compute_ctf(
            image_shape,
            pixel_size=self.pixel_size,
            defocus_u=self.defocus_u,
            defocus_v=self.defocus_v,
            defocus_angle=self.defocus_angle,
            voltage=self.voltage,
            spherical_aberration=self.spherical_aberration,
            amplitude_contrast=self.amplitude_contrast,
            phase_shift=self.phase_shift,
            bfactor=self.bfactor,
            scale=self.scale,
            intact_first_peak=intact_first_peak,
            phase_flipped=phase_flipped,
            only_flip_phases=only_flip_phases,
        )


def compute_ctf(
    image_shape: tuple[int, int],
    *,
    pixel_size: float | torch.Tensor,
    defocus_u: float | torch.Tensor,
    defocus_v: float | torch.Tensor,
    defocus_angle: float | torch.Tensor = 0.0,
    voltage: float | torch.Tensor = 300.0,
    spherical_aberration: float | torch.Tensor = 2.7,
    amplitude_contrast: float | torch.Tensor = 0.1,
    phase_shift: float | torch.Tensor = 0.0,
    bfactor: float | torch.Tensor = 0.0,
    scale: float | torch.Tensor = 1.0,
    intact_first_peak: bool = False,
    phase_flipped: bool = False,
    only_flip_phases: bool = False,
    rfft: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """RELION's CTF on a Fourier grid.

    Parameters broadcast over a leading batch dimension: pass 1D tensors of length ``b`` for a
    batch, or floats for one CTF. The result is ``(b, h, w // 2 + 1)`` (``rfft=True``, RELION's
    half-plane layout, see :mod:`tamis.fourier`) or ``(b, h, w)`` (full plane, same row/column
    frequency order as ``torch.fft.fft2``); the batch dimension is dropped when every parameter
    is a scalar.

    The computation runs in float64 and is returned in ``dtype``.
    """
    params = {
        "pixel_size": pixel_size,
        "defocus_u": defocus_u,
        "defocus_v": defocus_v,
        "defocus_angle": defocus_angle,
        "voltage": voltage,
        "spherical_aberration": spherical_aberration,
        "amplitude_contrast": amplitude_contrast,
        "phase_shift": phase_shift,
        "bfactor": bfactor,
        "scale": scale,
    }
    scalar = all(not isinstance(v, torch.Tensor) or v.ndim == 0 for v in params.values())
    if device is None:
        device = next((v.device for v in params.values() if isinstance(v, torch.Tensor)), "cpu")
    p = {
        k: torch.as_tensor(v, dtype=torch.float64, device=device).reshape(-1, 1, 1)
        for k, v in params.items()
    }
    h, w = image_shape
    if rfft:
        ky, kx = rfft_frequencies(image_shape, device=device, dtype=torch.float64)
    else:
        ky, kx = torch.meshgrid(
            torch.fft.fftfreq(h, 1.0 / h, device=device, dtype=torch.float64),
            torch.fft.fftfreq(w, 1.0 / w, device=device, dtype=torch.float64),
            indexing="ij",
        )
    x = kx / (w * p["pixel_size"])
    y = ky / (h * p["pixel_size"])
    u2 = x * x + y * y

    lam = electron_wavelength(p["voltage"])
    angle = torch.deg2rad(p["defocus_angle"])
    c, s = torch.cos(angle), torch.sin(angle)
    du, dv = p["defocus_u"], p["defocus_v"]
    axx = -(du * c * c + dv * s * s)
    axy = (dv - du) * c * s
    ayy = -(du * s * s + dv * c * c)
    cs_angstrom = p["spherical_aberration"] * 1e7
    q0 = p["amplitude_contrast"]
    gamma = (
        torch.pi * lam * (axx * x * x + 2.0 * axy * x * y + ayy * y * y)
        + (torch.pi / 2.0) * cs_angstrom * lam**3 * u2 * u2
        - torch.deg2rad(p["phase_shift"])
        - torch.atan(q0 / torch.sqrt(1.0 - q0 * q0))
    )
    ctf = -torch.sin(gamma)
    if intact_first_peak:
        ctf = torch.where(gamma.abs() < torch.pi / 2.0, torch.ones_like(ctf), ctf)
    ctf = ctf * torch.exp(-p["bfactor"] * u2 / 4.0)
    if phase_flipped:
        ctf = ctf.abs()
    elif only_flip_phases:
        ctf = torch.where(ctf < 0.0, -1.0, 1.0).to(ctf.dtype)
    ctf = (ctf * p["scale"]).to(dtype)
    return ctf[0] if scalar else ctf
