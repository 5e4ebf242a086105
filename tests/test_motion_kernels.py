"""Motion-correction kernels against slow numpy references: Fourier crop, CCF peak search,
frame alignment, frame groups, the polynomial model and its fit, the resampler, dose weights
and accumulated motion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tamis.errors import TamisError
from tamis.fourier import crop_fourier, fourier_shift
from tamis.motion_model import (
    evaluate_polynomial,
    fit_polynomial,
    polynomial_basis,
    resample,
    shift_field,
)
from tamis.prep.motion import (
    _peaks_window,
    accumulated_motion,
    align_spectra,
    ccf_shape,
    dose_weights,
    frame_groups,
    good_size,
)


def test_crop_fourier_keeps_the_low_frequencies_of_rectangular_images():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(12, 10))
    spec = torch.fft.rfft2(torch.from_numpy(img), norm="forward")
    out = crop_fourier(spec, (6, 4)).numpy()
    full = np.fft.fft2(img) / img.size
    for i, ky in enumerate([0, 1, 2, 3, -2, -1]):
        for kx in range(3):
            assert out[i, kx] == pytest.approx(full[ky % 12, kx])
    # binning keeps the mean per pixel
    back = torch.fft.irfft2(crop_fourier(spec, (6, 4)), s=(6, 4), norm="forward")
    assert float(back.mean()) == pytest.approx(img.mean())


def test_good_sizes_and_ccf_box_as_relion():
    assert good_size(100) == 192 and good_size(1015) == 1024 and good_size(20000) == 20000
    assert ccf_shape((4096, 4096), 150.0) == (1024, 1024)  # RELION: a 4K frame at bin 1
    assert ccf_shape((818, 818), 150.0) == (216, 216)  # a 5x5 patch
    assert ccf_shape((100, 100), 150.0) == (100, 100)  # capped at the image


def test_peak_search_matches_a_loop_with_parabolic_refinement():
    rng = np.random.default_rng(1)
    ccf = rng.normal(size=(3, 16, 16))
    ccf[0, 2, 14] = 9  # dy 2, dx -2
    ccf[0, 1, 14], ccf[0, 3, 14] = 4, 6  # y neighbours
    ccf[0, 2, 13], ccf[0, 2, 15] = 5, 5
    ccf[1, 8, 8] = 50  # outside a search of 4: must be ignored
    d = np.arange(-5, 6)  # the window _ccf_window gives for a search of 4: reach 5
    window = ccf[:, d[:, None] % 16, d[None, :] % 16]
    got = _peaks_window(torch.from_numpy(window)).numpy()
    for b in range(3):
        best, arg = -np.inf, None
        for y in range(16):
            for x in range(16):
                dy, dx = (y if y < 8 else y - 16), (x if x < 8 else x - 16)
                if abs(dy) <= 4 and abs(dx) <= 4 and ccf[b, y, x] > best:
                    best, arg = ccf[b, y, x], (y, x, dy, dx)
        y, x, dy, dx = arg
        out = []
        for d, m, p in ((dx, ccf[b, y, (x - 1) % 16], ccf[b, y, (x + 1) % 16]),
                        (dy, ccf[b, (y - 1) % 16, x], ccf[b, (y + 1) % 16, x])):  # fmt: skip
            den = p + m - 2 * best
            out.append(d - 0.5 * (p - m) / den if den < 0 else d)
        np.testing.assert_allclose(got[b], out, atol=1e-9)
    assert got[0, 0] == pytest.approx(-2.0) and got[0, 1] == pytest.approx(2 + 0.5 * 2 / -8 * -1)


def _movie(n, size, shifts, counts=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.nn.functional.avg_pool2d(
        torch.randn((1, 1, size, size), generator=g, dtype=torch.float64), 5, 1, 2
    )[0, 0]
    clean = 1 + 0.5 * clean / clean.std()
    spec = torch.fft.rfft2(clean, norm="forward")
    # the specimen moves by -shift, so applying +shift aligns
    moved = torch.fft.irfft2(
        fourier_shift(spec.expand(n, -1, -1), -torch.as_tensor(shifts), (size, size)),
        s=(size, size),
        norm="forward",
    )
    return torch.poisson(counts * moved.clamp(min=0), generator=g).float()


def test_alignment_recovers_known_shifts_and_references_the_first_frame():
    rng = np.random.default_rng(2)
    true = np.cumsum(rng.normal(0, 2.0, size=(12, 2)), 0)
    true -= true[0]
    frames = _movie(12, 384, true)
    spec = torch.fft.rfft2(frames, norm="forward")
    shifts, conv = align_spectra(spec, (384, 384), 150.0)
    assert bool(conv)
    assert shifts[0].abs().max() == 0
    np.testing.assert_allclose(shifts.numpy(), true, atol=0.15)
    # batched: two movies at once give each its own answer
    both = torch.stack([spec, torch.roll(spec, 1, 0)])
    s2, c2 = align_spectra(both, (384, 384), 150.0)
    np.testing.assert_allclose(s2[0].numpy(), shifts.numpy(), atol=1e-4)
    rolled = np.roll(true, 1, 0) - np.roll(true, 1, 0)[0]
    np.testing.assert_allclose(s2[1].numpy(), rolled, atol=0.15)


def test_leave_one_out_ccf_peak_against_a_numpy_loop():
    """First iteration: the peak of (sum of the others) x conj(frame), B-weighted, from a loop
    over frames with numpy's FFT on the full grid, equals align_spectra's first increment."""
    true = np.array([[0, 0], [3.0, -2.0], [-4.0, 1.0], [1.0, 5.0]])
    frames = _movie(4, 192, true, counts=20.0).numpy().astype(np.float64)
    spectra = [np.fft.rfft2(f) / f.size for f in frames]
    ky = np.fft.fftfreq(192)[:, None]
    kx = np.fft.rfftfreq(192)[None, :]
    wgt = np.exp(-2 * 150.0 * (ky**2 + kx**2))
    peaks = []
    for i in range(4):
        ref = sum(spectra) - spectra[i]
        ccf = np.fft.irfft2(ref * np.conj(spectra[i]) * wgt, s=(192, 192))
        y, x = np.unravel_index(np.argmax(ccf), ccf.shape)
        sub = []
        for d, m, p in (((x + 96) % 192 - 96, ccf[y, x - 1], ccf[y, (x + 1) % 192]),
                        ((y + 96) % 192 - 96, ccf[y - 1, x], ccf[(y + 1) % 192, x])):  # fmt: skip
            sub.append(d - 0.5 * (p - m) / (p + m - 2 * ccf[y, x]))
        peaks.append(sub)
    peaks = np.array(peaks) - peaks[0]
    spec = torch.fft.rfft2(torch.from_numpy(frames).float(), norm="forward")
    shifts, _ = align_spectra(spec, (192, 192), 150.0, max_iter=1)
    np.testing.assert_allclose(shifts.numpy(), peaks, atol=2e-3)


def test_frame_groups_spread_the_remainder_backwards_never_onto_the_first():
    sizes = lambda n, g: [len(r) for r in frame_groups(n, g)]  # noqa: E731
    assert sizes(10, 3) == [3, 3, 4]
    assert sizes(11, 3) == [3, 4, 4]
    assert sizes(13, 4) == [4, 4, 5]
    assert sizes(12, 5) == [5, 7]
    assert sizes(2, 3) == []
    assert [r.start for r in frame_groups(11, 3)] == [0, 3, 7]


def test_polynomial_basis_order_fit_and_field():
    x, y, z = np.array([0.1, -0.3]), np.array([0.2, 0.4]), np.array([2.0, 5.0])
    b = polynomial_basis(x, y, z)
    for k, (sp, p) in enumerate(
        (s, p) for s in ("1", "x", "xx", "y", "yy", "xy") for p in (1, 2, 3)
    ):
        val = {"1": 1, "x": x, "xx": x * x, "y": y, "yy": y * y, "xy": x * y}[sp] * z**p
        np.testing.assert_allclose(b[:, k], val)
    rng = np.random.default_rng(5)
    coeffs = rng.normal(size=(2, 18)) * 0.01
    xs, ys, zs = rng.uniform(-0.5, 0.5, 300), rng.uniform(-0.5, 0.5, 300), rng.integers(0, 30, 300)
    obs = evaluate_polynomial(coeffs, xs, ys, zs)
    fitted, rmsd = fit_polynomial(xs, ys, zs, obs)
    np.testing.assert_allclose(fitted, coeffs, atol=1e-8)
    assert max(rmsd) < 1e-8
    # the per-pixel field: pixel (ix, iy) of an (h, w) image is at (ix / w - 0.5, iy / h - 0.5)
    field = shift_field(torch.from_numpy(coeffs), (6, 8), torch.tensor([3.0, 7.0])).numpy()
    for f, zf in enumerate((3.0, 7.0)):
        for iy in range(6):
            for ix in range(8):
                ref = evaluate_polynomial(coeffs, np.array([ix / 8 - 0.5]),
                                          np.array([iy / 6 - 0.5]), np.array([zf]))[0]  # fmt: skip
                np.testing.assert_allclose(field[f, iy, ix], ref, rtol=1e-5, atol=1e-6)


def test_resample_is_bilinear_with_clamped_edges():
    rng = np.random.default_rng(6)
    img = rng.normal(size=(7, 9)).astype(np.float32)
    sh = rng.uniform(-2, 2, size=(7, 9, 2)).astype(np.float32)
    got = resample(torch.from_numpy(img)[None], torch.from_numpy(sh)[None])[0].numpy()

    def at(yy, xx):
        return img[min(max(yy, 0), 6), min(max(xx, 0), 8)]

    for iy in range(7):
        for ix in range(9):
            sx = min(max(ix - sh[iy, ix, 0], 0), 8)
            sy = min(max(iy - sh[iy, ix, 1], 0), 6)
            x0, y0 = math.floor(sx), math.floor(sy)
            fx, fy = sx - x0, sy - y0
            ref = ((1 - fx) * (1 - fy) * at(y0, x0) + fx * (1 - fy) * at(y0, x0 + 1)
                   + (1 - fx) * fy * at(y0 + 1, x0) + fx * fy * at(y0 + 1, x0 + 1))  # fmt: skip
            assert got[iy, ix] == pytest.approx(ref, abs=1e-5)


def test_dose_weights_against_the_formula():
    doses = torch.tensor([1.5, 3.0, 4.5, 6.0])
    for kv, factor in ((300, 1.0), (200, 0.8), (100, 0.64)):
        w = dose_weights((8, 6), 1.2, doses, kv).numpy()
        for iy, ky in enumerate([0, 1, 2, 3, 4, -3, -2, -1]):
            for kx in range(4):
                k = math.sqrt((ky / 8) ** 2 + (kx / 6) ** 2) / 1.2
                ne = 0.245 * k**-1.665 + 2.81 if k > 0 else math.inf
                raw = [math.exp(-d / factor / (2 * ne)) for d in doses.tolist()]
                norm = math.sqrt(sum(r * r for r in raw))
                np.testing.assert_allclose(w[:, iy, kx], np.array(raw) / norm, rtol=1e-5)
    assert w[:, 0, 0] == pytest.approx(np.full(4, 0.5))  # DC: 1 / sqrt(n)
    with pytest.raises(TamisError, match="250 kV"):
        dose_weights((8, 6), 1.2, doses, 250)


def test_accumulated_motion_early_and_late():
    s = np.array([[0, 0], [3, 4], [3, 4], [np.nan, np.nan], [6, 8], [6, 9]], dtype=float)
    total, early, late = accumulated_motion(s, dose_per_frame=2.0, cutoff=4.0)
    # frames 2..6; cutoff frame (4 - 0) / 2 = 2: frame 2's step (5) is early
    assert (total, early, late) == pytest.approx((11.0, 5.0, 6.0))


def test_resampling_by_the_model_equals_the_per_pixel_field():
    from tamis.fourier import irfft2
    from tamis.motion_model import resample_polynomial

    rng = np.random.default_rng(7)
    frames = torch.from_numpy(rng.normal(size=(3, 20, 28)).astype(np.float32))
    coeffs = torch.from_numpy(rng.normal(size=(2, 18)) * 0.05)
    z = torch.tensor([0.0, 4.0, 9.0])
    slow = resample(frames, shift_field(coeffs, (20, 28), z))
    fast = resample_polynomial(frames, coeffs, z)
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=2e-5)
    spec = torch.fft.rfft2(frames, norm="forward")
    np.testing.assert_allclose(
        irfft2(spec, s=(20, 28)).numpy(), torch.fft.irfft2(spec, s=(20, 28), norm="forward").numpy(),
        atol=1e-5,
    )  # fmt: skip


def test_shifting_cropped_spectra_matches_the_full_shift_then_the_crop():
    from tamis.fourier import fourier_shift_cropped

    rng = np.random.default_rng(8)
    img = torch.from_numpy(rng.normal(size=(2, 24, 20)))
    spec = torch.fft.rfft2(img, norm="forward").to(torch.complex64)
    shifts = torch.tensor([[1.3, -2.2], [-0.4, 3.7]])
    full = fourier_shift(spec, shifts, (24, 20))  # content moves by +shift
    crop = fourier_shift_cropped(crop_fourier(spec, (12, 8)), shifts, (24, 20))
    np.testing.assert_allclose(crop.numpy(), crop_fourier(full, (12, 8)).numpy(), atol=1e-6)


@pytest.mark.parametrize("crop", [(20, 16), (32, 24)])
def test_ccf_window_equals_the_inverse_fft_around_the_origin(crop):
    """The CCF from two GEMMs over a cropped half-plane spectrum equals numpy's inverse FFT of
    the spectrum zero-padded to the CCF box, at every shift of the window (wrapped); also with
    no crop, where the box's kx = 0 and Nyquist columns count once."""
    from tamis.prep.motion import _ccf_window

    rng = np.random.default_rng(4)
    box = (32, 24)
    prod = torch.complex(
        torch.from_numpy(rng.normal(size=(3, crop[0], crop[1] // 2 + 1))).float(),
        torch.from_numpy(rng.normal(size=(3, crop[0], crop[1] // 2 + 1))).float(),
    )
    reach = 5
    got = _ccf_window(prod, box, reach).numpy()
    # the cropped spectrum zero-padded to the box: rows ky 0..h/2 on top, the negative ones at
    # the bottom, columns kx 0..w/2 on the left
    small = prod.numpy().astype(np.complex128)
    padded = np.zeros((3, box[0], box[1] // 2 + 1), np.complex128)
    half = crop[0] // 2
    padded[:, : half + 1, : small.shape[2]] = small[:, : half + 1]
    padded[:, box[0] - (half - 1) :, : small.shape[2]] = small[:, half + 1 :]
    full = np.fft.irfft2(padded, s=box)
    d = np.arange(-reach, reach + 1)
    want = full[:, d[:, None] % box[0], d[None, :] % box[1]]
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
