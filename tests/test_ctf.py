"""The CTF against an independent numpy reference of RELION's formula.

The reference is written here, pixel by pixel, in the *other* form RELION has used
(``ctf.h`` before the quadratic-form rewrite): defocus along a direction
``df(theta) = (U + V)/2 + (U - V)/2 cos(2 (theta - azimuth))`` and the amplitude contrast as
``-(sqrt(1 - Q0²) sin(chi) - Q0 cos(chi))``. Agreement therefore checks the astigmatism
convention, the units and the flag order, not just a copy of the same arithmetic.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from tamis.ctf import compute_ctf, electron_wavelength


def reference_ctf(
    shape,
    pixel_size,
    du,
    dv,
    angle_deg,
    kv,
    cs_mm,
    q0,
    phase_deg=0.0,
    bfac=0.0,
    scale=1.0,
    intact_first_peak=False,
    phase_flipped=False,
    only_flip=False,
):
    h, w = shape
    lam = 12.2643247 / math.sqrt(kv * 1e3 * (1 + kv * 1e3 * 0.978466e-6))
    out = np.zeros((h, w // 2 + 1))
    for i in range(h):
        ky = i if i <= h // 2 else i - h
        for j in range(w // 2 + 1):
            x = j / (w * pixel_size)
            y = ky / (h * pixel_size)
            u2 = x * x + y * y
            theta = math.atan2(y, x) if u2 > 0 else 0.0
            df = 0.5 * (du + dv) + 0.5 * (du - dv) * math.cos(2 * (theta - math.radians(angle_deg)))
            chi = (
                math.pi * lam * df * u2
                - 0.5 * math.pi * cs_mm * 1e7 * lam**3 * u2 * u2
                + math.radians(phase_deg)
            )
            # gamma of RELION 5 is -chi - asin(Q0); first-peak test uses |gamma|
            gamma = -chi - math.asin(q0)
            if intact_first_peak and abs(gamma) < math.pi / 2:
                c = 1.0
            else:
                c = math.sqrt(1 - q0 * q0) * math.sin(chi) + q0 * math.cos(chi)
            c *= math.exp(-bfac * u2 / 4)
            if phase_flipped:
                c = abs(c)
            elif only_flip:
                c = -1.0 if c < 0 else 1.0
            out[i, j] = scale * c
    return out


GRID = list(
    itertools.product(
        [(24, 24), (20, 28)],  # square and rectangular
        [(15000.0, 14000.0, 30.0), (9000.0, 12000.0, -75.0)],  # U > V, and U < V
        [(300.0, 2.7, 0.1), (200.0, 0.01, 0.07)],
        [(0.0, 0.0, 1.0), (90.0, 80.0, 0.7)],  # phase shift, B-factor, scale
    )
)


@pytest.mark.parametrize(("shape", "defocus", "scope", "extra"), GRID)
@pytest.mark.parametrize("flag", ["none", "intact", "flipped", "only_flip"])
def test_ctf_matches_reference(shape, defocus, scope, extra, flag):
    du, dv, ang = defocus
    kv, cs, q0 = scope
    phase, bfac, scale = extra
    flags = {
        "intact_first_peak": flag == "intact",
        "phase_flipped": flag == "flipped",
        "only_flip_phases": flag == "only_flip",
    }
    ours = compute_ctf(
        shape,
        pixel_size=1.7,
        defocus_u=du,
        defocus_v=dv,
        defocus_angle=ang,
        voltage=kv,
        spherical_aberration=cs,
        amplitude_contrast=q0,
        phase_shift=phase,
        bfactor=bfac,
        scale=scale,
        dtype=torch.float64,
        **flags,
    ).numpy()
    ref = reference_ctf(
        shape,
        1.7,
        du,
        dv,
        ang,
        kv,
        cs,
        q0,
        phase,
        bfac,
        scale,
        intact_first_peak=flags["intact_first_peak"],
        phase_flipped=flags["phase_flipped"],
        only_flip=flags["only_flip_phases"],
    )
    if flag == "only_flip":
        # Signs may legitimately differ only where the CTF is ~0.
        near_zero = np.abs(reference_ctf(shape, 1.7, du, dv, ang, kv, cs, q0, phase, bfac)) < 1e-9
        assert np.all((ours == ref) | near_zero)
    else:
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_ctf_batched_equals_single_and_rfft_layout():
    du = torch.tensor([10000.0, 20000.0])
    dv = torch.tensor([9000.0, 21000.0])
    ang = torch.tensor([10.0, 100.0])
    batch = compute_ctf((16, 16), pixel_size=2.0, defocus_u=du, defocus_v=dv, defocus_angle=ang)
    assert batch.shape == (2, 16, 9)
    for i in range(2):
        one = compute_ctf(
            (16, 16),
            pixel_size=2.0,
            defocus_u=float(du[i]),
            defocus_v=float(dv[i]),
            defocus_angle=float(ang[i]),
        )
        torch.testing.assert_close(batch[i], one)
    full = compute_ctf((16, 16), pixel_size=2.0, defocus_u=15000.0, defocus_v=15000.0, rfft=False)
    half = compute_ctf((16, 16), pixel_size=2.0, defocus_u=15000.0, defocus_v=15000.0)
    assert full.shape == (16, 16)
    # The half-plane layout is the first w//2+1 columns of the full plane (CTF is even in k).
    torch.testing.assert_close(full[:, :9], half)


def test_ctf_at_zero_frequency_is_amplitude_contrast():
    c = compute_ctf((8, 8), pixel_size=1.0, defocus_u=1e4, defocus_v=1e4, amplitude_contrast=0.1)
    assert c[0, 0].item() == pytest.approx(0.1, abs=1e-7)


def test_wavelength_300kv():
    assert electron_wavelength(300.0) == pytest.approx(0.019687, abs=1e-6)
