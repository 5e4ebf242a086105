"""Pickers on real micrographs: EMPIAR-10017 (beta-galactosidase, Falcon, 4096x4096, 1.77 A/px),
stored by CryoSegNet as denoised 8-bit JPEGs with masks of discs drawn at manual picks.

Truth: the centres of the masks' connected components; a component larger than 1.6 single discs
(touching particles) is split at the maxima of its distance transform (at least 0.6 diameters
apart), as many as its area holds. The deep picker is trained on the first 3 micrographs and
every picker is scored on the other 3: average precision (picks ranked by FOM, match radius half
a diameter), precision/recall/F1 at the picker's default threshold, and seconds per micrograph
(reading included). LoG uses RELION's defaults with the diameter range 150-220 A; template
matching uses one template, the rotational average of the particles labelled in the 3 training
micrographs.

Run: ``.venv/bin/python benchmarks/pick_real.py [--data ../shared/data/micrographs/empiar-10017]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from tamis.extract import window_particles
from tamis.pick.deep.predict import DeepPicker, load_model, picks_from_scores
from tamis.pick.deep.train import TrainOptions, train_picker
from tamis.pick.evaluate import average_precision, score_picks
from tamis.pick.log import LogOptions, pick_log
from tamis.pick.micrograph import normalise, read_micrograph
from tamis.pick.peaks import find_peaks
from tamis.pick.template import TemplateOptions, pick_template

PIXEL = 1.77  # A/px, EMPIAR-10017
DISC_PX = 108  # disc diameter drawn in the masks


def mask_centres(path: Path) -> np.ndarray:
    m = np.asarray(Image.open(path).convert("L")) > 127
    labels, n = ndimage.label(m)
    idx = np.arange(1, n + 1)
    area = ndimage.sum_labels(m, labels, idx)
    disc = np.pi * (DISC_PX / 2) ** 2
    com = np.array(ndimage.center_of_mass(m, labels, idx)).reshape(-1, 2)
    centres = [com[i, ::-1] for i in range(n) if area[i] <= 1.6 * disc and area[i] >= 0.3 * disc]
    big = np.flatnonzero(area > 1.6 * disc)
    boxes = ndimage.find_objects(labels)
    for i in big:
        sl = boxes[i]
        region = labels[sl] == idx[i]
        dist = ndimage.distance_transform_edt(region)
        k = int(round(area[i] / disc))
        r, c, _ = find_peaks(torch.from_numpy(dist), 0.6 * DISC_PX, threshold=0.0, max_peaks=k)
        centres += [
            np.array([cc + sl[1].start, rr + sl[0].start], float)
            for rr, cc in zip(r, c, strict=True)
        ]
    return np.array(centres).reshape(-1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--data",
        default=str(Path(__file__).resolve().parents[2] / "shared/data/micrographs/empiar-10017"),
    )
    ap.add_argument("--work", default="bench_pick_real")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--finetune-epochs", type=int, default=6)
    args = ap.parse_args()
    data, work = Path(args.data), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = sorted(p for p in data.glob("*.jpg") if not p.stem.endswith("_mask"))
    truth = [mask_centres(p.with_name(p.stem + "_mask.jpg")) for p in names]
    mics = [read_micrograph(p, PIXEL) for p in names]
    diameter = DISC_PX * PIXEL
    train, test = list(range(3)), list(range(3, len(names)))
    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, cpu",
        "micrographs": [p.name for p in names],
        "true_particles": [len(t) for t in truth],
        "diameter_A": diameter,
    }
    # template: rotational average of the labelled training particles (white after inversion)
    box = 2 * int(0.75 * DISC_PX)
    stacks = []
    for i in train:
        img = -normalise(mics[i].image)
        stacks.append(window_particles(img, truth[i][:, 0], truth[i][:, 1], box))
    avg = torch.cat(stacks).mean(0).double()
    c = torch.arange(box, dtype=torch.float64) - box // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2).round().long()
    radial = torch.zeros(r.max() + 1, dtype=torch.float64).index_add_(0, r.flatten(), avg.flatten())
    radial /= torch.bincount(r.flatten()).double()
    template = radial[r][None].float()
    t0 = time.perf_counter()
    res = train_picker(
        [mics[i] for i in train],
        [truth[i] for i in train],
        work / "deep",
        TrainOptions(diameter=diameter, epochs=args.epochs, steps_per_epoch=30, batch_size=12),
    )
    report["deep_training_s"] = round(time.perf_counter() - t0, 1)
    model, meta = load_model(res.model)
    general, gmeta = load_model()
    # the normal path for data unlike the training set: fine-tune the shipped model on a few
    # labelled micrographs (here the same 3), with the positive-unlabelled loss
    from tamis.pick.deep.predict import SHIPPED_MODEL

    t0 = time.perf_counter()
    tuned = train_picker(
        [mics[i] for i in train],
        [truth[i] for i in train],
        work / "deep_finetuned",
        TrainOptions(diameter=diameter, epochs=args.finetune_epochs, steps_per_epoch=30,
                     batch_size=12, init=str(SHIPPED_MODEL), loss="pu", lr_initial=5e-4,
                     lr_final=1e-4),
    )  # fmt: skip
    report["deep_finetune_s"] = round(time.perf_counter() - t0, 1)
    tmodel, tmeta = load_model(tuned.model)
    # each trained model's recorded threshold (best validation F1), its picker's default
    report["deep_threshold"] = meta["threshold"]
    report["deep_finetune_threshold"] = tmeta["threshold"]
    pickers = {
        "LoG (150-220 A)": lambda m: pick_log(m, LogOptions(150, 220)),
        "template (20 A)": lambda m: pick_template(
            m,
            template,
            PIXEL,
            TemplateOptions(
                diameter=diameter, min_distance=0.7 * diameter, threshold=0.1, use_ctf=False
            ),
        ),
    }
    # deep pickers at their recorded thresholds; their average precision over all picks above
    # 0.5 as well (the main one is over the picks above each model's recorded threshold)
    nets = {"deep, trained on 3": (model, meta), "deep, shipped general model": (general, gmeta),
            "deep, shipped model fine-tuned on 3 (PU loss)": (tmodel, tmeta)}  # fmt: skip
    deep = {name: DeepPicker(net, net_meta, diameter) for name, (net, net_meta) in nets.items()}
    for name in [*pickers, *deep]:
        aps, aps_half, tot, secs = [], [], None, []
        for i in test:
            t = time.perf_counter()
            mic = read_micrograph(names[i], PIXEL)
            if name in deep:  # one network pass: picks at the threshold and above 0.5
                scores = deep[name].scores(mic)
                picks = picks_from_scores(*scores, deep[name].threshold)
            else:
                picks = pickers[name](mic)
            secs.append(time.perf_counter() - t)
            xy = np.stack([picks.x, picks.y], 1)
            aps.append(average_precision(xy, picks.fom, truth[i], 0.5 * DISC_PX))
            if name in deep:
                half = picks_from_scores(*scores, 0.5)
                xy_half = np.stack([half.x, half.y], 1)
                aps_half.append(average_precision(xy_half, half.fom, truth[i], 0.5 * DISC_PX))
            s = score_picks(xy, truth[i], 0.5 * DISC_PX)
            tot = s if tot is None else tot + s
        report[name] = {
            "average_precision": round(float(np.mean(aps)), 3),
            "precision": round(tot.precision, 3),
            "recall": round(tot.recall, 3),
            "f1": round(tot.f1, 3),
            "picks_per_manual_pick": round(tot.n_picks / max(1, tot.n_true), 2),
            "seconds_per_micrograph": round(float(np.mean(secs)), 2),
        }
        if aps_half:
            report[name]["threshold"] = deep[name].threshold
            report[name]["average_precision_above_0.5"] = round(float(np.mean(aps_half)), 3)
        print(name, report[name], flush=True)
    (work / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
