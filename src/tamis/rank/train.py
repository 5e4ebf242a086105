"""Training the class ranker: per-class examples from 2D jobs, RELION's target scores, training
as relion-classranker's ``train.py`` (MSE, Adam, a random in-plane rotation per batch and a flip
with probability 0.5, the six granulometry features zeroed, as they are when ranking), a validation split by job, and a
logistic calibration of the score into a probability of a class being good.

Targets (RELION's ``getClassScoreFromJobScore``): with ``w = (best resolution among the job's
best classes / class resolution)²``, tier 1 (best) ``0.75 + 0.25 w``, tier 2 ``0.50 + 0.25 w``,
tier 3 ``0.25 + 0.25 w``, tier 4 ``0.25 w``, bad 0, times the job score. RELION's colour labels
map to tiers as 1 -> 1, 5 -> 2, 2 -> 3, 3 and 4 -> 4, 0 and 6 -> bad; a user's plain selection
(``rlnSelected`` 0/1) is tier 1 / bad.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from tamis import __version__
from tamis.errors import TamisError
from tamis.io.star import read_star
from tamis.rank.features import feature_vector, network_features
from tamis.rank.network import ClassRankerNet, RankerEnsemble
from tamis.rank.select import image_scale_of, job_class_features, job_inputs, load_ranker

__all__ = [
    "Examples",
    "job_examples",
    "target_scores",
    "RankTrainOptions",
    "train_ranker",
    "RELION_LABEL_TIER",
    "tiers_from_truth",
    "selection_tiers",
]

#: RELION's colour labels (backup_selection.star rlnSelected) -> tier (0 = bad).
RELION_LABEL_TIER = {1: 1, 5: 2, 2: 3, 3: 4, 4: 4, 6: 0, 0: 0}


@dataclass
class Examples:
    images: np.ndarray  # (n, 64, 64) float32
    features: np.ndarray  # (n, 24) float32
    targets: np.ndarray  # (n,)
    good: np.ndarray  # (n,) bool: tier 1-2
    particles: np.ndarray  # (n,) estimated particle numbers
    job: np.ndarray  # (n,) job index
    tiers: np.ndarray  # (n,) 0 bad, 1-4 best to fair

    @classmethod
    def concat(cls, parts: list[Examples]) -> Examples:
        return cls(
            *[np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__]
        )

    def __len__(self) -> int:
        return len(self.targets)


def target_scores(tiers: np.ndarray, resolution: np.ndarray, job_score: float = 1.0) -> np.ndarray:
    best = resolution[tiers == 1]
    min_res = float(best.min()) if len(best) else 999.0
    # the best tier-1 class's resolution gets the full 0.25; a class of a lower tier that is
    # sharper than every tier-1 class (or a job without one) gets no more than that
    w = np.minimum(1.0, (min_res / resolution) ** 2)
    base = {1: 0.75, 2: 0.50, 3: 0.25, 4: 0.0}
    out = np.array([(base[t] + 0.25 * w[i]) if t in base else 0.0 for i, t in enumerate(tiers)])
    return out * job_score


def job_examples(
    optimiser: str | Path,
    tiers: np.ndarray,
    job_index: int = 0,
    job_score: float = 1.0,
    image_scale: str = "job",
) -> Examples:
    """Examples of one 2D job; ``tiers[c]`` per class (0 bad, 1-4 good to fair), class images
    in ``image_scale`` units (``features.IMAGE_SCALES``; the model must be trained and used
    with the same)."""
    feats, imgs, kept = job_class_features(job_inputs(optimiser), image_scale)
    if not kept:
        raise TamisError(f"{optimiser}: no class with more than 10 particles")
    t = np.asarray(tiers)[kept]
    res = np.array([f.estimated_resolution for f in feats])
    return Examples(
        images=np.stack(imgs),
        features=feature_vector(feats),
        targets=target_scores(t, res, job_score).astype(np.float32),
        good=np.isin(t, (1, 2)),
        particles=np.array([f.particle_nr for f in feats]),
        job=np.full(len(kept), job_index),
        tiers=t.astype(int),
    )


def selection_tiers(path: str | Path) -> np.ndarray:
    """Tiers from a ``backup_selection.star`` (RELION colour labels or 0/1)."""
    blocks = read_star(path)
    table = next(b for b in blocks.values() if isinstance(b, pd.DataFrame))
    labels = table["rlnSelected"].astype(int).to_numpy()
    return np.array([RELION_LABEL_TIER.get(int(v), 0) for v in labels])


def tiers_from_truth(
    optimiser: str | Path, ground_truth: str | Path, *, by: str = "particles"
) -> np.ndarray:
    """Tier of every class of a job on simulated data, from its members' truth.

    ``by="particles"`` (default): purity is the share of members that are particles of any
    structure (not junk) -- what selection is for: keeping particles, dropping junk.
    ``by="structure"``: purity is the share of the majority structure, and junk-majority classes
    are bad. Tiers: 1 (purity >= 0.9), 2 (>= 0.75), 3 (>= 0.6), 4 (>= 0.5), else bad (0); empty
    classes are bad."""
    from tamis.simulate.truth import truth_for

    if by not in ("particles", "structure"):
        raise TamisError(f"by={by!r}: particles or structure")
    job = job_inputs(optimiser)
    data = job["data"].table
    truth = truth_for(data, pd.read_csv(ground_truth))
    is_particle = truth["kind"].to_numpy() == "particle"
    labels = np.where(is_particle, truth["structure"].to_numpy(), 0)
    cls = data["rlnClassNumber"].astype(int).to_numpy() - 1
    tiers = np.zeros(len(job["classes"]), dtype=int)
    for c in range(len(tiers)):
        members = labels[cls == c]
        if not len(members):
            continue
        if by == "particles":
            purity = float((members != 0).mean())
        else:
            vals, counts = np.unique(members, return_counts=True)
            if vals[np.argmax(counts)] == 0:
                continue
            purity = counts.max() / len(members)
        for tier, limit in ((1, 0.9), (2, 0.75), (3, 0.6), (4, 0.5)):
            if purity >= limit:
                tiers[c] = tier
                break
    return tiers


@dataclass
class RankTrainOptions:
    epochs: int = 60
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 5e-4
    dropout: float = 0.3
    validation_jobs: float = 0.2  # fraction of jobs held out
    seed: int = 12
    init: str | None = None  # fine-tune from these weights
    image_scale: str = "job"  # how the examples' class images were scaled (features.IMAGE_SCALES)
    members: int = 1  # networks trained from different seeds; the ranker averages their scores


def _member_seed(seed: int, member: int) -> int:
    """Ensemble member ``member``'s seed for its initial weights, batch order and augmentation."""
    return seed + 1000 * member


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    a = float(torch.rand((), generator=gen)) * 2 * math.pi
    c, s = math.cos(a), math.sin(a)
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=images.dtype).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if float(torch.rand((), generator=gen)) < 0.5:
        out = out.flip(-1)
    return out


def _fit_calibration(scores: np.ndarray, good: np.ndarray) -> dict:
    """Logistic regression P(good) = 1 / (1 + exp(-(a s + b))) by Newton's method."""
    if good.all() or not good.any():
        return {"a": 8.0, "b": -4.0, "fitted": False}
    a, b = 1.0, 0.0
    x, y = scores.astype(np.float64), good.astype(np.float64)
    for _ in range(100):
        p = 1 / (1 + np.exp(-(a * x + b)))
        g = np.array([((p - y) * x).sum(), (p - y).sum()]) + 1e-3 * np.array([a, b])
        wgt = p * (1 - p)
        h = np.array(
            [[(wgt * x * x).sum(), (wgt * x).sum()], [(wgt * x).sum(), wgt.sum()]]
        ) + 1e-3 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-8:
            break
    return {"a": float(a), "b": float(b), "fitted": True}


def train_ranker(
    examples: Examples,
    out: str | Path,
    options: RankTrainOptions,
    *,
    provenance: dict | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train, calibrate on the held-out jobs, write ``<out>.safetensors`` and ``<out>.json``."""
    from safetensors.torch import save_file

    from tamis.io.star import atomic_path

    o = options
    jobs = np.unique(examples.job)
    rng = np.random.default_rng(o.seed)
    n_val = max(1, int(round(o.validation_jobs * len(jobs)))) if len(jobs) > 1 else 0
    val_jobs = set(rng.permutation(jobs)[:n_val].tolist())
    is_val = np.isin(examples.job, list(val_jobs))
    tr = np.flatnonzero(~is_val)
    va = np.flatnonzero(is_val) if n_val else tr
    if o.init:
        init_net, init_meta = load_ranker(o.init)
        if image_scale_of(init_meta) != o.image_scale:
            raise TamisError(
                f"{o.init}: trained with image_scale {image_scale_of(init_meta)}, "
                f"the examples have {o.image_scale}"
            )
        nets = list(init_net.members) if isinstance(init_net, RankerEnsemble) else [init_net]
    else:
        nets = []
        for m in range(o.members):
            torch.manual_seed(_member_seed(o.seed, m))
            nets.append(ClassRankerNet(dropout=o.dropout))
    x_img = torch.from_numpy(examples.images)[:, None]
    x_feat = torch.from_numpy(network_features(examples.features))
    y = torch.from_numpy(examples.targets.astype(np.float32))[:, None]
    history: list[list[dict]] = []
    for m, net in enumerate(nets):
        # every member sees the same training and validation jobs, in its own order and with
        # its own augmentation draws
        gen = torch.Generator().manual_seed(_member_seed(o.seed, m))
        order = np.random.default_rng(_member_seed(o.seed, m))
        opt = torch.optim.Adam(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        history.append([])
        for epoch in range(1, o.epochs + 1):
            net.train()
            perm = torch.from_numpy(order.permutation(tr))
            losses = []
            for s in range(0, len(perm), o.batch_size):
                idx = perm[s : s + o.batch_size]
                pred = net(_augment(x_img[idx], gen), x_feat[idx])
                loss = F.mse_loss(pred, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            net.eval()
            with torch.no_grad():
                vloss = float(F.mse_loss(net(x_img[va], x_feat[va]), y[va]))
            history[m].append(
                {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": vloss}
            )
            if epoch == 1 or epoch % 10 == 0 or epoch == o.epochs:
                who = f"member {m + 1}/{len(nets)}, " if len(nets) > 1 else ""
                log(
                    f"{who}epoch {epoch:4d}: loss {history[m][-1]['train_loss']:.4f} "
                    f"(validation {vloss:.4f})"
                )
    net = RankerEnsemble(nets) if len(nets) > 1 else nets[0]
    net.eval()
    with torch.no_grad():
        val_scores = net(x_img[va], x_feat[va])[:, 0].numpy()
    calibration = _fit_calibration(val_scores, examples.good[va])
    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(out.with_suffix(".safetensors")) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "tamis": "class ranker"})
    meta = {
        "kind": "tamis class ranker (RELION's architecture and feature normalisation)",
        "tamis_version": __version__,
        "options": asdict(o),
        "calibration": calibration,
        "image_scale": o.image_scale,
        "n_examples": len(examples),
        "n_jobs": int(len(jobs)),
        "validation_jobs": sorted(int(j) for j in val_jobs),
        "history": history[0] if len(history) == 1 else history,
        "provenance": provenance or {},
    }
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str))
    return out.with_suffix(".safetensors")
