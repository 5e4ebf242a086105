"""Training the deep picker on a few labelled micrographs.

Micrographs are binned so the particle diameter spans :data:`DIAMETER_PX` pixels; targets are
discs of a quarter diameter at the labelled centres. Each step takes a minibatch of random
patches (random flips and 90-degree rotations). Losses: class-weighted binary cross-entropy
(``positive_weight``: weight of particle pixels; default the square root of the
negative/positive ratio), or the non-negative positive-unlabelled risk of Kiryo et al. (2017)
(``loss="pu"``), for labels that miss particles: unlabelled pixels are a mixture with a prior
``pu_prior`` of particle pixels (default from ``expected_particles`` per micrograph). The
learning rate decays exponentially from ``lr_initial`` to ``lr_final``. After every epoch the
loss on held-out micrographs and the pick precision/recall/F1 there (match radius half a
diameter) are logged, written to ``history.csv`` and plotted to ``history.png``.

The model's recommended score threshold (its record's ``threshold``, the picker's default) is
``threshold`` when given, else the one of :data:`THRESHOLD_GRID` whose picks on the validation
micrographs (the only micrograph when there is one: then an optimistic choice) have the best F1
against their labels (the whole grid after the last epoch, every fourth threshold after the
others; the validation precision, recall and F1 of each epoch are at its ``val_threshold``).
When no threshold gives a correct validation pick, the ``--init`` model's threshold (else 0.5)
is recorded and the log says so. A model's scores move in training, so the ``--init`` model's
threshold says nothing of the tuned one: at the shipped model's 0.98, models fine-tuned from it
on three real micrographs picked at most 0.3% of the particles of three others (none with the
PU loss; BENCHMARKS.md). Labels that miss particles (``loss="pu"``) count the missed ones as
false picks there, so the choice leans high; give ``threshold`` when the labels are known to be
short.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from tamis import __version__
from tamis.errors import TamisError
from tamis.io.star import atomic_path
from tamis.pick.deep.data import TARGET_RADIUS, PreparedMicrograph, prepare, target_map
from tamis.pick.deep.network import DIAMETER_PX, PickerNet
from tamis.pick.deep.predict import (
    load_model,
    picks_from_scores,
    recommended_threshold,
    save_model,
)
from tamis.pick.evaluate import PickScore, score_picks
from tamis.pick.micrograph import Micrograph

__all__ = ["THRESHOLD_GRID", "TrainOptions", "TrainResult", "train_picker", "plot_history"]

#: Score thresholds a trained model's recommended one is chosen from (best validation F1).
THRESHOLD_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7,
                  0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99)  # fmt: skip


@dataclass
class TrainOptions:
    diameter: float  # Å
    lowpass: float | None = None  # Å, extra Gaussian low-pass after binning
    lr_initial: float = 2e-3
    lr_final: float = 2e-4
    batch_size: int = 16
    epochs: int = 20
    steps_per_epoch: int = 40
    patch: int = 96  # network pixels (about 5 diameters)
    positive_weight: float | None = None
    loss: str = "bce"  # or "pu"
    pu_prior: float | None = None
    expected_particles: float | None = None  # per micrograph, for the PU prior
    normalize: bool = True
    threads: int = 0
    validation_fraction: float = 0.2
    # the model's recommended score threshold; None: the best F1 of the validation picks
    # over THRESHOLD_GRID after the last epoch
    threshold: float | None = None
    seed: int = 0
    width: int = 16
    init: str | None = None  # fine-tune from this model

    def check(self) -> None:
        if self.loss not in ("bce", "pu"):
            raise TamisError(f"--loss {self.loss}: expected bce or pu")
        if self.diameter <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise TamisError("diameter, epochs and minibatch size must be positive")
        if not 0 < self.lr_final <= self.lr_initial:
            raise TamisError("learning rates: need 0 < final <= initial")
        if self.threshold is not None and not 0 <= self.threshold < 1:
            raise TamisError(f"--threshold {self.threshold}: expected a score in [0, 1)")


@dataclass
class TrainResult:
    model: Path
    history: pd.DataFrame


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
    if int(torch.randint(0, 2, (1,), generator=gen)):
        x, y = x.flip(-1), y.flip(-1)
    return x, y


def _sample(
    data: list[tuple[PreparedMicrograph, torch.Tensor]], n: int, patch: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(n):
        prep, tgt = data[int(torch.randint(0, len(data), (1,), generator=gen))]
        h, w = prep.image.shape
        ph, pw = min(patch, h), min(patch, w)
        r = int(torch.randint(0, h - ph + 1, (1,), generator=gen))
        c = int(torch.randint(0, w - pw + 1, (1,), generator=gen))
        x = prep.image[r : r + ph, c : c + pw]
        y = tgt[r : r + ph, c : c + pw]
        if (ph, pw) != (patch, patch):
            x = F.pad(x, (0, patch - pw, 0, patch - ph))
            y = F.pad(y, (0, patch - pw, 0, patch - ph))
        x, y = _augment(x, y, gen)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs)[:, None], torch.stack(ys)[:, None]


def _loss(logits: torch.Tensor, target: torch.Tensor, o: TrainOptions, pos_w: float, prior: float):
    if o.loss == "bce":
        weight = torch.where(target > 0.5, pos_w, 1.0)
        return F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    # nnPU with the logistic loss: risk = pi R_p^+ + max(0, R_u^- - pi R_p^-)
    pos = target > 0.5
    unl = ~pos
    r_p_plus = F.softplus(-logits[pos]).mean() if pos.any() else logits.sum() * 0
    r_p_minus = F.softplus(logits[pos]).mean() if pos.any() else logits.sum() * 0
    r_u_minus = F.softplus(logits[unl]).mean()
    neg = r_u_minus - prior * r_p_minus
    if float(neg.detach()) < 0:  # nnPU: push the negative risk back up instead of overfitting
        return -neg
    return prior * r_p_plus + neg


def train_picker(
    micrographs: Sequence[Micrograph],
    coordinates: Sequence[np.ndarray],
    out_dir: str | Path,
    options: TrainOptions,
    *,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train on ``micrographs`` with picked centres ``coordinates[i]`` ``(n, 2)`` (x, y, micrograph
    pixels); writes ``model.safetensors`` (+ ``.json``), ``history.csv`` and ``history.png``."""
    o = options
    o.check()
    if len(micrographs) != len(coordinates) or not micrographs:
        raise TamisError("need at least one labelled micrograph (and one coordinate set each)")
    if o.threads > 0:
        torch.set_num_threads(o.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(o.seed)
    torch.manual_seed(o.seed)
    data = []
    for mic, xy in zip(micrographs, coordinates, strict=True):
        prep = prepare(mic, o.diameter, lowpass=o.lowpass, normalize=o.normalize)
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        tgt = target_map(
            tuple(prep.image.shape), xy[:, 0] * prep.scale[1], xy[:, 1] * prep.scale[0]
        )
        data.append((prep, tgt, xy))
    n_val = int(round(o.validation_fraction * len(data))) if len(data) > 1 else 0
    n_val = min(max(n_val, 1 if len(data) > 1 else 0), len(data) - 1)
    order = torch.randperm(len(data), generator=gen).tolist()
    val = [data[i] for i in order[:n_val]] or [data[order[0]]]
    train = [data[i] for i in order[n_val:]]
    pos_frac = float(sum(t.sum() for _, t, _ in train) / sum(t.numel() for _, t, _ in train))
    if pos_frac <= 0:
        raise TamisError("no labelled particle falls inside the training micrographs")
    pos_w = o.positive_weight if o.positive_weight else math.sqrt((1 - pos_frac) / pos_frac)
    prior = o.pu_prior
    if o.loss == "pu" and prior is None:
        if o.expected_particles:
            areas = [p.image.numel() for p, _, _ in train]
            prior = o.expected_particles * math.pi * TARGET_RADIUS**2 / float(np.mean(areas))
        else:
            prior = 2 * pos_frac  # labels are assumed to cover about half of the particles
    prior = float(prior or 0.0)
    if o.init:
        model, init_meta = load_model(o.init)
        model.train()
    else:
        model, init_meta = PickerNet(o.width), {}
    thresholds = THRESHOLD_GRID if o.threshold is None else (o.threshold,)
    opt = torch.optim.Adam(model.parameters(), lr=o.lr_initial)
    total = o.epochs * o.steps_per_epoch
    decay = (o.lr_final / o.lr_initial) ** (1.0 / max(total - 1, 1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, decay)
    rows = []
    t0 = time.perf_counter()
    for epoch in range(1, o.epochs + 1):
        model.train()
        losses, accs = [], []
        for _ in range(o.steps_per_epoch):
            x, y = _sample([(p, t) for p, t, _ in train], o.batch_size, o.patch, gen)
            logits = model(x)
            loss = _loss(logits, y, o, pos_w, prior)
            opt.zero_grad()
            loss.backward()
            opt.step()
            lr_used = float(opt.param_groups[0]["lr"])
            sched.step()
            losses.append(float(loss.detach()))
            accs.append(float(((logits > 0) == (y > 0.5)).float().mean()))
        model.eval()
        vl, va, maps = [], [], []
        with torch.no_grad():
            for prep, tgt, _ in val:
                logits = model(prep.image[None, None])
                vl.append(float(_loss(logits, tgt[None, None], o, pos_w, prior)))
                va.append(float(((logits > 0) == (tgt[None, None] > 0.5)).float().mean()))
                maps.append(torch.sigmoid(logits)[0, 0])
        # every fourth threshold of the grid while training (each costs a pass over the
        # validation micrographs), the whole grid after the last epoch
        grid = thresholds if epoch == o.epochs else thresholds[::4]
        chosen, score = best_threshold(maps, val, grid, o.diameter)
        fell_back = chosen is None  # no correct validation pick at any threshold (yet)
        if fell_back:
            chosen = recommended_threshold(init_meta) if o.threshold is None else o.threshold
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "train_accuracy": float(np.mean(accs)),
            "val_loss": float(np.mean(vl)),
            "val_accuracy": float(np.mean(va)),
            "val_precision": score.precision if score else 0.0,
            "val_recall": score.recall if score else 0.0,
            "val_f1": score.f1 if score else 0.0,
            "val_threshold": chosen,
            "lr": lr_used,  # the rate of the epoch's last step
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        log(
            f"epoch {epoch:3d}: loss {row['train_loss']:.4f} (val {row['val_loss']:.4f}), "
            f"accuracy {row['train_accuracy']:.4f} (val {row['val_accuracy']:.4f}), "
            f"val picks P {row['val_precision']:.2f} R {row['val_recall']:.2f} "
            f"F1 {row['val_f1']:.2f} at threshold {chosen:g}"
        )
    if o.threshold is not None:
        rule = "given"
    elif fell_back:
        rule = "no correct validation pick: the --init model's, else 0.5"
        log(f"no validation pick is correct at any threshold: recorded threshold {chosen:g}")
    else:
        rule = "best validation F1"
    history = pd.DataFrame(rows)
    with atomic_path(out / "history.csv") as tmp:
        history.to_csv(tmp, index=False)
    plot_history(history, out / "history.png")
    meta = {
        "kind": "tamis deep picker",
        "tamis_version": __version__,
        "width": o.width,
        "diameter_px": DIAMETER_PX,
        "target_radius_px": TARGET_RADIUS,
        "lowpass": o.lowpass,
        "normalize": o.normalize,
        "threshold": chosen,
        "threshold_rule": rule,
        # 0-based indices into the micrographs given, and their names
        "validation_micrographs": order[:n_val] or order[:1],
        "validation_names": [micrographs[i].name for i in order[:n_val] or order[:1]],
        "options": asdict(o),
        "n_train_micrographs": len(train),
        "n_validation_micrographs": len(val),
        "positive_weight": pos_w,
        "pu_prior": prior,
        "final": rows[-1],
    }
    model_path = out / "model.safetensors"
    save_model(model_path, model, meta)
    return TrainResult(model_path, history)


def best_threshold(
    maps: Sequence[torch.Tensor],
    labelled: Sequence[tuple[PreparedMicrograph, torch.Tensor, np.ndarray]],
    thresholds: Sequence[float],
    diameter: float,
) -> tuple[float | None, PickScore | None]:
    """The threshold of ``thresholds`` whose picks (:func:`picks_from_scores` on the score
    ``maps``, one per ``labelled`` micrograph) have the best F1 against the labelled centres,
    pooled over the micrographs (match radius half a ``diameter``, Å), and that score; the lowest
    threshold wins a tie. ``(None, None)`` when no threshold gives a correct pick."""
    best: tuple[float | None, PickScore | None] = (None, None)
    for t in sorted(thresholds):
        total = None
        for score_map, (prep, _, xy) in zip(maps, labelled, strict=True):
            p = picks_from_scores(score_map, prep.scale, t)
            s = score_picks(np.stack([p.x, p.y], 1), xy, 0.5 * diameter / micro_pixel(prep))
            total = s if total is None else total + s
        if (
            total is not None
            and total.true_positives
            and (best[1] is None or total.f1 > best[1].f1)
        ):
            best = (float(t), total)
    return best


def micro_pixel(prep: PreparedMicrograph) -> float:
    """Micrograph pixel size (Å) of a prepared micrograph."""
    return prep.pixel * (prep.scale[0] + prep.scale[1]) / 2


def plot_history(history: pd.DataFrame, path: str | Path) -> None:
    """Loss (train, validation) and validation F1 against epoch, as a small PNG."""
    from PIL import Image, ImageDraw

    w, h, m = 640, 360, 48
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([m, m // 2, w - m // 2, h - m], outline="black")
    ep = history["epoch"].to_numpy(float)
    x0, x1 = ep.min(), max(ep.max(), ep.min() + 1)
    losses = np.concatenate([history["train_loss"], history["val_loss"]])
    hi = float(np.nanmax(losses)) * 1.05 or 1.0

    def px(e, v, top=hi):
        return m + (e - x0) / (x1 - x0) * (w - 1.5 * m), h - m - v / top * (h - 1.5 * m)

    for col, color in (("train_loss", (31, 119, 180)), ("val_loss", (255, 127, 14))):
        pts = [px(e, v) for e, v in zip(ep, history[col], strict=True)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
    pts = [px(e, v, 1.0) for e, v in zip(ep, history["val_f1"], strict=True)]
    if len(pts) > 1:
        d.line(pts, fill=(44, 160, 44), width=2)
    d.text((m, 4), f"loss (blue train, orange val; 0-{hi:.3g}); val F1 (green, 0-1)", fill="black")
    d.text((m, h - m + 8), f"epoch {int(x0)} .. {int(x1)}", fill="black")
    with atomic_path(Path(path)) as tmp:
        im.save(tmp, format="PNG")
