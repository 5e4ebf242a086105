"""Particle screen (:mod:`tamis.rank.screen`): the batched statistics against a slow per-particle
loop with exact DFT projections, and the screen on particles with a known truth (real, empty,
clumps of two)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from tamis.ctf import compute_ctf
from tamis.errors import TamisError
from tamis.io.mrc import write_mrc
from tamis.io.particles import ParticleSet
from tamis.io.star import write_star
from tamis.rank.screen import ScreenOptions, particle_fit, screen_particles

N = 32
PIXEL = 4.0


def blobs(rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` smooth, asymmetric class images: a few Gaussian blobs each."""
    y, x = np.mgrid[:N, :N] - N // 2
    out = np.zeros((k, N, N))
    for c in range(k):
        for _ in range(4):
            cx, cy = rng.uniform(-6, 6, 2)
            s = rng.uniform(2.0, 3.5)
            out[c] += rng.uniform(0.5, 1.0) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    return out


def exact_spectrum(image: np.ndarray, psi: float, shift: tuple[float, float]) -> np.ndarray:
    """Full-plane spectrum (``np.fft.fft2`` order, forward-normalised, about the centre) of
    ``image`` rotated as RELION's projector does (``P(k) = F(A^T k)``, ``A = [[c, s], [-s, c]]``)
    and moved by ``shift`` (x, y) pixels, by a direct DFT at the rotated frequencies."""
    ky, kx = frequencies()
    g = math.radians(psi)
    c, s = math.cos(g), math.sin(g)
    qx, qy = c * kx - s * ky, s * kx + c * ky
    yy, xx = np.mgrid[:N, :N] - N // 2
    out = np.zeros((N, N), dtype=complex)
    for i in range(N):
        for j in range(N):
            if kx[i, j] ** 2 + ky[i, j] ** 2 > (N // 2) ** 2:
                continue
            phase = np.exp(-2j * np.pi * (qx[i, j] * xx + qy[i, j] * yy) / N)
            out[i, j] = (image * phase).sum() / N**2
    return out * np.exp(-2j * np.pi * (kx * shift[0] + ky * shift[1]) / N)


def full_ctf(defocus: float) -> np.ndarray:
    """The CTF on the full plane (``np.fft.fft2`` order)."""
    ctf = compute_ctf((N, N), pixel_size=PIXEL, defocus_u=defocus, defocus_v=defocus, rfft=False)
    return ctf.numpy().astype(np.float64)


def frequencies() -> tuple[np.ndarray, np.ndarray]:
    """(ky, kx) in ``np.fft.fft2`` order; the Nyquist column as +N/2, as in a half-plane
    transform."""
    f = np.fft.fftfreq(N) * N
    fx = np.where(f == -(N // 2), N // 2, f)
    return np.meshgrid(f, fx, indexing="ij")


def image_from(spectrum: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft2(spectrum, norm="forward")).real


def write_set(tmp_path, images, psi, origin_px, classes, defocus) -> ParticleSet:
    write_mrc(tmp_path / "p.mrcs", images.astype(np.float32), pixel_size=PIXEL)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [PIXEL],
                           "rlnImageSize": [N], "rlnImageDimensionality": [2]})  # fmt: skip
    n = len(images)
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@p.mrcs" for i in range(n)],
        "rlnOpticsGroup": 1, "rlnDefocusU": defocus, "rlnDefocusV": defocus,
        "rlnDefocusAngle": 0.0, "rlnClassNumber": classes, "rlnAnglePsi": psi,
        "rlnOriginXAngst": origin_px[:, 0] * PIXEL, "rlnOriginYAngst": origin_px[:, 1] * PIXEL,
    })  # fmt: skip
    write_star({"optics": optics, "particles": parts}, tmp_path / "p.star")
    return ParticleSet.from_star(tmp_path / "p.star")


def slow_fit(image, cls_image, psi, origin_px, defocus, sigma2, lowres, radius) -> tuple:
    """One particle's amplitude, misfit, low-resolution amplitude (the whitened, low-passed
    least-squares scale inside the mask) and plain amplitude (low-passed, not whitened, at the
    best shift within 3 px), written out per pixel from the definitions."""
    ky, kx = frequencies()
    shell = np.floor(np.sqrt(kx**2 + ky**2) + 0.5).astype(int)
    x = np.fft.fft2(np.fft.ifftshift(image), norm="forward")
    ca = exact_spectrum(cls_image, psi, (-origin_px[0], -origin_px[1])) * full_ctf(defocus)
    half = N // 2
    ok = (shell >= 1) & (shell < min(len(sigma2), half + 1))
    w = np.where(ok, 1.0 / sigma2[np.minimum(shell, len(sigma2) - 1)], 0.0)
    # amplitude and noise level over RELION's half plane: kx >= 0, without (kx = 0, ky < 0)
    half_plane = ((kx > 0) | ((kx == 0) & (ky >= 0))) & (shell <= half)
    counted = half_plane & ok
    amp = (w * (np.conj(x) * ca).real)[counted].sum() / (w * np.abs(ca) ** 2)[counted].sum()
    high = counted & (shell >= math.ceil(0.7 * half))
    noise = (w * np.abs(x) ** 2)[high].mean()
    n_low = max(3, int(N * PIXEL / lowres))
    low = ok & (shell <= n_low)
    filt = np.sqrt(w * low / noise)
    xr, cr = image_from(x * filt), image_from(ca * filt)
    r = np.sqrt(((np.mgrid[:N, :N] - N // 2) ** 2).sum(0))
    mask = np.where(r < radius, 1.0, 0.5 - 0.5 * np.cos(np.pi * (radius + 4.0 - r) / 4.0))
    mask = np.where(r > radius + 4.0, 0.0, mask)
    a_m = (mask * xr * cr).sum() / (mask * cr * cr).sum()
    resid = (mask * (xr - a_m * cr) ** 2).sum()
    n_full = low.sum()
    area = mask.sum()
    dof = max(1.0, n_full * area / N**2)
    # plain: not whitened, the best whole-pixel shift within 3 px, over the whole box
    xp, cp = image_from(x * low), image_from(ca * low)
    plain = (
        max(
            (np.roll(xp, (-dy, -dx), axis=(0, 1)) * cp).sum()
            for dy in range(-3, 4)
            for dx in range(-3, 4)
            if dx * dx + dy * dy <= 9
        )
        / (cp * cp).sum()
    )
    return amp, (resid / (n_full * area) - 1) * math.sqrt(dof / 2), a_m, plain


def test_particle_fit_against_slow_loop(tmp_path):
    rng = np.random.default_rng(0)
    classes = blobs(rng, 2)
    b = 6
    psi = rng.uniform(0, 360, b)
    origin = rng.uniform(-2, 2, (b, 2))
    cls = np.array([1, 2, 1, 2, 1, 2])
    defocus = rng.uniform(8000, 20000, b)
    images = np.stack([
        image_from(exact_spectrum(classes[c - 1], p, (-o[0], -o[1])) * full_ctf(d))
        for c, p, o, d in zip(cls, psi, origin, defocus, strict=True)
    ]) * rng.uniform(0.5, 1.5, (b, 1, 1)) + rng.normal(0, 0.05, (b, N, N))  # fmt: skip
    images[3:] += blobs(rng, 3)  # density the class does not have: a large misfit
    ps = write_set(tmp_path, images, psi, origin, cls, defocus)
    sigma2 = np.linspace(2e-6, 1e-6, N // 2 + 1)
    fit = particle_fit(ps, classes, {1: sigma2}, lowres=20.0, diameter_px=20.0)
    for i in range(b):
        amp, mis, low, plain = slow_fit(images[i], classes[cls[i] - 1], psi[i], origin[i],
                                        defocus[i], sigma2, 20.0, 10.0)  # fmt: skip
        assert fit["amplitude"].iloc[i] == pytest.approx(amp, rel=0.02), i
        assert fit["amplitude_low"].iloc[i] == pytest.approx(low, rel=0.02), i
        assert fit["amplitude_plain"].iloc[i] == pytest.approx(plain, rel=0.02), i
        assert fit["misfit"].iloc[i] == pytest.approx(mis, rel=0.02, abs=0.15), i
    assert (fit["misfit"].iloc[3:] > 10).all() and (fit["misfit"].iloc[:3] < 2).all()
    # the misfit is the relative excess power on the z scale
    np.testing.assert_allclose(fit["misfit"], fit["excess"] * fit["misfit_unit"], rtol=1e-9)
    # a subset of rows in any order comes back in that order, with the same values
    sub = particle_fit(ps, classes, {1: sigma2}, [4, 1, 3], lowres=20.0, diameter_px=20.0)
    assert list(sub.index) == [4, 1, 3]
    np.testing.assert_allclose(sub["misfit"], fit["misfit"].loc[[4, 1, 3]], rtol=1e-5)
    from tamis.errors import TamisError

    with pytest.raises(TamisError, match="rows"):
        particle_fit(ps, classes, {1: sigma2}, [1, 1])
    with pytest.raises(TamisError, match="rows"):
        particle_fit(ps, classes, {1: sigma2}, np.ones(b, bool))
    with pytest.raises(TamisError, match="rlnSigma2Noise"):
        particle_fit(ps, classes, {1: sigma2[:5]})
    assert list(fit["class"]) == list(cls)


def test_screen_drops_empty_boxes_and_clumps(tmp_path):
    rng = np.random.default_rng(1)
    classes = blobs(rng, 2)
    n_real, n_empty, n_clump = 120, 20, 20
    b = n_real + n_empty + n_clump
    kind = np.array(["real"] * n_real + ["empty"] * n_empty + ["clump"] * n_clump)
    psi = rng.uniform(0, 360, b)
    origin = rng.uniform(-2, 2, (b, 2))
    cls = rng.integers(1, 3, b)
    defocus = rng.uniform(10000, 20000, b)
    sigma = 0.08
    images = []
    for i in range(b):
        ctf = full_ctf(defocus[i])
        img = np.zeros((N, N))
        if kind[i] != "empty":
            img += image_from(exact_spectrum(classes[cls[i] - 1], psi[i], tuple(-origin[i])) * ctf)
        if kind[i] == "clump":  # a second particle beside the first
            other = exact_spectrum(classes[2 - cls[i]], rng.uniform(0, 360), (9.0, -6.0))
            img += image_from(other * ctf)
        images.append(img + rng.normal(0, sigma, (N, N)))
    ps = write_set(tmp_path, np.stack(images), psi, origin, cls, defocus)
    # white noise of std sigma: E|X(k)|² = sigma² / N² per Fourier pixel
    sigma2 = np.full(N // 2 + 1, sigma**2 / N**2)
    fit = particle_fit(ps, classes, {1: sigma2}, diameter_px=26.0)
    real = kind == "real"
    assert np.median(fit["amplitude"][real]) == pytest.approx(1.0, abs=0.1)
    keep = screen_particles(fit, ScreenOptions())
    assert keep[real].mean() >= 0.95
    assert keep[kind == "empty"].mean() <= 0.1
    assert keep[kind == "clump"].mean() <= 0.1
    # too few particles to judge: all kept
    assert screen_particles(fit.iloc[:10], ScreenOptions()).all()


def test_screen_options_are_checked():
    from tamis.errors import TamisError

    with pytest.raises(TamisError, match="screen_min_amplitude"):
        ScreenOptions(min_amplitude=1.5)
    with pytest.raises(TamisError, match="screen_max_misfit"):
        ScreenOptions(max_misfit=0)
    with pytest.raises(TamisError, match="screen_min_plain_amplitude"):
        ScreenOptions(min_plain_amplitude=1.0)


def _slow_excess_cut(values, centre, spread, near, far, upper):
    """Reference: try every allowed cut, count clean dropped and outliers kept from the
    symmetric normal core, one cut at a time."""
    from math import erf, sqrt

    sign = 1.0 if upper else -1.0
    y = [sign * (v - centre) / spread for v in values]
    lo, hi = sign * (near - centre) / spread, sign * (far - centre) / spread
    if lo >= hi:
        return far
    n_clean = min(len(y), 2 * sum(1 for v in y if v <= 0))
    n_out = len(y) - n_clean
    best, best_cost = None, None
    for cut in [lo] + sorted(v for v in y if lo < v < hi) + [hi]:
        dropped = sum(1 for v in y if v > cut)
        clean_dropped = n_clean * 0.5 * (1 - erf(cut / sqrt(2)))
        junk_kept = n_out - (dropped - clean_dropped)
        cost = clean_dropped + junk_kept
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = cut, cost
    return centre + sign * best * spread


@pytest.mark.parametrize("upper", [True, False])
def test_excess_threshold_matches_slow_reference(upper):
    from tamis.rank.screen import excess_threshold

    rng = np.random.default_rng(3)
    sign = 1 if upper else -1
    for trial in range(5):
        clean = rng.normal(0.2, 1.3, 300)
        junk = 0.2 + sign * rng.uniform(2, 9, int(rng.integers(0, 60)))
        values = np.concatenate([clean, junk])
        near, far = 0.2 + sign * 1.3 * 2.0, 0.2 + sign * 1.3 * 6.0
        got = excess_threshold(values, 0.2, 1.3, near, far, upper=upper)
        want = _slow_excess_cut(values, 0.2, 1.3, near, far, upper)
        assert got == pytest.approx(want, abs=1e-9), trial


def test_adaptive_screen_finds_the_junk_tail_and_spares_clean_data():
    from tamis.rank.screen import core_of

    rng = np.random.default_rng(5)
    n = 2000
    clean_mis = rng.normal(-2.5, 1.0, n)
    # a job without junk: almost nothing dropped (the cut stays at min_misfit spreads or beyond)
    fit = pd.DataFrame({"amplitude": rng.normal(1.0, 0.12, n), "misfit": clean_mis,
                        "class": rng.integers(1, 5, n)})  # fmt: skip
    assert screen_particles(fit, ScreenOptions()).mean() > 0.995
    # 15% clumps whose misfit sits 3.5-7 above the core (under the fixed rule's 5 SDs for
    # many of them) and 5% empty boxes at 0.3-0.7 of the class median
    n_clump, n_empty = 300, 100
    mis = np.concatenate([clean_mis, rng.uniform(1.0, 4.5, n_clump), rng.normal(-2.5, 1, n_empty)])
    amp = np.concatenate([rng.normal(1.0, 0.12, n + n_clump), rng.uniform(0.3, 0.7, n_empty)])
    kind = np.array(["real"] * n + ["clump"] * n_clump + ["empty"] * n_empty)
    fit = pd.DataFrame({"amplitude": amp, "misfit": mis, "class": rng.integers(1, 5, len(amp))})
    centre, spread = core_of(mis, upper=True, floor=1.0)
    assert centre == pytest.approx(-2.5, abs=0.15) and spread == pytest.approx(1.0, abs=0.1)
    adaptive = screen_particles(fit, ScreenOptions())
    fixed = screen_particles(fit, ScreenOptions(adaptive=False))
    assert adaptive[kind == "real"].mean() > 0.98
    assert adaptive[kind == "clump"].mean() < 0.2 < fixed[kind == "clump"].mean()
    assert adaptive[kind == "empty"].mean() < 0.5
    from tamis.errors import TamisError

    with pytest.raises(TamisError, match="screen_min_misfit"):
        ScreenOptions(min_misfit=6.0)


def test_cuts_from_sets_the_cuts_and_judges_every_row():
    """The cuts come from the ``cuts_from`` rows alone (the chosen classes) and apply to every
    row: a class of carbon-like misfits left out of the choice does not move the cut, and its
    particles fail it; the chosen rows get exactly the verdict they get screened alone."""
    rng = np.random.default_rng(8)
    n = 1500
    chosen = pd.DataFrame({"amplitude": rng.normal(1.0, 0.12, n),
                           "misfit": rng.normal(-2.0, 1.0, n), "class": rng.integers(1, 4, n)})  # fmt: skip
    carbon = pd.DataFrame({"amplitude": rng.normal(1.0, 0.12, 400),
                           "misfit": rng.normal(12.0, 4.0, 400), "class": 4})  # fmt: skip
    both = pd.concat([chosen, carbon], ignore_index=True)
    base = np.arange(len(both)) < n
    alone = screen_particles(chosen, ScreenOptions())
    keep = screen_particles(both, ScreenOptions(), cuts_from=base)
    np.testing.assert_array_equal(keep[:n], alone)
    assert both.attrs["cuts"]["misfit"] == chosen.attrs["cuts"]["misfit"]
    assert keep[n:].mean() < 0.05
    # screened all together, the carbon class drags the cut up (the rule sees a junk tail of
    # 21%, not a foreign class); the chosen rows' verdict differs
    together = screen_particles(both.copy(), ScreenOptions())
    assert together.sum() != keep.sum()
    with pytest.raises(TamisError, match="cuts_from"):
        screen_particles(both, ScreenOptions(), cuts_from=base[:10])
    # too few rows to set cuts: everything kept
    few = np.zeros(len(both), bool)
    few[:5] = True
    assert screen_particles(both, ScreenOptions(), cuts_from=few).all()


def test_passing_shares_against_a_loop():
    from tamis.rank.select import passing_shares

    rng = np.random.default_rng(3)
    cls = rng.integers(0, 8, 500)  # 0 and 7: numbers a 6-class job does not have
    passed = rng.random(500) < 0.7
    got = passing_shares(cls, passed, 6)
    for c in range(1, 7):
        members = cls == c
        want = passed[members].mean() if members.any() else np.nan
        np.testing.assert_allclose(got[c - 1], want)
    assert np.isnan(passing_shares(np.array([1, 1]), np.array([True, False]), 3)[1:]).all()


def test_selection_scores_scale_by_the_passing_share():
    from tamis.rank.select import CLEAN_SHARE_GOOD, selection_scores

    scores = np.array([0.8, 0.8, 0.6, -999.0, 0.5, 0.7, -0.4, -0.1])
    clean = np.array([1.0, 0.0, CLEAN_SHARE_GOOD / 2, 0.3, np.nan, 0.9, 0.0, 1.0])
    np.testing.assert_allclose(
        selection_scores(scores, clean), [0.8, 0.0, 0.3, -999.0, 0.5, 0.7, -0.8, -0.1]
    )  # a negative score moves down too: a failing class never overtakes a clean one


def test_adaptive_amplitude_cut_moves_below_min_amplitude_for_a_broad_core():
    """Particles whose amplitudes spread widely around their class median (faint averages,
    varied contrast): min_amplitude alone would drop a quarter of them; the adaptive cut drops
    few, and still takes empty boxes that stand out below the core."""
    rng = np.random.default_rng(11)
    n = 3000
    amp = rng.normal(1.0, 0.5, n)
    mis = rng.normal(-2.5, 1.0, n)
    fit = pd.DataFrame({"amplitude": amp, "misfit": mis, "class": rng.integers(1, 4, n)})
    fixed = screen_particles(fit, ScreenOptions(adaptive=False, max_misfit=np.inf))
    assert fixed.mean() < 0.85  # 0.6 x the median is 0.8 SD under it: ~20% dropped
    adaptive = screen_particles(fit, ScreenOptions())
    assert adaptive.mean() > 0.96
    assert fit.attrs["cuts"]["amplitude"] < 0.6
    # 20% empty boxes near zero amplitude: most go, the particles stay
    n_empty = 750
    amp2 = np.concatenate([amp, np.abs(rng.normal(0.0, 0.08, n_empty))])
    mis2 = np.concatenate([mis, rng.normal(-2.5, 1.0, n_empty)])
    kind = np.array(["real"] * n + ["empty"] * n_empty)
    fit2 = pd.DataFrame({"amplitude": amp2, "misfit": mis2,
                         "class": rng.integers(1, 4, len(amp2))})  # fmt: skip
    keep = screen_particles(fit2, ScreenOptions())
    assert keep[kind == "empty"].mean() < 0.2
    assert keep[kind == "real"].mean() > 0.9


def test_plain_amplitude_cut_drops_empty_boxes_the_whitened_amplitude_passes():
    """Empty boxes whose whitened amplitude looks like the particles' (texture fitted as well as
    a particle: denoised images) but whose plain low-resolution amplitude is low: kept without
    the plain cut, dropped with it (the default), and the particles stay."""
    rng = np.random.default_rng(12)
    n, n_empty = 600, 150
    kind = np.array(["real"] * n + ["empty"] * n_empty)
    fit = pd.DataFrame({
        "amplitude": rng.normal(1.0, 0.2, n + n_empty),
        "misfit": rng.normal(-2.5, 1.0, n + n_empty),
        "amplitude_plain": np.concatenate([rng.normal(1.0, 0.15, n), rng.normal(0.2, 0.1, n_empty)]),
        "class": rng.integers(1, 4, n + n_empty),
    })  # fmt: skip
    off = ScreenOptions(min_plain_amplitude=0)
    assert screen_particles(fit, off)[kind == "empty"].mean() > 0.9
    keep = screen_particles(fit, ScreenOptions(min_plain_amplitude=0.5))
    assert keep[kind == "empty"].mean() < 0.05 and keep[kind == "real"].mean() > 0.98
    # a class whose median is its own: a class of faint particles is not dropped as a whole
    faint = fit.copy()
    faint.loc[faint["class"] == 1, "amplitude_plain"] *= 0.3
    keep = screen_particles(faint, ScreenOptions(min_plain_amplitude=0.5))
    assert keep[(kind == "real") & (faint["class"] == 1).to_numpy()].mean() > 0.9
    # without the column (a fit made elsewhere): the other rules alone
    without = screen_particles(fit.drop(columns="amplitude_plain"), ScreenOptions())
    assert without[kind == "empty"].mean() > 0.9


def test_realign_recovers_stale_poses(tmp_path):
    """Stored poses off by a psi step multiple and whole pixels (as VDAM leaves them): the
    re-alignment finds the true pose again, and at the true pose its amplitude is the one the
    stored-pose path gives."""
    rng = np.random.default_rng(7)
    classes = blobs(rng, 2)
    b = 24
    psi = rng.uniform(0, 360, b)
    origin = rng.uniform(-2, 2, (b, 2))
    cls = rng.integers(1, 3, b)
    defocus = rng.uniform(10000, 20000, b)
    images = np.stack([
        image_from(exact_spectrum(classes[cls[i] - 1], psi[i], tuple(-origin[i])) * full_ctf(defocus[i]))
        + rng.normal(0, 0.01, (N, N))
        for i in range(b)
    ])  # fmt: skip
    sigma2 = np.full(N // 2 + 1, 0.01**2 / N**2)
    truth = particle_fit(
        write_set(tmp_path, images, psi, origin, cls, defocus), classes, {1: sigma2}
    )
    # stale: psi off by -30 degrees (a multiple of the 6-degree search step), origin by whole px
    off = rng.integers(-2, 3, (b, 2))
    stale = write_set(tmp_path, images, psi - 30.0, origin + off, cls, defocus)
    bad = particle_fit(stale, classes, {1: sigma2})
    assert np.median(bad["amplitude"]) < 0.7
    fixed = particle_fit(stale, classes, {1: sigma2}, realign=(6.0, 4.0))
    np.testing.assert_allclose(fixed["amplitude"], truth["amplitude"], rtol=1e-3)
    np.testing.assert_allclose(fixed["misfit"], truth["misfit"], rtol=1e-3, atol=1e-3)
    # the plain amplitude, re-aligned on its own (psi too), finds the true pose's value
    np.testing.assert_allclose(fixed["amplitude_plain"], truth["amplitude_plain"], rtol=1e-3)
    assert np.median(bad["amplitude_plain"]) < 0.9 * np.median(truth["amplitude_plain"])
    dpsi = (fixed["psi"].to_numpy() - psi + 180) % 360 - 180
    np.testing.assert_allclose(dpsi, 0.0, atol=1e-6)
    # the stored origin moved the class by -origin; re-alignment moves it back by the offset
    np.testing.assert_array_equal(fixed[["shift_x", "shift_y"]].to_numpy(), off)


def test_cli_screen_defaults_are_the_library_defaults():
    import inspect

    from tamis.cli.rank import select

    d = ScreenOptions()
    params = inspect.signature(select).parameters
    assert params["screen_min_misfit"].default.default == d.min_misfit
    assert params["screen_max_misfit"].default.default == d.max_misfit
    assert params["screen_min_amplitude"].default.default == d.min_amplitude
    assert params["screen_min_plain_amplitude"].default.default == d.min_plain_amplitude
    assert params["screen_local_neighbours"].default.default == d.local_neighbours
    assert params["screen_class_shift"].default.default == d.class_shift


def test_a_blank_class_average_leaves_its_particles_statistics_undefined(tmp_path):
    """A class average of zeros has no scale to fit: every statistic of its particles is NaN
    (and the screen keeps them), while the other class's particles get numbers."""
    rng = np.random.default_rng(3)
    classes = blobs(rng, 2)
    classes[1] = 0.0
    b = 4
    cls = np.array([1, 2, 1, 2])
    images = rng.normal(0, 1.0, (b, N, N)) + classes[0] * (cls == 1)[:, None, None]
    ps = write_set(tmp_path, images, np.zeros(b), np.zeros((b, 2)), cls, np.full(b, 12000.0))
    sigma2 = np.linspace(2e-6, 1e-6, N // 2 + 1)
    fit = particle_fit(ps, classes, {1: sigma2}, lowres=20.0, diameter_px=20.0)
    stats = ["amplitude", "misfit", "amplitude_low", "amplitude_plain"]
    assert fit.loc[cls == 2, stats].isna().all().all()
    assert fit.loc[cls == 1, stats].notna().all().all()


def _slow_local(mic, xy, excess, unit, k):
    """The local misfit by a loop: per box, the median and the normal-consistent median
    deviation of the excess of its k nearest other boxes on its micrograph (fewer when the
    micrograph has fewer); a z-score against them where that median is above zero."""
    out = excess * unit
    for i in range(len(mic)):
        others = [j for j in range(len(mic)) if j != i and mic[j] == mic[i]]
        d = [float(np.hypot(*(xy[j] - xy[i]))) for j in others]
        near = excess[[others[j] for j in np.argsort(d, kind="stable")[:k]]]
        if len(near) and np.median(near) > 0:
            b = float(np.median(near))
            s = 1.4826 * float(np.median(np.abs(near - b)))
            out[i] = (excess[i] - b) / max((1 + b) / unit[i], s)
    return out


def test_local_misfit_against_a_loop_and_its_use_by_the_screen():
    from tamis.rank.screen import local_misfit

    rng = np.random.default_rng(11)
    n = 400
    # two micrographs; on the first, boxes with x > 2000 lie on carbon film (excess ~1.5)
    mic = np.where(np.arange(n) < 300, "mic_1.mrc", "mic_2.mrc")
    xy = rng.uniform(0, 4000, (n, 2))
    on_film = (mic == "mic_1.mrc") & (xy[:, 0] > 2000)
    unit = np.full(n, 6.0)
    excess = rng.normal(-0.3, 0.15, n) + np.where(on_film, 1.8, 0.0)
    blobs_at = np.flatnonzero(~on_film)[:10]  # ice or clumps among clean boxes
    excess[blobs_at] += 3.0
    order = rng.permutation(n)[:380]  # the fit's rows: a subset, in any order
    table = pd.DataFrame({"rlnMicrographName": mic, "rlnCoordinateX": xy[:, 0],
                          "rlnCoordinateY": xy[:, 1]})  # fmt: skip
    fit = pd.DataFrame({"excess": excess[order], "misfit_unit": unit[order],
                        "misfit": excess[order] * unit[order]}, index=order)  # fmt: skip
    local = local_misfit(fit, table, 10)
    slow = _slow_local(mic[order], xy[order], excess[order], unit[order], 10)
    np.testing.assert_allclose(local, slow, rtol=1e-9, atol=1e-9)
    film = on_film[order]
    # on the film the residual is judged against the film; among clean boxes nothing changes
    # (their neighbours' excess is below zero), and the blobs keep their misfit
    assert np.median(local[film]) < 1.0 < np.median(fit["misfit"][film])
    clean = ~film & ~np.isin(order, blobs_at)
    assert np.mean(local[clean] == fit["misfit"].to_numpy()[clean]) > 0.95
    blob = np.isin(order, blobs_at)
    np.testing.assert_allclose(local[blob], fit["misfit"].to_numpy()[blob])
    # no coordinates, or no neighbours asked for: None
    assert local_misfit(fit, table.drop(columns="rlnCoordinateX"), 6) is None
    assert local_misfit(fit, table, 0) is None
    # the screen cuts on misfit_local when the fit has it (and local_neighbours > 0)
    fit["amplitude"] = 1.0
    fit["class"] = 1
    plain = screen_particles(fit.copy(), ScreenOptions())
    fit["misfit_local"] = local
    with_local = screen_particles(fit.copy(), ScreenOptions())
    off = screen_particles(fit.copy(), ScreenOptions(local_neighbours=0))
    np.testing.assert_array_equal(off, plain)
    assert plain[film].mean() < 0.1 and with_local[film].mean() > 0.9
    assert not with_local[blob].any() and not plain[blob].any()
    with pytest.raises(TamisError, match="local_neighbours"):
        ScreenOptions(local_neighbours=-1)


def test_class_shift_judges_a_mixed_class_by_its_own_core():
    """A chosen class of two conformations that 2D classification did not separate misfits
    more than the selection's core: its cut moves up by the distance of its own core, at most
    ``class_shift`` spreads, so its real particles stay and its clumps still go; a class of
    junk cannot excuse its junk; 0 gives one cut for all classes."""
    from tamis.rank.screen import core_of

    rng = np.random.default_rng(8)
    clean = rng.normal(-3.0, 1.0, 400)  # class 1: particles that look like their class
    mixed = np.concatenate([rng.normal(-3.0, 1.0, 60), rng.normal(1.5, 1.2, 140)])  # class 2
    ice = np.concatenate([rng.normal(-3.0, 1.0, 20), rng.normal(14.0, 2.0, 60)])  # class 3
    clumps = rng.normal(16.0, 2.0, 30)  # in classes 1 and 2
    outside = rng.normal(1.5, 1.0, 40)  # class 4, not chosen: no cut of its own
    mis = np.concatenate([clean, mixed, ice, clumps, outside])
    cls = np.concatenate([np.full(400, 1), np.full(200, 2), np.full(80, 3),
                          np.where(np.arange(30) < 15, 1, 2), np.full(40, 4)])  # fmt: skip
    chosen = cls != 4
    fit = pd.DataFrame({"misfit": mis, "amplitude": 1.0, "class": cls})
    opts = ScreenOptions(class_shift=3.0, min_misfit=3.0)
    keep = screen_particles(fit, opts, cuts_from=chosen)
    cuts = fit.attrs["cuts"]
    one = screen_particles(fit.copy(), replace(opts, class_shift=0.0), cuts_from=chosen)
    # the definition, row by row: the class's own core above the selection's, clipped
    for i in range(len(mis)):
        members = (cls == cls[i]) & chosen
        shift = 0.0
        if members.sum() >= 20:
            own, _ = core_of(mis[members], upper=True, floor=1.0)
            shift = min(max(own - cuts["centre"], 0.0), 3.0 * cuts["spread"])
        assert keep[i] == (mis[i] <= cuts["misfit"] + shift), i
    second = np.zeros(len(mis), bool)
    second[460:600] = True  # the mixed class's second conformation
    assert one[second].mean() < 0.2 and keep[second].mean() > 0.85
    is_clump = np.zeros(len(mis), bool)
    is_clump[680:710] = True
    assert not keep[is_clump].any()
    assert not keep[620:680].any()  # the ice class's ice: its shift is capped
    np.testing.assert_array_equal(keep[cls == 4], one[cls == 4])  # not chosen: one cut
    assert 0 < cuts["class_raise"] <= 3.0
    with pytest.raises(TamisError, match="class_shift"):
        ScreenOptions(class_shift=-1.0)


def test_local_amplitude_level_excuses_faint_surroundings_not_empty_boxes():
    """On a micrograph where extraction made every box fainter (carbon film: each box
    normalised by a noisier background), real particles come out at half their class's
    amplitude, all together; their surroundings' level (the neighbours' median amplitude over
    their class median, clipped to [0.5, 1], where the neighbours' residuals hold more than
    noise) excuses that, while an empty box stays faint among faint and bright neighbours
    alike, and a faint micrograph without texture is not excused."""
    from tamis.rank.screen import local_amplitude_level

    rng = np.random.default_rng(4)
    n = 500
    mic = np.where(np.arange(n) < 150, "mic_1.mrc", "mic_2.mrc")
    xy = rng.uniform(0, 4000, (n, 2))
    faint = mic == "mic_1.mrc"  # the whole first micrograph: half the contrast
    amp = rng.normal(1.0, 0.08, n) * np.where(faint, 0.5, 1.0)
    empty = np.r_[np.flatnonzero(faint)[:8], np.flatnonzero(~faint)[:8]]
    amp[empty] = rng.normal(0.1, 0.03, len(empty))
    cls = rng.integers(1, 4, n)
    order = rng.permutation(n)[:480]
    table = pd.DataFrame({"rlnMicrographName": mic, "rlnCoordinateX": xy[:, 0],
                          "rlnCoordinateY": xy[:, 1]})  # fmt: skip
    excess = np.where(faint, 1.0, -0.2) + rng.normal(0, 0.05, n)  # film on the faint one
    fit = pd.DataFrame({"amplitude": amp[order], "amplitude_plain": amp[order],
                        "misfit": rng.normal(-3, 1, len(order)), "class": cls[order],
                        "excess": excess[order]}, index=order)  # fmt: skip
    levels = local_amplitude_level(fit, table, 10)
    # the definition by a loop: each value over its class median (all rows of the class), the
    # median over the 10 nearest other boxes of the same micrograph, clipped to [0.5, 1]
    ratio = np.array([a / np.median(fit["amplitude"][fit["class"] == c])
                      for a, c in zip(fit["amplitude"], fit["class"], strict=True)])  # fmt: skip
    m, p = mic[order], xy[order]
    for i in range(len(order)):
        others = [j for j in range(len(order)) if j != i and m[j] == m[i]]
        d = [float(np.hypot(*(p[j] - p[i]))) for j in others]
        near = ratio[[others[j] for j in np.argsort(d, kind="stable")[:10]]]
        film = np.median(
            fit["excess"].to_numpy()[[others[j] for j in np.argsort(d, kind="stable")[:10]]]
        )
        want = min(max(float(np.median(near)), 0.5), 1.0) if film > 0 else 1.0
        assert levels["amplitude"][i] == pytest.approx(want, rel=1e-9), i
    np.testing.assert_allclose(levels["amplitude_plain"], levels["amplitude"])
    is_faint, is_empty = faint[order], np.isin(order, empty)
    plain = screen_particles(fit.copy(), ScreenOptions())
    for column, level in levels.items():
        fit[f"{column}_level"] = level
    local = screen_particles(fit.copy(), ScreenOptions())
    off = screen_particles(fit.copy(), ScreenOptions(local_neighbours=0))
    np.testing.assert_array_equal(off, plain)
    real_faint = is_faint & ~is_empty
    assert plain[real_faint].mean() < 0.3 and local[real_faint].mean() > 0.95
    assert not local[is_empty].any()
    assert local[~is_faint & ~is_empty].mean() > 0.95
    # the same faint micrograph without film around its boxes: no excuse
    bare = fit.drop(columns=["amplitude_level", "amplitude_plain_level"])
    bare["excess"] = -0.2
    assert (local_amplitude_level(bare, table, 10)["amplitude"] == 1.0).all()
    # the plain amplitude is divided by its own level: a faint plain amplitude (0.3 of the
    # median, under the 0.35 cut) passes with a plain level of 0.5 and fails with none or with
    # the whitened amplitude's level in its place
    one = fit.drop(columns=["amplitude_level", "amplitude_plain_level"]).assign(amplitude=1.0)
    one["amplitude_plain"] = np.where(is_faint, 0.3, 1.0)
    one["misfit"] = -3.0  # nothing else to fail on
    with_plain = one.assign(amplitude_level=1.0, amplitude_plain_level=np.where(is_faint, 0.5, 1.0))
    swapped = one.assign(amplitude_level=np.where(is_faint, 0.5, 1.0), amplitude_plain_level=1.0)
    assert screen_particles(with_plain, ScreenOptions())[is_faint].all()
    assert not screen_particles(one, ScreenOptions())[is_faint].any()
    assert not screen_particles(swapped, ScreenOptions())[is_faint].any()
    assert local_amplitude_level(fit, table.drop(columns="rlnCoordinateY"), 10) is None
    assert local_amplitude_level(fit, table, 0) is None
