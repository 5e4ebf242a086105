"""A particle generator of another family than tamis's simulator, for measuring class selection
on data it was never trained or tuned on (issue 21). Nothing here is used for training or tuning.

Written apart from ``tamis.simulate`` on purpose: structures are clouds of Gaussian beads
(projected analytically, no volume, no Fourier slice), the CTF is this file's own formula, the
noise is coloured (stronger at low resolution, as ice makes it), every image is normalised by its
own background ring as RELION's extraction does, and the junk is drawn another way:

* ``ice``: a blob cut from a thresholded random field (irregular, not faceted), 1.5-4x the
  median particle's peak density, often off-centre;
* ``carbon``: a curved film edge (an arc of a large circle) with bead texture;
* ``aggregate``: two to four particles and an amorphous cloud of denatured protein;
* ``empty``: background only, half of them with a neighbour entering from the edge.

Structures (``ribosome``, ``ring``, ``rod``, ``globule``) come with random parameters per job:
ribosome-sized particles filling most of the box, rings of 5-9 subunits, elongated rods, small
globules in a large box. Pixel sizes follow from the particle size and the box.

``make_family_job(work, j)`` writes ``work/job_NNN/sim/particles.star`` and
``ground_truth.csv`` (image_name, kind, structure) and returns the job's settings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from tamis.io.mrc import write_mrc
from tamis.io.star import write_star

__all__ = ["make_family_job", "KINDS", "STRUCTURES"]

KINDS = ("ice", "carbon", "aggregate", "empty")
STRUCTURES = ("ribosome", "ring", "rod", "globule")


# ---- structures: bead clouds (positions in A, weights, bead sigma in A) ----------------------


def _blob_cloud(rng: np.random.Generator, n: int, radii: np.ndarray) -> np.ndarray:
    """``n`` points filling an ellipsoid with semi-axes ``radii`` (A), denser towards the centre."""
    p = rng.normal(size=(n, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    r = rng.random(n) ** (1.0 / 3.0)  # uniform in the ellipsoid
    return p * r[:, None] * radii


def structure_beads(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Bead positions ``(m, 3)`` (A, centred), weights ``(m,)`` and bead sigma (A) of one
    structure of ``kind`` (:func:`diameter` measures it)."""
    if kind == "ribosome":  # large and small subunit, ~240 x 180 A
        big = _blob_cloud(rng, 900, np.array([110.0, 95.0, 90.0]))
        small = _blob_cloud(rng, 450, np.array([85.0, 60.0, 55.0])) + [70.0, 0.0, 95.0]
        pts = np.concatenate([big, small])
        sigma = 9.0
    elif kind == "ring":  # n subunits on a circle, 200-260 A across
        n_sub = int(rng.integers(5, 10))
        radius = rng.uniform(70.0, 95.0)
        unit = _blob_cloud(rng, 120, np.array([30.0, 22.0, 35.0])) + [radius, 0.0, 0.0]
        pts = []
        for k in range(n_sub):
            a = 2 * np.pi * k / n_sub
            c, s = np.cos(a), np.sin(a)
            pts.append(unit @ np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]]))
        pts = np.concatenate(pts)
        sigma = 7.0
    elif kind == "rod":  # a helical filament segment, 260-320 A long, ~70 A wide
        length = rng.uniform(260.0, 320.0)
        m = 700
        t = rng.uniform(-0.5, 0.5, m) * length
        phase = 2 * np.pi * t / rng.uniform(50.0, 80.0)
        strand = rng.integers(0, 2, m) * np.pi
        pts = np.stack(
            [24 * np.cos(phase + strand), 24 * np.sin(phase + strand), t], 1
        ) + rng.normal(scale=6.0, size=(m, 3))
        pts = np.concatenate([pts, _blob_cloud(rng, 120, np.array([35.0, 35.0, 35.0])) +
                              [0.0, 0.0, 0.45 * length]])  # fmt: skip
        sigma = 7.0
    elif kind == "globule":  # a small two-domain protein, ~110 A
        a = _blob_cloud(rng, 250, np.array([40.0, 32.0, 30.0]))
        b = _blob_cloud(rng, 150, np.array([28.0, 25.0, 22.0])) + [45.0, 20.0, 0.0]
        pts = np.concatenate([a, b])
        sigma = 6.0
    else:
        raise ValueError(kind)
    pts = pts - pts.mean(0)
    w = rng.uniform(0.5, 1.5, len(pts))
    return pts, w, sigma


def diameter(pts: np.ndarray) -> float:
    """Largest extent (A) of a bead cloud, plus a little for the beads themselves."""
    centred = pts - pts.mean(0)
    return 2.0 * float(np.linalg.norm(centred, axis=1).max()) + 10.0


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform random rotation matrices ``(n, 3, 3)`` from unit quaternions."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def render_beads(
    pts: np.ndarray, w: np.ndarray, sigma: float, rot: np.ndarray, shift_a: np.ndarray,
    box: int, pixel: float,
) -> np.ndarray:  # fmt: skip
    """Projections ``(b, box, box)`` of one bead cloud in ``b`` orientations, shifted by
    ``shift_a`` (A): separable Gaussians, one batched product per image batch."""
    xy = np.einsum("bij,mj->bmi", rot, pts)[..., :2] + shift_a[:, None, :]  # (b, m, 2)
    grid = (np.arange(box) - box // 2) * pixel
    s = max(sigma, 0.6 * pixel)
    gx = np.exp(-((grid[None, None, :] - xy[..., 0:1]) ** 2) / (2 * s * s))  # (b, m, box)
    gy = np.exp(-((grid[None, None, :] - xy[..., 1:2]) ** 2) / (2 * s * s))
    return np.einsum("bmy,bmx->byx", gy * w[None, :, None], gx)


# ---- optics: this file's own CTF, coloured noise, RELION-style normalisation ------------------


def electron_wavelength(kv: float) -> float:
    v = kv * 1e3
    return 12.2643247 / math.sqrt(v * (1 + 0.978466e-6 * v))


def ctf_image(
    box: int, pixel: float, du: float, dv: float, angle_deg: float, kv: float, cs_mm: float,
    q: float, bfactor: float,
) -> np.ndarray:  # fmt: skip
    """The CTF on the full ``fft2`` grid: sin(pi lambda dz k^2 - pi/2 Cs lambda^3 k^4 + asin q),
    positive at low resolution (density stays white), with an envelope exp(-B k^2 / 4)."""
    f = np.fft.fftfreq(box, d=pixel)
    ky, kx = np.meshgrid(f, f, indexing="ij")
    k2 = kx * kx + ky * ky
    ang = np.arctan2(ky, kx) - np.deg2rad(angle_deg)
    dz = 0.5 * (du + dv) + 0.5 * (du - dv) * np.cos(2 * ang)
    lam = electron_wavelength(kv)
    cs = cs_mm * 1e7
    chi = np.pi * lam * dz * k2 - 0.5 * np.pi * cs * lam**3 * k2 * k2 + math.asin(q)
    return np.sin(chi) * np.exp(-bfactor * k2 / 4)


def coloured_noise(rng: np.random.Generator, b: int, box: int, pixel: float) -> np.ndarray:
    """Noise with more power at low resolution (ice, beam-induced blur): unit variance."""
    f = np.fft.fftfreq(box, d=pixel)
    ky, kx = np.meshgrid(f, f, indexing="ij")
    k = np.sqrt(kx * kx + ky * ky)
    amp = np.sqrt(1.0 + 3.0 * np.exp(-((k * 80.0) ** 2)) + 0.5 * np.exp(-((k * 15.0) ** 2)))
    white = rng.normal(size=(b, box, box))
    out = np.fft.ifft2(np.fft.fft2(white) * amp).real
    return out / out.std(axis=(1, 2), keepdims=True)


# ---- junk ---------------------------------------------------------------------------------------


def ice(rng: np.random.Generator, b: int, box: int, level: float) -> np.ndarray:
    out = np.zeros((b, box, box))
    yy, xx = np.mgrid[:box, :box] - box // 2
    for i in range(b):
        field = ndimage.gaussian_filter(rng.normal(size=(box, box)), box / 10, mode="wrap")
        field /= field.std()
        cx, cy = rng.uniform(-0.25, 0.25, 2) * box
        r = np.hypot(xx - cx, yy - cy) / (box * rng.uniform(0.15, 0.35))
        blob = ndimage.gaussian_filter(((field - 1.5 * r**2) > -0.3).astype(float), 1.2)
        out[i] = blob * rng.uniform(1.5, 4.0) * level
    return out


def carbon(rng: np.random.Generator, b: int, box: int, level: float) -> np.ndarray:
    out = np.zeros((b, box, box))
    yy, xx = np.mgrid[:box, :box] - box // 2
    for i in range(b):
        radius = rng.uniform(3.0, 10.0) * box
        a = rng.uniform(0, 2 * np.pi)
        d0 = rng.uniform(-0.3, 0.3) * box
        cx, cy = (radius + d0) * np.cos(a), (radius + d0) * np.sin(a)
        inside = np.hypot(xx - cx, yy - cy) < radius  # the film is the disc's inside
        film = ndimage.gaussian_filter(inside.astype(float), 0.8)
        texture = ndimage.gaussian_filter(rng.normal(size=(box, box)), 1.0)
        out[i] = film * (1.0 + 0.6 * texture / texture.std()) * rng.uniform(0.4, 1.2) * level
    return out


# ---- one job ------------------------------------------------------------------------------------


def job_settings(j: int) -> dict:
    rng = np.random.default_rng(7_700_000 + j)
    n_struct = int(rng.integers(1, 3))
    kinds = [str(k) for k in rng.choice(STRUCTURES, size=n_struct, replace=False)]
    return dict(
        structures=kinds,
        structure_seeds=[int(s) for s in rng.integers(0, 2**31, n_struct)],
        n_particles=int(rng.integers(1200, 1800)),
        box=64,
        fill=float(rng.uniform(0.6, 0.9)),  # largest diameter / box side
        snr=float(rng.uniform(0.03, 0.1)),
        junk_fraction=float(rng.uniform(0.12, 0.25)),
        kv=float(rng.choice([200.0, 300.0])),
        defocus=(float(rng.uniform(0.5, 1.0)), float(rng.uniform(1.8, 3.0))),  # um
        seed=int(rng.integers(0, 2**31)),
        algorithm=str(rng.choice(["em", "vdam"])),
        K=int(rng.integers(12, 21)),
    )


def make_family_job(work: Path, j: int) -> dict:
    """Simulate held-apart job ``j`` into ``work/job_NNN/sim`` (once); return its settings."""
    cfg = job_settings(j)
    sim = Path(work) / f"job_{j:03d}" / "sim"
    if (sim / "particles.star").exists():
        return json.loads((sim / "settings.json").read_text())
    rng = np.random.default_rng(cfg["seed"])
    beads = [structure_beads(k, np.random.default_rng(s))
             for k, s in zip(cfg["structures"], cfg["structure_seeds"], strict=True)]  # fmt: skip
    diam = max(diameter(p) for p, _, _ in beads)
    box = cfg["box"]
    pixel = round(diam / (cfg["fill"] * box), 3)
    cfg.update(pixel=pixel, diameter=round(diam, 1))
    n = cfg["n_particles"]
    n_junk = int(round(cfg["junk_fraction"] * n))
    kinds = np.array(["particle"] * (n - n_junk) + list(rng.choice(KINDS, n_junk)), dtype=object)
    rng.shuffle(kinds)
    which = rng.integers(0, len(beads), n)
    shift = rng.normal(scale=1.5 * pixel, size=(n, 2))
    # clean images, in units where a particle's projection has unit mean-square over the box
    clean = np.zeros((n, box, box))
    # one density scale for every structure (a small one is fainter, as in a real mixture)
    probe = [render_beads(p, w, sig, random_rotations(rng, 16), np.zeros((16, 2)), box, pixel)
             for p, w, sig in beads]  # fmt: skip
    scale = 1.0 / math.sqrt(float(np.mean([(x**2).mean() for x in probe])))
    for s, (p, w, sig) in enumerate(beads):
        idx = np.flatnonzero((kinds == "particle") & (which == s))
        for chunk in np.array_split(idx, max(1, len(idx) // 64)):
            if len(chunk):
                rot = random_rotations(rng, len(chunk))
                clean[chunk] = scale * render_beads(p, w, sig, rot, shift[chunk], box, pixel)
    level = float(np.median(clean[kinds == "particle"].max(axis=(1, 2))))
    for kind in KINDS:
        idx = np.flatnonzero(kinds == kind)
        if not len(idx):
            continue
        if kind == "ice":
            clean[idx] = ice(rng, len(idx), box, level)
        elif kind == "carbon":
            clean[idx] = carbon(rng, len(idx), box, level)
        elif kind == "aggregate":
            for i in idx:
                parts = int(rng.integers(2, 5))
                img = np.zeros((box, box))
                for _ in range(parts):
                    s = int(rng.integers(0, len(beads)))
                    p, w, sig = beads[s]
                    off = rng.uniform(-0.35, 0.35, (1, 2)) * diam
                    img += scale * render_beads(p, w, sig, random_rotations(rng, 1), off,
                                                   box, pixel)[0]  # fmt: skip
                cloud = _blob_cloud(rng, 300, np.full(3, 0.45 * diam))
                img += scale * render_beads(cloud, np.ones(300), 8.0, random_rotations(rng, 1),
                                               np.zeros((1, 2)), box, pixel)[0]  # fmt: skip
                clean[i] = img
        else:  # empty: half with a neighbour entering from the side
            for i in idx:
                if rng.random() < 0.5:
                    s = int(rng.integers(0, len(beads)))
                    p, w, sig = beads[s]
                    a = rng.uniform(0, 2 * np.pi)
                    off = rng.uniform(0.5, 0.65) * box * pixel * np.array([[np.cos(a), np.sin(a)]])
                    clean[i] = scale * render_beads(p, w, sig, random_rotations(rng, 1), off,
                                                       box, pixel)[0]  # fmt: skip
    # CTF per micrograph (groups of ~60), coloured noise at the job's SNR, background normalised
    n_mics = max(1, n // 60)
    mic = np.sort(rng.integers(0, n_mics, n))
    dlo, dhi = cfg["defocus"]
    mic_du = rng.uniform(dlo, dhi, n_mics) * 1e4
    mic_dv = mic_du - rng.uniform(0, 800, n_mics)
    mic_ang = rng.uniform(0, 180, n_mics)
    images = np.empty((n, box, box), np.float32)
    yy, xx = np.mgrid[:box, :box] - box // 2
    background = np.hypot(xx, yy) > 0.4 * box
    signal_var = []
    modulated = np.empty_like(clean)
    for m in range(n_mics):
        idx = np.flatnonzero(mic == m)
        if not len(idx):
            continue
        ctf = ctf_image(box, pixel, mic_du[m], mic_dv[m], mic_ang[m], cfg["kv"], 2.7, 0.1, 40.0)
        shifted = np.fft.ifftshift(clean[idx], axes=(1, 2))
        out = np.fft.ifft2(np.fft.fft2(shifted) * ctf).real
        modulated[idx] = np.fft.fftshift(out, axes=(1, 2))
        signal_var.append(modulated[idx][kinds[idx] == "particle"].var(axis=(1, 2)))
    noise_sd = math.sqrt(float(np.mean(np.concatenate(signal_var))) / cfg["snr"])
    for chunk in np.array_split(np.arange(n), max(1, n // 256)):
        img = modulated[chunk] + noise_sd * coloured_noise(rng, len(chunk), box, pixel)
        bg = img[:, background]
        img = (img - bg.mean(1)[:, None, None]) / bg.std(1)[:, None, None]
        images[chunk] = img
    sim.mkdir(parents=True, exist_ok=True)
    write_mrc(sim / "particles.mrcs", images, pixel)
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    optics = pd.DataFrame([{
        "rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1,
        "rlnMicrographOriginalPixelSize": pixel, "rlnVoltage": cfg["kv"],
        "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1,
        "rlnImagePixelSize": pixel, "rlnImageSize": box, "rlnImageDimensionality": 2,
        "rlnCtfDataAreCtfPremultiplied": 0,
    }])  # fmt: skip
    particles = pd.DataFrame({
        "rlnImageName": names,
        "rlnMicrographName": [f"mics/mic_{m:04d}.mrc" for m in mic],
        "rlnCoordinateX": rng.uniform(100, 3900, n).round(1),
        "rlnCoordinateY": rng.uniform(100, 3900, n).round(1),
        "rlnDefocusU": mic_du[mic].round(1), "rlnDefocusV": mic_dv[mic].round(1),
        "rlnDefocusAngle": mic_ang[mic].round(2), "rlnCtfBfactor": 0.0,
        "rlnPhaseShift": 0.0, "rlnOpticsGroup": 1,
    })  # fmt: skip
    write_star({"optics": optics, "particles": particles}, sim / "particles.star")
    structure = np.where(kinds == "particle", which + 1, 0)
    pd.DataFrame({"image_name": names, "kind": kinds, "structure": structure}).to_csv(
        sim / "ground_truth.csv", index=False
    )
    (sim / "settings.json").write_text(json.dumps(cfg, indent=1))
    return cfg
