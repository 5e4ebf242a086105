"""Class-ranker features against slow loops written from RELION's C++, and the network's
state-dict layout against RELION's published architecture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tamis.rank.features import (
    GLOBAL_MEAN,
    class_features,
    cnn_image,
    feature_vector,
    granulo,
    lowpass_relion,
    moments,
    protein_solvent_masks,
)
from tamis.rank.network import ClassRankerNet


def test_network_matches_relion_architecture():
    net = ClassRankerNet()
    keys = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    want = {
        "cnn_layers.0.weight": (16, 1, 3, 3),
        "cnn_layers.3.weight": (16, 16, 3, 3),
        "cnn_layers.5.weight": (32, 16, 3, 3),
        "cnn_layers.7.weight": (32, 32, 3, 3),
        "cnn_layers.10.weight": (32, 32, 3, 3),
        "cnn_layers.12.weight": (64, 32, 3, 3),
        "cnn_layers.14.weight": (64, 64, 3, 3),
        "cnn_layers.17.weight": (64, 64, 3, 3),
        "cnn_layers.19.weight": (128, 64, 3, 3),
        "feature_extractor.0.weight": (48, 8192),
        "classifier_images_and_features.1.weight": (48, 72),
        "classifier_images_and_features.4.weight": (1, 48),
        "classifier_images.1.weight": (1, 48),
        "classifier_features.0.weight": (12, 24),
        "classifier_features.3.weight": (1, 12),
    }
    for k, shape in want.items():
        assert keys[k] == shape, k
        assert keys[k.replace("weight", "bias")] == (shape[0],)
    assert len(keys) == 2 * len(want)
    assert sum(p.numel() for p in net.parameters()) == 589_003
    net.eval()
    assert net(torch.zeros(3, 1, 64, 64), torch.zeros(3, 24)).shape == (3, 1)


def test_moments_against_loop():
    g = np.random.default_rng(0)
    img = g.standard_normal((16, 16))
    mask = (g.random((16, 16)) > 0.5).astype(int)
    m = moments(img, 2.0, 6.5, mask)
    vals = []
    for i in range(16):
        for j in range(16):
            y, x = i - 8, j - 8
            if 4.0 <= y * y + x * x <= 6.5**2 and mask[i, j] > 0:
                vals.append(img[i, j])
    v = np.array(vals)
    d = v - v.mean()
    assert m.sum == pytest.approx(v.sum()) and m.stddev == pytest.approx(np.sqrt((d**2).mean()))
    assert m.skew == pytest.approx((d**3).sum() * np.sqrt(len(v)) / (d**2).sum() ** 1.5)
    assert m.kurt == pytest.approx((d**4).sum() * len(v) / (d**2).sum() ** 2)
    assert moments(img, 0, 5, np.zeros((16, 16), int)).sum == 0.0


def _relion_flood_fill(lpf, radius, thr):
    """Literal transcription of makeSolventMasks' scan and 4-connected flood fill."""
    n = lpf.shape[0]
    o = n // 2
    visited = np.zeros((n, n), bool)
    p_mask = np.zeros((n, n), int)
    protein_area, scattered = 0, 0
    for i in range(-o, n - o):
        for j in range(-o, n - o):
            if i * i + j * j <= 0.36 * radius * radius and not visited[i + o, j + o]:
                visited[i + o, j + o] = True
                if lpf[i + o, j + o] > thr:
                    island, stack, inside = [(i, j)], [(i, j)], 1
                    while stack:
                        cy, cx = stack.pop()
                        for dy, dx in ((0, -1), (0, 1), (-1, 0), (1, 0)):
                            y, x = cy + dy, cx + dx
                            if -o <= y < n - o and -o <= x < n - o:
                                if y * y + x * x <= radius * radius and not visited[y + o, x + o]:
                                    visited[y + o, x + o] = True
                                    if lpf[y + o, x + o] > thr:
                                        stack.append((y, x))
                                        island.append((y, x))
                                        if y * y + x * x <= 0.36 * radius * radius:
                                            inside += 1
                    if inside > 0.1 * 3.14 * 0.36 * radius * radius:
                        protein_area += len(island)
                        for y, x in island:
                            p_mask[y + o, x + o] = 1
                    else:
                        scattered += len(island)
    return p_mask, scattered / (scattered + protein_area + 1), protein_area


def test_protein_mask_against_relion_flood_fill():
    g = np.random.default_rng(1)
    n = 40
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    img = np.exp(-(yy**2 + (xx - 2) ** 2) / 30.0) + 0.6 * np.exp(
        -((yy - 12) ** 2 + (xx + 9) ** 2) / 4.0
    )
    img += 0.15 * g.standard_normal((n, n))
    for radius in (15.0, 19.0):
        p, s, scat, area = protein_solvent_masks(img, radius, 0.3)
        p_ref, scat_ref, area_ref = _relion_flood_fill(img, radius, 0.3)
        assert np.array_equal(p, p_ref) and area == area_ref
        assert scat == pytest.approx(scat_ref)
        circle = (yy**2 + xx**2) <= radius * radius
        assert np.array_equal(s, (circle & (p_ref == 0)).astype(int))


def test_granulo_against_loop():
    g = np.random.default_rng(2)
    img = g.standard_normal((16, 16))
    got = granulo(img)
    m, big = img.min(), img.max()
    for n in (1, 3):
        se = [
            (dy, dx)
            for dy in range(-n, n + 1)
            for dx in range(-n, n + 1)
            if dy * dy + dx * dx <= n * n
        ]
        ero = np.empty_like(img)
        for y in range(16):
            for x in range(16):
                ero[y, x] = min(
                    [img[y + dy, x + dx] for dy, dx in se if 0 <= y + dy < 16 and 0 <= x + dx < 16]
                    + [big]
                )
        total = 0.0
        for y in range(16):
            for x in range(16):
                total += max(
                    [ero[y + dy, x + dx] for dy, dx in se if 0 <= y + dy < 16 and 0 <= x + dx < 16]
                    + [m]
                )
        assert got[n - 1] == pytest.approx(total)


def test_lowpass_against_loop():
    g = np.random.default_rng(3)
    n = 24
    img = g.standard_normal((n, n))
    out = lowpass_relion(img, 25.0, 4.0)
    f = np.fft.fft2(img)
    ires = math.floor(n * 4.0 / 25.0 + 0.5)
    lo, hi = (ires - 1) / n, (ires + 1) / n
    for a in range(n):
        for b in range(n):
            ky = a if a <= n // 2 else a - n
            kx = b if b <= n // 2 else b - n
            r = math.hypot(kx, ky) / n
            w = (
                1.0
                if r < lo
                else 0.0
                if r > hi
                else 0.5 + 0.5 * math.cos(math.pi * (r - lo) / (hi - lo))
            )
            f[a, b] *= w
    want = np.fft.ifft2(f).real
    np.testing.assert_allclose(out, want, atol=1e-10)


def test_class_features_and_vector():
    n, p = 64, 2.5
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    disc = np.exp(-(yy**2 + xx**2) / 60.0) * 3
    g = np.random.default_rng(4)
    feats = []
    for k, img in enumerate(
        [disc + 0.05 * g.standard_normal((n, n)), 0.05 * g.standard_normal((n, n))]
    ):
        feats.append(
            class_features(
                img,
                pixel_size=p,
                diameter=120.0,
                class_index=k + 1,
                fraction=0.5,
                n_total=1000,
                resolution=10.0,
                acc_rot=3.0,
                acc_trans=2.0,
            )
        )
    good, empty = feats
    assert good.protein_area > 0 and good.protein.mean > good.solvent.mean
    # (a noise image gets a "protein" mask too: the threshold is 5% of its own low-passed sd)
    assert empty.protein.mean < good.protein.mean
    assert good.weighted_resolution == pytest.approx(0.01 / math.log(500))
    assert good.relative_resolution == pytest.approx(10.0 / (64 * 2.5))
    v = feature_vector(feats)
    assert v.shape == (2, 24) and v.dtype == np.float32
    assert v[0, 0] == pytest.approx((3.0 - GLOBAL_MEAN[0]) / 4.759, rel=1e-5)
    np.testing.assert_allclose(v[:, 21:].mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(np.abs(v[:, 21]), 1, atol=1e-5)
    im = cnn_image(disc, p, 120.0)
    assert im.shape == (64, 64) and im.dtype == np.float32
    assert float(im.mean()) == pytest.approx(
        float(disc[32 - 25 : 32 + 25, 32 - 25 : 32 + 25].mean()), rel=1e-6
    )


def test_job_intensity_scale_against_loop():
    from tamis.rank.features import JOB_IMAGE_SD, job_intensity_scale

    g = np.random.default_rng(7)
    n, p, d = 32, 3.0, 70.0
    images = g.standard_normal((4, n, n)) * np.array([0.5, 1.0, 2.0, 4.0])[:, None, None]
    w = np.array([0.1, 0.2, 0.3, 0.4])
    sds = []
    for img in images:
        vals = [img[i, j] for i in range(n) for j in range(n)
                if (i - n // 2) ** 2 + (j - n // 2) ** 2 <= (d / (2 * p)) ** 2]  # fmt: skip
        m = sum(vals) / len(vals)
        sds.append(math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals)))
    want = JOB_IMAGE_SD / (sum(wi * s for wi, s in zip(w, sds, strict=True)) / w.sum())
    assert job_intensity_scale(images, w, p, d) == pytest.approx(want, rel=1e-12)
    # a diameter beyond the box is the box's inscribed circle; flat images or no weight: 1
    assert job_intensity_scale(images, w, p, 1e4) == pytest.approx(
        job_intensity_scale(images, w, p, n * p), rel=1e-12
    )
    assert job_intensity_scale(np.zeros((2, n, n)), [1, 1], p, d) == 1.0
    assert job_intensity_scale(images, np.zeros(4), p, d) == 1.0
