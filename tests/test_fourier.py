"""RELION's Fourier conventions against slow numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tamis.fourier import (
    crop_images,
    fourier_shift,
    frc,
    irfft2_centered,
    pad_fourier,
    pad_images,
    radial_average,
    rescale_images,
    rfft2_centered,
    rfft_frequencies,
    shell_index,
    window_fourier,
)


def relion_round(x: float) -> int:
    return int(x + 0.5) if x > 0 else int(x - 0.5)


def slow_centered_dft(img: np.ndarray) -> np.ndarray:
    """DFT about pixel (h//2, w//2), divided by h*w, RELION's half-plane rows."""
    h, w = img.shape
    out = np.zeros((h, w // 2 + 1), dtype=complex)
    for i in range(h):
        ky = i if i <= h // 2 else i - h
        for kx in range(w // 2 + 1):
            acc = 0j
            for r in range(h):
                for c in range(w):
                    y, x = r - h // 2, c - w // 2
                    acc += img[r, c] * np.exp(-2j * np.pi * (kx * x / w + ky * y / h))
            out[i, kx] = acc / (h * w)
    return out


@pytest.mark.parametrize("shape", [(8, 8), (6, 10), (7, 9)])
def test_rfft2_centered_matches_slow_dft(shape):
    rng = np.random.default_rng(0)
    img = rng.normal(size=shape)
    ours = rfft2_centered(torch.from_numpy(img)).numpy()
    np.testing.assert_allclose(ours, slow_centered_dft(img), atol=1e-12)
    back = irfft2_centered(torch.from_numpy(ours), shape).numpy()
    np.testing.assert_allclose(back, img, atol=1e-12)


def test_frequencies_and_shells_follow_relion():
    ky, kx = rfft_frequencies((8, 8))
    assert ky[:, 0].tolist() == [0, 1, 2, 3, 4, -3, -2, -1]
    assert kx[0].tolist() == [0, 1, 2, 3, 4]
    shells = shell_index((8, 8)).numpy()
    for i in range(8):
        y = i if i <= 4 else i - 8
        for x in range(5):
            assert shells[i, x] == relion_round(math.sqrt(x * x + y * y))
    # |k| = sqrt(6.25) = 2.5 exactly at (ky, kx) = (1.5, 2)... cannot occur on an integer grid,
    # but shell 2.5 -> 3 (half away from zero) is what RELION's ROUND does, unlike torch.round.
    assert relion_round(2.5) == 3 and torch.round(torch.tensor(2.5)).item() == 2


def test_window_and_pad_fourier_match_relion_ranges():
    n, m = 12, 8
    spec = torch.arange(n * (n // 2 + 1), dtype=torch.float64).reshape(n, n // 2 + 1)
    win = window_fourier(spec, m)
    assert win.shape == (m, m // 2 + 1)
    for i in range(m):
        ky = i if i <= m // 2 else i - m
        assert -(m // 2 - 1) <= ky <= m // 2
        src_row = ky if ky >= 0 else n + ky
        for kx in range(m // 2 + 1):
            assert win[i, kx] == spec[src_row, kx]
    back = pad_fourier(win, n)
    assert back.shape == spec.shape
    assert torch.equal(window_fourier(back, m), win)


def test_fourier_shift_moves_content_by_plus_shift():
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.normal(size=(16, 16)))
    spec = rfft2_centered(img)
    shifted = irfft2_centered(fourier_shift(spec, torch.tensor([3.0, -2.0]), (16, 16)), (16, 16))
    expected = torch.roll(img, shifts=(-2, 3), dims=(0, 1))  # +3 in x (columns), -2 in y (rows)
    torch.testing.assert_close(shifted, expected)


def test_radial_average_matches_loop():
    rng = np.random.default_rng(2)
    vals = rng.normal(size=(3, 10, 6))
    shells = shell_index((10, 10))
    ours = radial_average(torch.from_numpy(vals), shells, 6).numpy()
    s = shells.numpy()
    for b in range(3):
        for k in range(6):
            sel = vals[b][s == k]
            assert ours[b, k] == pytest.approx(sel.mean() if sel.size else 0.0)


def test_frc_is_one_for_identical_and_low_for_independent():
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.normal(size=(32, 32)))
    b = torch.from_numpy(rng.normal(size=(32, 32)))
    torch.testing.assert_close(frc(a, a), torch.ones(17, dtype=torch.float64))
    assert frc(a, b)[2:].abs().mean() < 0.3


def test_rescale_keeps_mean_and_band_limited_content():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    img = torch.cos(2 * torch.pi * 2 * x / 32) + 5.0
    small = rescale_images(img, 16)
    assert small.shape == (16, 16)
    assert small.mean().item() == pytest.approx(5.0, abs=1e-5)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    torch.testing.assert_close(
        small, torch.cos(2 * torch.pi * 2 * xx / 16) + 5.0, atol=1e-5, rtol=0
    )


def test_pad_and_crop_keep_origin():
    img = torch.zeros(8, 8)
    img[4, 4] = 1.0  # the origin pixel n//2
    padded = pad_images(img, 16)
    assert padded[8, 8] == 1.0 and padded.sum() == 1.0
    torch.testing.assert_close(crop_images(padded, 8), img)
