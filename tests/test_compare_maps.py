"""Superposing a map on its truth up to rotation, translation and hand (tamis.refine.compare),
and the 3D FSC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tamis.fourier import fsc
from tamis.geometry import euler_to_matrix, random_euler_angles
from tamis.refine.compare import compare_to_truth, resolution_at
from tamis.refine.maps import flip_hand, rotate_volumes, shift_volume

N = 32
# five blobs of different sizes, not coplanar: the structure has a hand
BLOBS = [
    ((5.0, 1.0, 3.0), 1.8, 1.0),
    ((-3.0, -3.5, -2.0), 1.5, 0.7),
    ((1.0, 6.0, -5.0), 2.2, 0.5),
    ((-6.0, 2.0, 4.0), 1.3, 0.9),
    ((2.0, -6.0, 6.0), 1.6, 0.6),
]


def _truth() -> torch.Tensor:
    c = np.arange(N) - N // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    out = np.zeros((N, N, N))
    for (cx, cy, cz), s, a in BLOBS:
        out += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
    return torch.from_numpy(out)


@pytest.mark.parametrize("flip", [False, True])
def test_a_turned_shifted_noisy_copy_is_superposed_in_the_right_hand(flip: bool):
    truth = _truth()
    ang = random_euler_angles(1, torch.Generator().manual_seed(11))[0]
    m = rotate_volumes(truth, euler_to_matrix(*ang)[None])[0]
    m = shift_volume(m, torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64))
    if flip:
        m = flip_hand(m)
    noise = torch.randn(m.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = compare_to_truth(m + 0.01 * noise, truth, pixel_size=2.0)
    assert res.flipped == flip
    assert res.correlation > 0.97
    # the blobs' own band limit and the noise: FSC 0.5 well beyond 8 A (Nyquist 4 A)
    assert res.resolution_05 < 8.0
    # the wrong hand is measurably worse: the mirror superposed alone
    other = compare_to_truth(flip_hand(m + 0.01 * noise), truth, pixel_size=2.0)
    assert other.flipped != flip
    assert other.correlation == pytest.approx(res.correlation, abs=1e-3)


def test_fsc_and_resolution():
    truth = _truth()
    assert torch.allclose(fsc(truth, truth)[: N // 2], torch.ones(N // 2, dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn((N, N, N), generator=gen, dtype=torch.float64)
    assert float(fsc(truth, noise)[2:].abs().max()) < 0.5
    curve = torch.tensor([1.0, 0.9, 0.8, 0.6, 0.4, 0.1])
    # crosses 0.5 halfway between shells 3 and 4: 3.5 shells of a 10-px box at 2 A
    assert resolution_at(curve, 0.5, 10, 2.0) == pytest.approx(10 * 2.0 / 3.5)
    assert resolution_at(torch.tensor([1.0, 0.2, 0.1]), 0.5, 10, 2.0) == math.inf
    assert resolution_at(torch.ones(6), 0.5, 10, 2.0) == pytest.approx(4.0)
