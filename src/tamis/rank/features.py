"""RELION's per-class features for the class ranker (``ClassRanker::getFeatures``) and the 64 x 64
CNN image (``getSubimages``), with the same definitions, order and normalisation constants.

Per class (estimated particle number ``n = fraction x N`` > 10): accuracies from the model,
particle-number-weighted and relative resolution, then on the class image Fourier-resized to
4 A/px: moments of a ring (0.95 R .. R), statistics of the 25-A low-passed image, an automatic
protein mask (4-connected regions of the low-passed image above 5% of its sd that reach the
central disc r <= 0.6 R and cover > 10% of it) and its complement in the circle as solvent,
their moments, the edge and scattered signal, and granulometry (sums of grey-level openings with
discs of radius 1..6). Pixel coordinates are RELION's: index ``N // 2`` is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from tamis.fourier import rescale_images

__all__ = [
    "Moments",
    "ClassFeatures",
    "moments",
    "lowpass_relion",
    "resize_map",
    "protein_solvent_masks",
    "granulo",
    "class_features",
    "cnn_image",
    "feature_vector",
    "network_features",
    "GRANULO_COLUMNS",
    "GLOBAL_MEAN",
    "GLOBAL_STD",
    "UNIFORM_ANGPIX",
    "IMAGE_SCALES",
    "JOB_IMAGE_SD",
    "job_intensity_scale",
]

UNIFORM_ANGPIX = 4.0

#: How class images enter the features and the network: ``absolute`` as the 2D job wrote them
#: (RELION's ranker; a class average's brightness then depends on the particle's size, the
#: binning and the dose), or ``job``: every class image of a job multiplied by one factor that
#: brings the job's particle-weighted mean class contrast to ``JOB_IMAGE_SD`` (the classes keep
#: their brightness relative to each other).
IMAGE_SCALES = ("absolute", "job")
#: The job unit's target: about the median of tamis's training jobs in absolute units.
JOB_IMAGE_SD = 0.6
LOWPASS = 25.0
RADIUS_RATIO = 0.95

#: RELION's normalisation constants for features 0-20 (``classFeatures::toNormalizedVector``).
GLOBAL_MEAN = np.array(
    [4.352, 3.871, 0.001, 0.061, -0.199, 0.424, 0.744, -0.380, 0.292, 0.024, 0.047, 0.116,
     0.638, -1.112, 2.990, 837.576, 726.097, 602.175, 483.469, 328.014, 196.059]
)  # fmt: skip
GLOBAL_STD = np.array(
    [4.759, 3.019, 0.002, 0.088, 0.283, 0.629, 0.585, 0.378, 0.485, 0.075, 0.075, 0.182,
     0.429, 1.087, 1.758, 1958.823, 2845.330, 3605.858, 4001.972, 4399.578, 4709.751]
)  # fmt: skip


@dataclass
class Moments:
    sum: float = 0.0
    mean: float = 0.0
    stddev: float = 0.0
    skew: float = 0.0
    kurt: float = 0.0


def _radius2(n: int) -> np.ndarray:
    c = np.arange(n) - n // 2
    return (c[:, None] ** 2 + c[None, :] ** 2).astype(np.float64)


def job_intensity_scale(
    images: np.ndarray, weights: np.ndarray, pixel_size: float, diameter: float
) -> float:
    """The factor that brings the ``weights``-weighted mean of the class images' standard
    deviations inside the particle circle (``diameter`` in A) to ``JOB_IMAGE_SD``; 1 when the
    images are flat or no class has weight."""
    n = images.shape[-1]
    radius = min(n / 2.0, diameter / (2.0 * pixel_size))
    inside = _radius2(n) <= radius * radius
    sd = images[:, inside].astype(np.float64).std(axis=1)
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        return 1.0
    mean_sd = float((w * sd).sum() / w.sum())
    return JOB_IMAGE_SD / mean_sd if mean_sd > 1e-12 else 1.0


def moments(img: np.ndarray, inner: float, outer: float, mask: np.ndarray | None = None) -> Moments:
    """RELION's ``calculateMoments``: pixels with ``inner² <= r² <= outer²`` (and in ``mask``);
    population sd, skew ``S3 sqrt(n) / S2^1.5``, kurtosis ``S4 n / S2²`` (not excess)."""
    if mask is not None and mask.sum() == 0:
        return Moments()
    r2 = _radius2(img.shape[0])
    sel = (r2 >= inner * inner) & (r2 <= outer * outer)
    if mask is not None:
        sel &= mask > 0
    v = img[sel].astype(np.float64)
    n = v.size
    if n == 0:
        return Moments()
    mean = v.sum() / n
    d = v - mean
    s2, s3, s4 = (d**2).sum(), (d**3).sum(), (d**4).sum()
    if s2 == 0:
        return Moments(float(v.sum()), float(mean), 0.0, 0.0, 0.0)
    return Moments(
        float(v.sum()), float(mean), math.sqrt(s2 / n), s3 * math.sqrt(n) / s2**1.5, s4 * n / s2**2
    )


def resize_map(img: np.ndarray, size: int) -> np.ndarray:
    """RELION's ``resizeMap`` for square even images: Fourier crop or zero-pad, mean kept."""
    if img.shape[-1] == size:
        return img.astype(np.float64)
    return rescale_images(torch.from_numpy(img.astype(np.float64)), size).numpy()


def lowpass_relion(
    img: np.ndarray, low_pass: float, angpix: float, edge_width: int = 2
) -> np.ndarray:
    """RELION's ``lowPassFilterMap``: raised cosine from shell ``ROUND(N p / lp) - w/2`` to
    ``+ w/2`` (in 1/pixel of the N box)."""
    n = img.shape[0]
    ires = math.floor(n * angpix / low_pass + 0.5)
    half = edge_width // 2
    lo = max(0.0, (ires - half) / n)
    hi = (ires + half) / n
    f = np.fft.rfft2(np.fft.ifftshift(img))
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.rfftfreq(n)[None, :]
    res = np.sqrt(kx * kx + ky * ky)
    filt = np.where(
        res < lo,
        1.0,
        np.where(res > hi, 0.0, 0.5 + 0.5 * np.cos(np.pi * (res - lo) / max(hi - lo, 1e-12))),
    )
    return np.fft.fftshift(np.fft.irfft2(f * filt, s=(n, n)))


def protein_solvent_masks(
    lpf: np.ndarray, radius: float, threshold: float
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """RELION's ``makeSolventMasks`` on the low-passed image ``lpf``: (protein mask, solvent
    mask, scattered signal, protein area)."""
    n = lpf.shape[0]
    r2 = _radius2(n)
    circle = r2 <= radius * radius
    central = r2 <= 0.36 * radius * radius
    white = (lpf > threshold) & circle
    labels, n_lab = ndimage.label(white, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    protein = np.zeros_like(white)
    scattered = 0
    protein_area = 0
    if n_lab:
        idx = np.arange(1, n_lab + 1)
        size = ndimage.sum_labels(np.ones_like(lpf), labels, idx)
        inside = ndimage.sum_labels(central.astype(float), labels, idx)
        limit = 0.1 * 3.14 * 0.36 * radius * radius
        for k, s, c in zip(idx, size, inside, strict=True):
            if c == 0:
                continue  # never reached from the central disc
            if c > limit:
                protein |= labels == k
                protein_area += int(s)
            else:
                scattered += int(s)
    scattered_signal = scattered / (scattered + protein_area + 1)
    solvent = circle & ~protein
    return protein.astype(np.int32), solvent.astype(np.int32), scattered_signal, protein_area


def granulo(img: np.ndarray) -> list[float]:
    """Sums of the grey-level openings (erosion, then dilation) with discs of radius 1..6;
    pixels beyond the image are skipped (RELION's ``calculateGranulo``)."""
    out = []
    for n in range(1, 7):
        yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
        disc = (xx * xx + yy * yy) <= n * n
        ero = ndimage.grey_erosion(img, footprint=disc, mode="constant", cval=np.inf)
        dil = ndimage.grey_dilation(ero, footprint=disc, mode="constant", cval=-np.inf)
        out.append(float(dil.sum()))
    return out


@dataclass
class ClassFeatures:
    class_index: int
    particle_nr: float
    class_distribution: float
    estimated_resolution: float
    accuracy_rotation: float
    accuracy_translation: float
    weighted_resolution: float = 0.0
    relative_resolution: float = 0.0
    ring: Moments = field(default_factory=Moments)
    protein: Moments = field(default_factory=Moments)
    solvent: Moments = field(default_factory=Moments)
    lowpass_stats: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    scattered_signal: float = 0.0
    edge_signal: float = 0.0
    relative_signal_intensity: float = 0.0
    protein_area: int = 0
    granulo: list[float] = field(default_factory=lambda: [0.0] * 6)


def class_features(
    image: np.ndarray,
    *,
    pixel_size: float,
    diameter: float,
    class_index: int,
    fraction: float,
    n_total: int,
    resolution: float,
    acc_rot: float,
    acc_trans: float,
) -> ClassFeatures:
    """Features of one class image ``(N, N)`` at ``pixel_size`` (RELION's getFeatures body)."""
    n = image.shape[0]
    nr = fraction * n_total
    f = ClassFeatures(class_index, nr, fraction, resolution, acc_rot, acc_trans)
    f.weighted_resolution = (1.0 / (resolution * resolution)) / math.log(nr)
    f.relative_resolution = resolution / (n * pixel_size)
    newsize = math.floor(n * (pixel_size / UNIFORM_ANGPIX) + 0.5)
    newsize -= newsize % 2
    img = resize_map(image, newsize)
    radius = min(newsize / 2.0, diameter / (UNIFORM_ANGPIX * 2.0))
    f.ring = moments(img, RADIUS_RATIO * radius, radius)
    lpf = lowpass_relion(img, LOWPASS, UNIFORM_ANGPIX)
    f.lowpass_stats = (float(lpf.mean()), float(lpf.std()), float(lpf.min()), float(lpf.max()))
    p_mask, s_mask, f.scattered_signal, f.protein_area = protein_solvent_masks(
        lpf, radius, 0.05 * f.lowpass_stats[1]
    )
    f.protein = moments(img, 0.0, radius, p_mask)
    f.solvent = moments(img, 0.0, radius, s_mask)
    f.relative_signal_intensity = f.protein.sum - f.solvent.mean * f.protein_area
    r = np.sqrt(_radius2(newsize))
    rim = np.round(r) == round(radius)
    f.edge_signal = float(p_mask[rim].sum()) / max(int(rim.sum()), 1)
    f.granulo = granulo(img)
    return f


def cnn_image(image: np.ndarray, pixel_size: float, diameter: float) -> np.ndarray:
    """The 64 x 64 network input: the centred ``w x w`` window (``w = ceil(d / p) + 1``, made
    even; zero-padded beyond the box) Fourier-resized to 64 (RELION's ``getSubimages``)."""
    n = image.shape[0]
    w = math.ceil(diameter / pixel_size) + 1
    w += w % 2
    win = np.zeros((w, w), dtype=np.float64)
    src0, dst0 = max(n // 2 - w // 2, 0), max(w // 2 - n // 2, 0)
    m = min(n, w)
    win[dst0 : dst0 + m, dst0 : dst0 + m] = image[src0 : src0 + m, src0 : src0 + m]
    return resize_map(win, 64).astype(np.float32)


def feature_vector(all_features: list[ClassFeatures]) -> np.ndarray:
    """``(n_classes, 24)``: features 0-20 standardised with RELION's global constants, 21-23
    (protein sum, solvent sum, relative signal intensity) z-scored over these classes."""
    rows = []
    for f in all_features:
        rows.append(
            [
                f.accuracy_rotation,
                f.accuracy_translation,
                f.weighted_resolution,
                f.relative_resolution,
                f.ring.mean,
                f.ring.stddev,
                f.protein.stddev,
                f.solvent.mean,
                f.solvent.stddev,
                f.scattered_signal,
                f.edge_signal,
                *f.lowpass_stats,
                *f.granulo,
            ]
        )
    glob = (np.array(rows, dtype=np.float64).reshape(-1, 21) - GLOBAL_MEAN) / GLOBAL_STD
    local = np.array(
        [[f.protein.sum, f.solvent.sum, f.relative_signal_intensity] for f in all_features],
        dtype=np.float64,
    ).reshape(-1, 3)
    mu, sd = local.mean(0), local.std(0)
    z = np.where(sd >= 1e-10, (local - mu) / np.where(sd >= 1e-10, sd, 1.0), 0.0)
    return np.concatenate([glob, z], 1).astype(np.float32)


#: Columns of the feature vector holding the six granulometry sums.
GRANULO_COLUMNS = slice(15, 21)


def network_features(vector: np.ndarray) -> np.ndarray:
    """The feature vector as tamis's network sees it, in training and in ranking alike: the six
    granulometry columns zeroed. relion-classranker zeroes them only while training, so RELION's
    published model feeds them at inference through weights that never learnt from them."""
    out = np.array(vector, dtype=np.float32, copy=True)
    out[:, GRANULO_COLUMNS] = 0.0
    return out
