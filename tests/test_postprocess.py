"""Post-processing (relion_postprocess) and mask creation (relion_mask_create) against slow
references written from RELION's loops, and end to end on half maps with a known noise model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tamis.errors import TamisError
from tamis.refine.automask import MaskOptions, create_mask, low_pass_filter
from tamis.refine.postprocess import (
    PostprocessOptions,
    corrected_fsc,
    fit_straight_line,
    other_half,
    postprocess,
    randomize_phases_beyond,
    shell_fsc,
)


def _freq(i: int, n: int) -> int:
    return i if i <= n // 2 else i - n


def slow_fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RELION's getFSC as its loop: every coefficient of the half transform, shell ROUND(|k|)."""
    n = a.shape[0]
    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
    num, d1, d2 = (np.zeros(n // 2 + 1) for _ in range(3))
    for z in range(n):
        for y in range(n):
            for x in range(n // 2 + 1):
                k = math.sqrt(_freq(z, n) ** 2 + _freq(y, n) ** 2 + x * x)
                idx = int(math.floor(k + 0.5))
                if idx >= n // 2 + 1:
                    continue
                u, v = fa[z, y, x], fb[z, y, x]
                num[idx] += (np.conj(u) * v).real
                d1[idx] += abs(u) ** 2
                d2[idx] += abs(v) ** 2
    return num / np.sqrt(d1 * d2)


def test_shell_fsc_matches_relion_loop():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 10, 10))
    b = a + rng.normal(scale=1.5, size=a.shape)
    got = shell_fsc(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, slow_fsc(a, b), rtol=1e-10, atol=1e-12)


def test_randomize_phases_keeps_amplitudes_and_low_shells():
    rng = np.random.default_rng(1)
    n, shell = 16, 4
    v = torch.from_numpy(rng.normal(size=(n, n, n)))
    out = randomize_phases_beyond(v, shell, torch.Generator().manual_seed(3))
    fa, fb = np.fft.rfftn(v.numpy()), np.fft.rfftn(out.numpy())
    kz, ky, kx = np.meshgrid(
        [_freq(i, n) for i in range(n)],
        [_freq(i, n) for i in range(n)],
        np.arange(n // 2 + 1),
        indexing="ij",
    )
    inside = kz**2 + ky**2 + kx**2 < shell**2
    np.testing.assert_allclose(fb[inside], fa[inside], atol=1e-9)
    # off the kx = 0 and Nyquist planes (which the inverse transform makes Hermitian), every
    # amplitude is kept and the phases beyond the shell are new
    free = (~inside) & (kx > 0) & (kx < n // 2)
    np.testing.assert_allclose(np.abs(fb[free]), np.abs(fa[free]), rtol=1e-9)
    dphi = np.angle(fb[free] / fa[free])
    assert np.mean(np.abs(dphi) > 0.1) > 0.9
    # uniform phases: the mean resultant length of the phase changes is ~ 1/sqrt(N)
    assert abs(np.mean(np.exp(1j * dphi))) < 5 / math.sqrt(free.sum())


def test_corrected_fsc_formula():
    rng = np.random.default_rng(2)
    masked = rng.uniform(-0.1, 1, size=20)
    random = rng.uniform(-0.1, 0.6, size=20)
    masked[0], random[0] = -0.5, 0.0  # RELION sets shell-0 values <= 0 to 1
    at = 6
    got = corrected_fsc(torch.from_numpy(masked), torch.from_numpy(random), at).numpy()
    m, r = masked.copy(), random.copy()
    m[0], r[0] = 1.0, 1.0
    for i in range(20):
        want = m[i] if i < at + 2 else (m[i] - r[i]) / (1 - r[i])
        assert got[i] == pytest.approx(want, rel=1e-12)


def test_fit_straight_line_as_relion():
    x = np.linspace(0, 1, 30)
    y = 2.5 - 7.0 * x + np.sin(40 * x) * 0.01
    w = (x > 0.2).astype(float)
    slope, intercept, r2 = fit_straight_line(x, y, w)
    ref = np.polyfit(x[w > 0], y[w > 0], 1)
    assert slope == pytest.approx(ref[0], rel=1e-9)
    assert intercept == pytest.approx(ref[1], rel=1e-9)
    assert r2 == pytest.approx(np.corrcoef(x[w > 0], y[w > 0])[0, 1] ** 2, rel=1e-9)


def _map_with_bfactor(n: int, pixel: float, b0: float, seed: int) -> np.ndarray:
    """Random phases, amplitudes exp(-b0 / 4 s^2): ln|F| is a line of slope -b0 / 4 in s^2."""
    rng = np.random.default_rng(seed)
    kz, ky, kx = np.meshgrid(
        [_freq(i, n) for i in range(n)],
        [_freq(i, n) for i in range(n)],
        np.arange(n // 2 + 1),
        indexing="ij",
    )
    s2 = (kz**2 + ky**2 + kx**2) / (n * pixel) ** 2
    spec = np.exp(-b0 / 4 * s2) * np.exp(2j * np.pi * rng.random(s2.shape))
    return np.fft.irfftn(spec, s=(n, n, n), axes=(0, 1, 2))


def test_guinier_fit_recovers_a_known_bfactor():
    n, pixel, b0 = 48, 1.0, 120.0
    m = _map_with_bfactor(n, pixel, b0, seed=4)
    rng = np.random.default_rng(5)
    noise = 1e-4 * m.std()
    h1 = m + rng.normal(scale=noise, size=m.shape)
    h2 = m + rng.normal(scale=noise, size=m.shape)
    res = postprocess(torch.from_numpy(h1), torch.from_numpy(h2), pixel)
    # the map is blurred by B = 120: sharpening applies -120 (4 x the Guinier slope)
    assert res.bfactor == pytest.approx(-b0, rel=0.03)
    assert res.fit_r2 > 0.98
    # sharpened: the Guinier plot of the result is flat between 10 A and Nyquist
    g = res.guinier
    sel = (g["rlnResolutionSquared"] >= 0.01) & (g["rlnResolutionSquared"] < 0.24)
    flat = g.loc[sel, "rlnLogAmplitudesSharpened"].to_numpy()
    assert np.ptp(flat) < 0.15


def _half_maps(n: int, seed: int, noise: float):
    """A blob-like structure (sum of Gaussians inside a sphere) and two half maps with
    independent white noise: the expected FSC per shell is S / (S + N) of the shell powers."""
    rng = np.random.default_rng(seed)
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    truth = np.zeros((n, n, n))
    for _ in range(40):
        p = rng.normal(scale=n / 8, size=3)
        truth += np.exp(-((z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2) / (2 * 1.2**2))
    h1 = truth + rng.normal(scale=noise, size=truth.shape)
    h2 = truth + rng.normal(scale=noise, size=truth.shape)
    return truth, h1, h2


def _expected_fsc(truth: np.ndarray, noise: float) -> np.ndarray:
    n = truth.shape[0]
    ft = np.fft.rfftn(truth)
    s = np.zeros(n // 2 + 1)
    cnt = np.zeros(n // 2 + 1)
    kz, ky, kx = np.meshgrid(
        [_freq(i, n) for i in range(n)],
        [_freq(i, n) for i in range(n)],
        np.arange(n // 2 + 1),
        indexing="ij",
    )
    idx = np.floor(np.sqrt(kz**2 + ky**2 + kx**2) + 0.5).astype(int)
    keep = idx < n // 2 + 1
    np.add.at(s, idx[keep], np.abs(ft[keep]) ** 2)
    np.add.at(cnt, idx[keep], 1)
    nn = noise**2 * n**3 * cnt  # white noise power per coefficient: sigma^2 n^3
    return s / (s + nn)


def test_postprocess_end_to_end_against_the_noise_model(tmp_path):
    n, pixel, noise = 40, 2.0, 0.35
    truth, h1, h2 = _half_maps(n, seed=6, noise=noise)
    expected = _expected_fsc(truth, noise)
    exp_shell = int(np.nonzero(expected[1:] < 0.143)[0][0])  # last shell at or above 0.143
    # unmasked: the resolution follows the expected FSC within a shell
    res = postprocess(torch.from_numpy(h1), torch.from_numpy(h2), pixel)
    got_shell = n * pixel / res.resolution
    assert abs(got_shell - exp_shell) <= 1.5
    # masked: a mask from the (low-passed) average raises the FSC (less noise inside), and the
    # phase-randomised FSC beyond the randomisation shell is near zero
    mask = create_mask(
        torch.from_numpy((h1 + h2) / 2), pixel,
        MaskOptions(lowpass=10, ini_threshold=0.3, extend_inimask=2, width_soft_edge=4),
    )  # fmt: skip
    assert 0.02 < float((mask > 0.5).double().mean()) < 0.6
    resm = postprocess(torch.from_numpy(h1), torch.from_numpy(h2), pixel, mask)
    assert not resm.mask_ignored
    assert resm.resolution <= res.resolution
    fsc = resm.fsc
    at = int(round(n * pixel / resm.randomize_from))
    far = fsc["rlnSpectralIndex"] >= at + 5  # a few shells on: the mask spreads the cut
    rnd = fsc.loc[far, "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"]
    assert float(rnd.abs().max()) < 0.2
    for col in (
        "rlnFourierShellCorrelationCorrected",
        "rlnFourierShellCorrelationUnmaskedMaps",
        "rlnFourierShellCorrelationMaskedMaps",
        "rlnFourierShellCorrelationParticleMaskFraction",
    ):
        assert col in fsc


def test_run_postprocess_files_and_errors(tmp_path):
    import starfile

    from tamis.io.mrc import write_mrc
    from tamis.refine.postprocess import run_postprocess

    n, pixel = 32, 2.5
    _, h1, h2 = _half_maps(n, seed=7, noise=0.3)
    write_mrc(tmp_path / "run_half1_class001_unfil.mrc", h1, pixel)
    write_mrc(tmp_path / "run_half2_class001_unfil.mrc", h2, pixel)
    mask = create_mask(
        torch.from_numpy((h1 + h2) / 2), pixel,
        MaskOptions(lowpass=10, ini_threshold=0.3, extend_inimask=2, width_soft_edge=3),
    )  # fmt: skip
    write_mrc(tmp_path / "mask.mrc", mask.numpy(), pixel)
    res = run_postprocess(
        tmp_path / "run_half1_class001_unfil.mrc",
        tmp_path / "pp" / "postprocess",
        mask=tmp_path / "mask.mrc",
        options=PostprocessOptions(),
    )
    star = starfile.read(tmp_path / "pp" / "postprocess.star", always_dict=True)
    assert set(star) == {"general", "fsc", "guinier"}
    assert float(star["general"]["rlnFinalResolution"]) == pytest.approx(res.resolution)
    assert len(star["fsc"]) == n // 2 + 1
    for name in ("postprocess.mrc", "postprocess_masked.mrc", "postprocess_fsc.png"):
        assert (tmp_path / "pp" / name).stat().st_size > 0
    # errors: one line each, naming the problem
    with pytest.raises(TamisError, match="half1"):
        other_half(tmp_path / "mask.mrc")
    write_mrc(tmp_path / "small.mrc", np.ones((16, 16, 16)), pixel)
    with pytest.raises(TamisError, match="mask is"):
        run_postprocess(
            tmp_path / "run_half1_class001_unfil.mrc", tmp_path / "x", mask=tmp_path / "small.mrc"
        )
    write_mrc(tmp_path / "bad.mrc", 2 * np.ones((n, n, n)), pixel)
    with pytest.raises(TamisError, match=r"\[0, 1\]"):
        run_postprocess(
            tmp_path / "run_half1_class001_unfil.mrc", tmp_path / "x", mask=tmp_path / "bad.mrc"
        )
    same = torch.from_numpy(h1)
    with pytest.raises(TamisError, match="never drops below"):
        postprocess(same, same.clone(), pixel, mask)


def slow_automask(img: np.ndarray, thr: float, extend: float, width: float) -> np.ndarray:
    """RELION's autoMask as its loops (threshold, single-step extension, soft edge)."""
    n = img.shape[0]
    m = (img >= thr).astype(float)
    if extend != 0:
        # extend: a 0-voxel with a 1-voxel closer than extend becomes 1; shrink: a 1-voxel with a
        # 0-voxel closer than |extend| becomes 0 (both against the original binary mask)
        cp = m.copy()
        e = int(abs(math.ceil(extend)))
        src, dst = (0.0, 1.0) if extend > 0 else (1.0, 0.0)
        for k, i, j in np.ndindex(m.shape):
            if cp[k, i, j] != src:
                continue
            for dk, di, dj in np.ndindex(2 * e + 1, 2 * e + 1, 2 * e + 1):
                kp, ip, jp = k + dk - e, i + di - e, j + dj - e
                r2 = (dk - e) ** 2 + (di - e) ** 2 + (dj - e) ** 2
                inside = 0 <= kp < n and 0 <= ip < n and 0 <= jp < n
                if inside and cp[kp, ip, jp] == dst and r2 < extend**2:
                    m[k, i, j] = dst
                    break
    if width > 0:
        cp = m.copy()
        e = math.ceil(width)
        for k, i, j in np.ndindex(m.shape):
            if cp[k, i, j] > 0.5:
                continue
            best = 9999.0
            for dk, di, dj in np.ndindex(2 * e + 1, 2 * e + 1, 2 * e + 1):
                kp, ip, jp = k + dk - e, i + di - e, j + dj - e
                if 0 <= kp < n and 0 <= ip < n and 0 <= jp < n and cp[kp, ip, jp] > 0.5:
                    best = min(best, (dk - e) ** 2 + (di - e) ** 2 + (dj - e) ** 2)
            if best < width**2:
                m[k, i, j] = 0.5 + 0.5 * math.cos(math.pi * math.sqrt(best) / width)
    return m


@pytest.mark.parametrize("extend", [2.0, 1.5, -1.5, 0.0])
def test_automask_matches_relion_loops(extend):
    rng = np.random.default_rng(8)
    n = 12
    img = np.zeros((n, n, n))
    img[3:8, 4:9, 2:7] = 1.0
    img[9, 9, 9] = 1.0
    img += rng.normal(scale=0.05, size=img.shape)
    got = create_mask(
        torch.from_numpy(img), 1.0,
        MaskOptions(lowpass=0, ini_threshold=0.5, extend_inimask=extend, width_soft_edge=2.5),
    ).numpy()  # fmt: skip
    np.testing.assert_allclose(got, slow_automask(img, 0.5, extend, 2.5), atol=1e-12)


def test_low_pass_filter_is_relions_raised_cosine():
    rng = np.random.default_rng(9)
    n, pixel, res = 16, 2.0, 8.0
    v = rng.normal(size=(n, n, n))
    out = low_pass_filter(torch.from_numpy(v), pixel, res).numpy()
    fa, fb = np.fft.rfftn(v), np.fft.rfftn(out)
    ires = round(n * pixel / res)
    lo, hi = (ires - 1) / n, (ires + 1) / n
    for z, y, x in np.ndindex(fa.shape):
        r = math.sqrt(_freq(z, n) ** 2 + _freq(y, n) ** 2 + x * x) / n
        f = (
            1.0
            if r < lo
            else 0.0
            if r > hi
            else 0.5 + 0.5 * math.cos(math.pi * (r - lo) / (hi - lo))
        )
        if 0 < x < n // 2:  # off the planes the inverse transform makes Hermitian
            assert fb[z, y, x] == pytest.approx(f * fa[z, y, x], abs=1e-9)


def test_postprocess_and_maskcreate_jobs(tmp_path, monkeypatch):
    from tamis.io.mrc import write_mrc
    from tamis.pipeline.job import JobStar, read_output_nodes
    from tamis.pipeline.jobs import run_job

    monkeypatch.chdir(tmp_path)
    n, pixel = 32, 2.5
    _, h1, h2 = _half_maps(n, seed=10, noise=0.3)
    (tmp_path / "Refine3D/job010").mkdir(parents=True)
    write_mrc("Refine3D/job010/run_half1_class001_unfil.mrc", h1, pixel)
    write_mrc("Refine3D/job010/run_half2_class001_unfil.mrc", h2, pixel)
    write_mrc("Refine3D/job010/run_class001.mrc", (h1 + h2) / 2, pixel)
    for d, label, opts in (
        ("MaskCreate/job011", "relion.maskcreate",
         {"fn_in": "Refine3D/job010/run_class001.mrc", "lowpass_filter": "10",
          "inimask_threshold": "0.3"}),
        ("PostProcess/job012", "relion.postprocess",
         {"fn_in": "Refine3D/job010/run_half1_class001_unfil.mrc",
          "fn_mask": "MaskCreate/job011/mask.mrc"}),
    ):  # fmt: skip
        job_dir = tmp_path / d
        job_dir.mkdir(parents=True)
        JobStar(label, options=opts).write(job_dir)
        assert run_job(job_dir) == "Succeeded", (job_dir / "run.err").read_text()
        assert read_output_nodes(job_dir)
    assert (tmp_path / "PostProcess/job012/postprocess.star").exists()
