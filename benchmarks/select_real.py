"""Class selection on real particles (issues 20 and 21): the six EMPIAR-10017 micrographs
(beta-galactosidase, 1.77 A/px, denoised 8-bit JPEGs from CryoSegNet with masks of the manual
picks), picked by tamis's shipped deep picker at its default threshold with the pipeline's side
rule, extracted with ``tamis it``'s box rules, classified (VDAM as the proc scheme: 200
mini-batches, K 50, or what ``--K/--iter`` say), then ranked and selected with the shipped ranker
at its default threshold, with and without the particle screen. A pick within half a diameter
of a manual pick counts as a particle.

These JPEGs carry no CTF (denoised, no Thon rings), so the particles are given a CTF that is 1
everywhere (amplitude contrast 1, no defocus, no spherical aberration) and the 2D job runs with
``--ctf`` as the ranker needs: CTF correction is then a no-op, not a made-up fit.

Reports, before and after selection: particles (matched picks) and junk (unmatched picks),
precision (particles / kept) and recall (kept particles / manual picks inside the side rule).
The class gallery is copied to ``--gallery``.

``--background N`` adds N boxes per micrograph at random places at least a diameter from every
pick and every manual pick (known junk: empty background of the same micrographs), classified
and selected with the rest and reported as their own kind: a check that the selection removes
junk it can tell from particles, whatever the labels miss.

Run: ``.venv/bin/python benchmarks/select_real.py --work DIR [--data ../shared/data/micrographs/empiar-10017]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pick_real import PIXEL, mask_centres  # noqa: E402

from tamis.class2d import Class2DOptions, run_class2d  # noqa: E402
from tamis.extract import ExtractOptions, extract_particles  # noqa: E402
from tamis.io.mrc import write_mrc  # noqa: E402
from tamis.io.star import read_data_star, write_star  # noqa: E402
from tamis.pick.deep.predict import DeepPicker, load_model  # noqa: E402
from tamis.pick.evaluate import match_picks  # noqa: E402
from tamis.pick.micrograph import read_micrograph  # noqa: E402
from tamis.rank.select import RankOptions, rank_classes  # noqa: E402
from tamis.schemes.it import derived_options  # noqa: E402
from tamis.simulate.truth import image_key  # noqa: E402

DIAMETER = 191.0  # A, the masks' discs


def background_boxes(
    n: int, shape: tuple[int, int], edge: float, occupied: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Up to ``n`` random centres ``(x, y)`` inside the side rule, each at least a diameter from
    every point of ``occupied``."""
    h, w = shape
    xy = np.c_[rng.uniform(edge, w - edge, 40 * n), rng.uniform(edge, h - edge, 40 * n)]
    if len(occupied):
        dist = np.sqrt(((xy[:, None, :] - occupied[None]) ** 2).sum(-1)).min(1)
        xy = xy[dist > DIAMETER / PIXEL]
    return xy[:n]


def pick_and_extract(data: Path, work: Path, background: int = 0) -> tuple[Path, int]:
    """Pick, write MRC micrographs with a flat CTF, extract; label every particle from the
    manual picks (and ``background`` known-empty boxes per micrograph, see the module text).
    Returns the particles STAR file and the number of manual picks in bounds."""
    star = work / "extract" / "particles.star"
    info = work / "picks.json"
    if star.exists() and info.exists():
        return star, json.loads(info.read_text())["manual_in_bounds"]
    der = derived_options(PIXEL, DIAMETER, picker="deep")
    edge = der["proc__autopick__tamis_edge"] / PIXEL  # half a box, in pixels
    model, meta = load_model(None)
    picker = DeepPicker.from_model(model, meta, DIAMETER)
    (work / "mics").mkdir(parents=True, exist_ok=True)
    mic_rows, coords, truth_rows, n_manual = [], {}, [], 0
    for path in sorted(p for p in data.glob("*.jpg") if not p.name.endswith("_mask.jpg")):
        mic = read_micrograph(path, PIXEL)
        h, w = mic.shape
        p = picker.pick(mic)
        keep = (p.x >= edge) & (p.x < w - edge) & (p.y >= edge) & (p.y < h - edge)
        xy = np.c_[p.x[keep], p.y[keep]]
        manual = mask_centres(path.with_name(path.stem + "_mask.jpg"))
        inb = (manual[:, 0] >= edge) & (manual[:, 0] < w - edge)
        inb &= (manual[:, 1] >= edge) & (manual[:, 1] < h - edge)
        n_manual += int(inb.sum())
        matched = match_picks(xy, manual[inb], 0.5 * DIAMETER / PIXEL) >= 0
        kinds = np.where(matched, "particle", "junk")
        if background:
            rng = np.random.default_rng(len(truth_rows))
            bg = background_boxes(background, (h, w), edge, np.concatenate([xy, manual]), rng)
            xy = np.concatenate([xy, bg])
            kinds = np.concatenate([kinds, np.full(len(bg), "background")])
        name = f"mics/{path.stem}.mrc"
        write_mrc(work / name, np.asarray(mic.image, np.float32), PIXEL)
        mic_rows.append({"rlnMicrographName": name, "rlnOpticsGroup": 1, "rlnDefocusU": 0.0,
                         "rlnDefocusV": 0.0, "rlnDefocusAngle": 0.0})  # fmt: skip
        coords[name] = pd.DataFrame({"rlnCoordinateX": xy[:, 0], "rlnCoordinateY": xy[:, 1]})
        truth_rows.append((name, kinds))
        print(f"{path.name}: {len(matched)} picks, {int(matched.sum())} matched, "
              f"{int(inb.sum())} manual, {len(xy) - len(matched)} background boxes",
              flush=True)  # fmt: skip
    optics = pd.DataFrame([{
        "rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1,
        "rlnMicrographOriginalPixelSize": PIXEL, "rlnMicrographPixelSize": PIXEL,
        "rlnVoltage": 300.0, "rlnSphericalAberration": 0.0, "rlnAmplitudeContrast": 1.0,
    }])  # fmt: skip
    write_star({"optics": optics, "micrographs": pd.DataFrame(mic_rows)}, work / "mics.star")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        extract_particles(
            "mics.star", coords, Path("extract"),
            ExtractOptions(der["proc__extract__extract_size"], rescale=der["proc__extract__rescale"]),
            log=lambda s: None,
        )  # fmt: skip
    finally:
        os.chdir(cwd)
    parts = read_data_star(star).table
    rows = []
    for name, kinds in truth_rows:
        sel = parts[parts["rlnMicrographName"] == name]
        if len(sel) != len(kinds):
            raise RuntimeError(f"{name}: {len(sel)} extracted for {len(kinds)} boxes")
        for image, kind in zip(sel["rlnImageName"], kinds, strict=True):
            rows.append({"image_name": image, "kind": kind,
                         "structure": int(kind == "particle")})  # fmt: skip
    pd.DataFrame(rows).to_csv(work / "ground_truth.csv", index=False)
    info.write_text(json.dumps({"manual_in_bounds": n_manual}))
    return star, n_manual


def kinds_of(particles: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """Each particle row's kind (particle, junk, background) from the ground truth table."""
    kind = truth.set_index(truth["image_name"].map(image_key))["kind"]
    return kind.loc[particles["rlnImageName"].map(image_key)].to_numpy()


def box_contents(star: Path, truth: pd.DataFrame, gallery: Path | None) -> dict:
    """What the extracted boxes hold, per kind: the median intensity of the central third of
    each box (extraction normalises the background to mean 0, sd 1; particles are white), and,
    with background boxes, the share of each kind above the background boxes' 95th
    percentile. With ``gallery``, a PNG of 10 random boxes per kind (rows: particles, unmatched
    picks[, background]) and each kind's mean box in the last row."""
    from PIL import Image

    from tamis.io.particles import ParticleSet
    from tamis.pictures import to_uint8

    ps = ParticleSet.from_file(star, project_dir=star.parent.parent)
    kind = kinds_of(ps.particles, truth)
    boxes = ps.load_images(np.arange(len(ps))).numpy()
    n = boxes.shape[-1]
    c = boxes[:, n // 3 : n - n // 3, n // 3 : n - n // 3].mean((1, 2))
    names = [k for k in ("particle", "junk", "background") if (kind == k).any()]
    out = {k: {"boxes": int((kind == k).sum()), "centre_median": float(np.median(c[kind == k]))}
           for k in names}  # fmt: skip
    if "background" in names:
        q95 = float(np.quantile(c[kind == "background"], 0.95))
        for k in names:
            out[k]["above_background_q95"] = float((c[kind == k] > q95).mean())
    if gallery is not None:
        rng = np.random.default_rng(0)
        rows = []
        for k in names:
            pick = rng.choice(np.flatnonzero(kind == k), 10, replace=False)
            rows.append(np.concatenate([to_uint8(boxes[i]) for i in pick], 1))
        means = [to_uint8(boxes[kind == k].mean(0)) for k in names]
        means += [np.zeros((n, n), np.uint8)] * (10 - len(means))
        rows.append(np.concatenate(means, 1))
        Image.fromarray(np.concatenate(rows, 0)).save(gallery)
    return out


def outcome(particles: pd.DataFrame, truth: pd.DataFrame, n_manual: int) -> dict:
    k = kinds_of(particles, truth)
    real = int((k == "particle").sum())
    out = {"kept": len(k), "particles": real, "junk": len(k) - real,
           "precision": real / max(1, len(k)), "recall": real / max(1, n_manual)}  # fmt: skip
    if (truth["kind"] == "background").any():
        bg = int((k == "background").sum())
        out["unmatched_picks"] = len(k) - real - bg
        out["background_boxes"] = bg
        out["precision_picks_only"] = real / max(1, len(k) - bg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/select_real")
    ap.add_argument("--data", default="../shared/data/micrographs/empiar-10017")
    ap.add_argument("--K", type=int, default=50)
    ap.add_argument("--iter", type=int, default=200)
    ap.add_argument("--gallery", default=None, help="copy the class gallery PNG here")
    ap.add_argument("--model", default=None, help="ranker weights (default: the shipped ones)")
    ap.add_argument("--tag", default="", help="suffix of the rank_* folders and the report")
    ap.add_argument("--j", type=int, default=os.cpu_count() or 1, help="threads")
    ap.add_argument("--background", type=int, default=0, help="known-empty boxes per micrograph")
    ap.add_argument("--box_gallery", default=None, help="PNG of boxes per kind (box_contents)")
    args = ap.parse_args()
    torch.set_num_threads(args.j)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    star, n_manual = pick_and_extract(Path(args.data), work, args.background)
    der = derived_options(PIXEL, DIAMETER, picker="deep")
    opts = Class2DOptions.gui_vdam(
        iter=args.iter, K=args.K, particle_diameter=der["proc__class2d__particle_diameter"],
        random_seed=1, j=args.j,
    )  # fmt: skip
    done = sorted((work / "c2d").glob(f"run_it{args.iter:03d}_optimiser.star"))
    t = time.time()
    optimiser = (
        done[-1] if done
        else run_class2d(star, str(work / "c2d" / "run"), opts, log=lambda s: None).optimiser
    )  # fmt: skip
    seconds = time.time() - t
    truth = pd.read_csv(work / "ground_truth.csv")
    report = {"manual_in_bounds": n_manual, "class2d_seconds": round(seconds, 1)}
    report["extracted"] = outcome(read_data_star(star).table, truth, n_manual)
    report["box_contents"] = box_contents(
        star, truth, Path(args.box_gallery) if args.box_gallery else None
    )
    runs = (("classes_only", RankOptions(model=args.model, screen=None)),
            ("default", RankOptions(model=args.model)))  # fmt: skip
    for tag, options in runs:
        res = rank_classes(optimiser, work / f"rank_{tag}{args.tag}", options, log=lambda s: None)
        report[tag] = outcome(read_data_star(res.particles).table, truth, n_manual)
        report[tag]["classes_selected"] = len(res.selected)
    print(json.dumps(report, indent=1))
    (work / f"report{args.tag}.json").write_text(json.dumps(report, indent=1))
    if args.gallery:
        shutil.copy(work / f"rank_default{args.tag}" / "gallery.png", args.gallery)


if __name__ == "__main__":
    main()
