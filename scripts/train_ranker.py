"""Build the class ranker's training set from tamis's own 2D classification of simulated data,
train RELION's network on it, and evaluate on held-out jobs (structures and seeds not used in
training). Writes the weights the package ships (``src/tamis/data/ranker_general.*``) with
``--install``.

Each job: a random data set (one to three random pseudo-proteins ``random:SEED[:RESIDUES]`` or
PDB 8ZPM / its receptor chain, 1,000-2,000 particles, box 48-64 px, 2.4-3.6 A/px, SNR 0.02-0.15,
junk 10-40% of every kind), classified by EM (12 iterations) or VDAM (50 mini-batches) with
K = 10-30; every class labelled from the truth of its members (``tiers_from_truth``: majority
structure and purity -> RELION's target tiers). Test jobs use structures and seeds of their own.

Variety jobs (``--variety-jobs``): assemblies of random pseudo-proteins (a ribosome-like large
and small subunit, rings, rods, single proteins) filling 45-90% of a 64-px box, VDAM or EM; the
first family's particles are small in their boxes, and a ranker trained on them alone rejected
every class of box-filling particles on data of another generator (BENCHMARKS.md).

Class images enter in each job's own intensity unit (``--image-scale job``, the default;
``absolute`` is RELION's), and ``--members N`` trains N networks from different seeds whose mean
score is the ranker. ``--install`` ships the result in float16. The shipped ranker:
``--jobs 12 --mic-jobs 4 --variety-jobs 40 --test-jobs 8 --mic-test-jobs 3 --variety-test-jobs 4
--epochs 150 --members 3 --install`` (BENCHMARKS.md, "Class selection on data it was not tuned
on").

Run: ``.venv/bin/python scripts/train_ranker.py --jobs 40 --test-jobs 8 [--install]``
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from tamis.class2d import Class2DOptions, run_class2d
from tamis.rank.evaluate import auroc, class_reference_rates, particle_rates
from tamis.rank.features import network_features
from tamis.rank.screen import ScreenOptions
from tamis.rank.select import (
    RankOptions,
    image_scale_of,
    job_inputs,
    load_ranker,
    rank_classes,
)
from tamis.rank.train import (
    Examples,
    RankTrainOptions,
    job_examples,
    tiers_from_truth,
    train_ranker,
)
from tamis.simulate.particles import ParticleSimulation, simulate_particles

TARGET = Path(__file__).resolve().parents[1] / "src" / "tamis" / "data" / "ranker_general"


def make_job(work: Path, j: int, test: bool) -> tuple[Path, Path, dict]:
    rng = np.random.default_rng(10_000 * (2 if test else 1) + j)
    base = 50_000 if test else 0  # held-out jobs use other random structures
    pool = [
        f"random:{base + int(rng.integers(0, 10_000))}:{int(rng.integers(250, 900))}"
        for _ in range(3)
    ]
    if not test and rng.random() < 0.3:
        pool[0] = str(rng.choice(["builtin:8zpm", "builtin:8zpm@R"]))
    structures = pool[: int(rng.integers(1, 4))]
    cfg = dict(
        structures=structures,
        n_particles=int(rng.integers(1000, 2000)),
        box_size=int(rng.choice([48, 64])),
        pixel_size=float(rng.uniform(2.4, 3.6)),
        snr=float(rng.uniform(0.02, 0.15)),
        junk_fraction=float(rng.uniform(0.1, 0.4)),
        seed=int(rng.integers(0, 1_000_000)),
    )
    d = work / f"{'test' if test else 'train'}_{j:03d}"
    if not (d / "sim" / "particles.star").exists():
        simulate_particles(ParticleSimulation(**cfg), d / "sim")
    k = int(rng.integers(10, 31))
    grad = bool(rng.random() < 0.5)
    diameter = 0.9 * cfg["box_size"] * cfg["pixel_size"]
    common = dict(K=k, particle_diameter=diameter, random_seed=cfg["seed"], j=os.cpu_count() or 1)
    opts = (
        Class2DOptions.gui_vdam(iter=50, **common)
        if grad
        else Class2DOptions.gui_em(iter=12, **common)
    )
    opt = sorted((d / "c2d").glob("run_it*_optimiser.star"))
    if not opt or f"it{opts.iter:03d}" not in opt[-1].name:
        result = run_class2d(
            d / "sim" / "particles.star", str(d / "c2d" / "run"), opts, log=lambda s: None
        )
        optimiser = result.optimiser
    else:
        optimiser = opt[-1]
    cfg.update(K=k, algorithm="vdam" if grad else "em")
    return optimiser, d / "sim" / "ground_truth.csv", cfg


def assembly_map(folder: Path, kind: str, seed: int) -> str:
    """Write a random assembly's map (2 A/px) once and return its path as a structure spec:
    ``two_lobe`` (a ribosome-like large and small subunit), ``ring`` (4-9 copies of a domain on a
    circle), ``rod`` (3-6 domains in a twisted line, elongated) or ``single`` (one pseudo-protein
    of 250-3,000 residues)."""
    from tamis.io.mrc import write_mrc
    from tamis.simulate.structure import atoms_to_volume, random_protein, rotate_about_z

    path = folder / f"{kind}_{seed}.mrc"
    if path.exists():
        return str(path)
    rng = np.random.default_rng(seed)

    def protein(n_res: int) -> tuple[np.ndarray, np.ndarray]:  # centred on its centroid
        return random_protein(f"random:{int(rng.integers(0, 10**6))}:{n_res}")

    if kind == "two_lobe":
        big, wb = protein(int(rng.integers(6000, 20000)))
        small, ws = protein(int(rng.integers(2000, 9000)))
        r = float(np.percentile(np.linalg.norm(big, axis=1), 90))
        xyz, w = np.concatenate([big, small + [0.8 * r, 0.0, 0.0]]), np.concatenate([wb, ws])
    elif kind == "ring":
        dom, wd = protein(int(rng.integers(500, 1500)))
        n, radius = int(rng.integers(4, 10)), float(rng.uniform(45.0, 90.0))
        xyz = np.concatenate([rotate_about_z(dom + [radius, 0, 0], 2 * np.pi * k / n)
                              for k in range(n)])  # fmt: skip
        w = np.tile(wd, n)
    elif kind == "rod":
        dom, wd = protein(int(rng.integers(400, 1200)))
        n = int(rng.integers(3, 7))
        step, twist = 2.0 * float(np.percentile(np.linalg.norm(dom, axis=1), 70)), rng.uniform(0, 1)
        xyz = np.concatenate([rotate_about_z(dom, twist * k) + [0.0, 0.0, step * k]
                              for k in range(n)])  # fmt: skip
        w = np.tile(wd, n)
    else:
        xyz, w = protein(int(rng.integers(250, 3000)))
    folder.mkdir(parents=True, exist_ok=True)
    vol = atoms_to_volume(xyz, w, 192, 2.0, bfactor=50.0)  # it centres the atoms itself
    write_mrc(path, vol.numpy(), 2.0)
    return str(path)


def make_variety_job(work: Path, j: int, test: bool) -> tuple[Path, Path, dict]:
    """A particle-stack job of more variety than ``make_job``: assemblies (two-lobe, ring, rod,
    single) filling 45-90% of a 64-px box (so pixel sizes of about 1.5-8 A/px), 800-1,300
    particles, VDAM (30 or 50 mini-batches) or EM (10 iterations); coloured noise from job 30
    on (and in odd test jobs)."""
    from tamis.simulate.structure import structure_diameter

    rng = np.random.default_rng(40_000 * (2 if test else 1) + j)
    kinds = ["two_lobe", "ring", "rod", "single"]
    n_struct = int(rng.integers(1, 3))
    chosen = [str(k) for k in rng.choice(kinds, size=n_struct, replace=False)]
    base = 900_000 if test else 800_000
    structures = [assembly_map(work / "structures", k, base + 1000 * j + i)
                  for i, k in enumerate(chosen)]  # fmt: skip
    diam = max(structure_diameter(s) for s in structures)
    fill = float(rng.uniform(0.45, 0.9))
    pixel = round(diam / (fill * 64), 3)
    cfg = dict(
        structures=structures, n_particles=int(rng.integers(800, 1300)), box_size=64,
        pixel_size=pixel, snr=float(rng.uniform(0.02, 0.12)),
        junk_fraction=float(rng.uniform(0.1, 0.3)), seed=int(rng.integers(0, 1_000_000)),
    )  # fmt: skip
    # coloured noise (ice, beam-induced blur) from job 30 on and in every other test job; its
    # own generator, so the draws above stay those of the first jobs
    noise_rng = np.random.default_rng(60_000 * (2 if test else 1) + j)
    if (j >= 30) if not test else (j % 2 == 1):
        cfg.update(low_res_noise=float(noise_rng.uniform(1.0, 4.0)),
                   low_res_noise_scale=float(noise_rng.uniform(30.0, 100.0)))  # fmt: skip
    d = work / f"{'vtest' if test else 'vtrain'}_{j:03d}"
    if not (d / "sim" / "particles.star").exists():
        simulate_particles(ParticleSimulation(**cfg), d / "sim")
    k = int(rng.integers(10, 25))
    grad = bool(rng.random() < 0.75)
    mask = min(1.1 * diam, 0.98 * 64 * pixel)
    common = dict(K=k, particle_diameter=round(mask, 1), random_seed=cfg["seed"],
                  j=os.cpu_count() or 1)  # fmt: skip
    opts = (
        Class2DOptions.gui_vdam(iter=int(rng.choice([30, 50])), **common)
        if grad
        else Class2DOptions.gui_em(iter=10, **common)
    )
    opt = sorted((d / "c2d").glob(f"run_it{opts.iter:03d}_optimiser.star"))
    if opt:
        optimiser = opt[-1]
    else:
        result = run_class2d(d / "sim" / "particles.star", str(d / "c2d" / "run"), opts, log=_quiet)
        optimiser = result.optimiser
    cfg.update(K=k, algorithm="vdam" if grad else "em", kinds=chosen, diameter=diam, fill=fill)
    return optimiser, d / "sim" / "ground_truth.csv", cfg


def make_mic_job(work: Path, j: int, test: bool) -> tuple[Path, Path, dict]:
    """A job as the pipeline makes it: simulated micrographs (with CTF-modulated ice scattering,
    ice, aggregates, carbon edges), every object extracted at its true position as tamis it's
    derived box and down-sampling would, VDAM 2D classification. Labels from the truth."""
    import math

    import pandas as pd

    from tamis.extract import ExtractOptions, extract_particles
    from tamis.schemes.it import derived_options
    from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs
    from tamis.simulate.structure import structure_diameter

    rng = np.random.default_rng(30_000 * (2 if test else 1) + j)
    base = 50_000 if test else 0
    pool = [f"random:{base + int(rng.integers(0, 10_000))}:{int(rng.integers(250, 900))}"
            for _ in range(2)]  # fmt: skip
    if not test and rng.random() < 0.4:
        pool[0] = "builtin:8zpm"
    structures = pool[: int(rng.integers(1, 3))]
    pixel = float(rng.uniform(1.0, 1.8))
    cfg = dict(
        structures=structures, n_micrographs=int(rng.integers(10, 17)), height_px=1024,
        width_px=1024, pixel_size=pixel, particles_per_micrograph=int(rng.integers(40, 70)),
        snr=float(rng.uniform(0.05, 0.15)), ice_per_micrograph=float(rng.uniform(0.5, 3)),
        aggregates_per_micrograph=float(rng.uniform(0.5, 3)), carbon_fraction=0.3,
        ice_scattering=0.3, seed=int(rng.integers(0, 1_000_000)),
    )  # fmt: skip
    d = work / f"{'mtest' if test else 'mtrain'}_{j:03d}"
    if not (d / "sim" / "micrographs.star").exists():
        simulate_micrographs(MicrographSimulation(**cfg), d / "sim")
    diameter = max(structure_diameter(st) for st in structures)
    der = derived_options(pixel, diameter)
    truth = pd.read_csv(d / "sim" / "ground_truth.csv")
    gt = d / "extracted_truth.csv"
    if not (d / "ex" / "particles.star").exists():
        coords = {
            m: pd.DataFrame(
                {"rlnCoordinateX": t["x"].to_numpy(), "rlnCoordinateY": t["y"].to_numpy()}
            )
            for m, t in truth.groupby("micrograph_name")
        }
        cwd = os.getcwd()
        os.chdir(d / "sim")
        try:
            extract_particles(
                "micrographs.star", coords, Path("../ex"),
                ExtractOptions(der["proc__extract__extract_size"],
                               rescale=der["proc__extract__rescale"], float16=False),
                log=_quiet,
            )  # fmt: skip
        finally:
            os.chdir(cwd)
    if not gt.exists():
        from tamis.io.star import read_star

        parts = read_star(d / "ex" / "particles.star")["particles"]
        rows = []
        for m, t in truth.groupby("micrograph_name", sort=False):
            sel = parts[parts["rlnMicrographName"] == m]
            for (_, p), (_, o) in zip(sel.iterrows(), t.iterrows(), strict=True):
                rows.append({"image_name": p["rlnImageName"], "kind": o["kind"],
                             "structure": o["structure"]})  # fmt: skip
        pd.DataFrame(rows).to_csv(gt, index=False)
    k = int(rng.integers(8, 21))
    opts = Class2DOptions.gui_vdam(
        iter=int(rng.choice([30, 40, 60])), K=k,
        particle_diameter=float(der["proc__class2d__particle_diameter"]),
        random_seed=cfg["seed"], j=os.cpu_count() or 1,
    )  # fmt: skip
    opt = sorted((d / "c2d").glob("run_it*_optimiser.star"))
    if not opt or f"it{opts.iter:03d}" not in opt[-1].name:
        result = run_class2d(d / "ex" / "particles.star", str(d / "c2d" / "run"), opts, log=_quiet)
        optimiser = result.optimiser
    else:
        optimiser = opt[-1]
    cfg.update(K=k, algorithm="vdam", source="micrographs", diameter=diameter,
               particles=math.nan)  # fmt: skip
    return optimiser, gt, cfg


def _quiet(_: str) -> None:
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/ranker_jobs")
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--test-jobs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--mic-jobs", type=int, default=0, help="pipeline-style training jobs")
    ap.add_argument("--mic-test-jobs", type=int, default=0, help="pipeline-style test jobs")
    ap.add_argument("--variety-jobs", type=int, default=0, help="assembly jobs (two-lobe, ...)")
    ap.add_argument("--variety-test-jobs", type=int, default=0, help="held-out assembly jobs")
    ap.add_argument("--model", default=None, help="evaluate these weights (no training)")
    ap.add_argument("--report", default=None, help="write the evaluation JSON here")
    ap.add_argument(
        "--image-scale", default="job", choices=["job", "absolute"],
        help="class images in the job's intensity unit (default) or as written",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=12, help="training seed (validation split, order)")
    ap.add_argument("--members", type=int, default=1, help="networks averaged (an ensemble)")
    ap.add_argument("--install", action="store_true")
    ap.add_argument(
        "--evaluate-only", action="store_true", help="evaluate the model already in --work/ranker"
    )
    args = ap.parse_args()
    work = Path(args.work)
    scale = args.image_scale
    if args.model:  # evaluate a model in the unit it was trained in
        scale = image_scale_of(load_ranker(args.model)[1])
    train_parts, test_parts, records, test_jobs = [], [], [], []
    specs = [(make_job, j, False) for j in range(args.jobs)]
    specs += [(make_mic_job, j, False) for j in range(args.mic_jobs)]
    specs += [(make_variety_job, j, False) for j in range(args.variety_jobs)]
    specs += [(make_job, j, True) for j in range(args.test_jobs)]
    specs += [(make_mic_job, j, True) for j in range(args.mic_test_jobs)]
    specs += [(make_variety_job, j, True) for j in range(args.variety_test_jobs)]
    for j, (maker, jj, test) in enumerate(specs):
        optimiser, truth, cfg = maker(work, jj, test)
        tiers = tiers_from_truth(optimiser, truth)
        ex = job_examples(optimiser, tiers, job_index=j, image_scale=scale)
        (test_parts if test else train_parts).append(ex)
        if test:
            test_jobs.append((optimiser, truth, tiers))
        records.append(
            {
                "job": j,
                "test": test,
                **cfg,
                "classes": int(len(tiers)),
                "good": int((tiers > 0).sum()),
            }
        )
        print(f"job {j}: {cfg}", flush=True)
    train = Examples.concat(train_parts) if train_parts else None
    model = Path(args.model) if args.model else work / "ranker.safetensors"
    if not args.model and not (args.evaluate_only and model.exists()):
        model = train_ranker(
            train,
            work / "ranker",
            RankTrainOptions(
                epochs=args.epochs, image_scale=scale, seed=args.seed, members=args.members
            ),
            provenance={"script": "scripts/train_ranker.py", "jobs": records},
        )
    net, meta = load_ranker(model)
    test = Examples.concat(test_parts)
    with torch.no_grad():
        s = net(
            torch.from_numpy(test.images)[:, None],
            torch.from_numpy(network_features(test.features)),
        )[:, 0].numpy()
    clear = np.isin(test.tiers, (0, 1, 2))
    # particle level: the default selection (the model's threshold, then the particle screen) on
    # every held-out job, and the class selection alone
    rates, ref_rates, oracle_rates, class_only, fixed = [], [], [], [], []
    job_aurocs = []  # per job: the selection's class ranking, the network's
    ev = work / f"eval_{model.stem}"
    for j, (optimiser, truth, tiers) in enumerate(test_jobs):
        res = rank_classes(
            optimiser, ev / "default" / f"test_{j:03d}", RankOptions(model=str(model)), log=_quiet
        )
        data = job_inputs(optimiser)["data"].table
        r = particle_rates(data, res.particles, truth)
        rates.append(r)
        clear_j = (res.scores > -999) & np.isin(tiers, (0, 1, 2))
        job_aurocs.append(
            (auroc(res.selection[clear_j], tiers[clear_j] > 0),
             auroc(res.scores[clear_j], tiers[clear_j] > 0))
        )  # fmt: skip
        res0 = rank_classes(
            optimiser, ev / "classes" / f"test_{j:03d}",
            RankOptions(model=str(model), screen=None, gallery=False), log=_quiet,
        )  # fmt: skip
        class_only.append(particle_rates(data, res0.particles, truth))
        res1 = rank_classes(
            optimiser, ev / "fixed" / f"test_{j:03d}",
            RankOptions(model=str(model), screen=ScreenOptions(adaptive=False), gallery=False),
            log=_quiet,
        )  # fmt: skip
        fixed.append(particle_rates(data, res1.particles, truth))
        good = [c + 1 for c in np.flatnonzero(np.isin(tiers, (1, 2)))]
        classes = data["rlnClassNumber"].astype(int).to_numpy()
        ref_rates.append(class_reference_rates(classes, res.selected, good))
        oracle = data[np.isin(classes, [c + 1 for c in np.flatnonzero(tiers > 0)])]
        oracle_rates.append(particle_rates(data, oracle, truth))
        print(f"test job {j}: truth {r}; reference classes {ref_rates[-1]}", flush=True)

    def pooled_rates(rs: list[dict]) -> tuple[float, float]:
        p = {k: sum(r[k] for r in rs) for k in ("tp", "fp", "fn", "tn")}
        return p["fp"] / max(1, p["fp"] + p["tn"]), p["fn"] / max(1, p["fn"] + p["tp"])

    n_stack, n_old = args.test_jobs, args.test_jobs + args.mic_test_jobs
    pooled = {k: sum(r[k] for r in rates) for k in ("tp", "fp", "fn", "tn")}
    report = {
        "test_auroc_good_vs_bad": auroc(s[clear], test.good[clear]),
        "test_auroc_good_vs_rest": auroc(s, test.good),
        # mean over jobs of the class ranking AUROC (good tiers 1-2 against bad), the score the
        # default selection uses (network x the screen's passing share) and the network's
        "test_selection_auroc_mean_over_jobs": float(np.nanmean([a for a, _ in job_aurocs])),
        "test_network_auroc_mean_over_jobs": float(np.nanmean([b for _, b in job_aurocs])),
        "n_test_classes": len(test),
        "n_test_classes_good": int(test.good.sum()),
        "n_test_classes_bad": int((test.tiers == 0).sum()),
        "particles_false_positive_rate": pooled["fp"] / max(1, pooled["fp"] + pooled["tn"]),
        "particles_false_negative_rate": pooled["fn"] / max(1, pooled["fn"] + pooled["tp"]),
        "particles_junk_in_selection": pooled["fp"] / max(1, pooled["fp"] + pooled["tp"]),
        "fixed_screen_false_positive_rate": pooled_rates(fixed)[0],
        "fixed_screen_false_negative_rate": pooled_rates(fixed)[1],
        "class_selection_only_false_positive_rate": pooled_rates(class_only)[0],
        "class_selection_only_false_negative_rate": pooled_rates(class_only)[1],
        "stack_jobs_false_positive_rate": pooled_rates(rates[:n_stack])[0],
        "stack_jobs_false_negative_rate": pooled_rates(rates[:n_stack])[1],
        "pipeline_jobs_false_positive_rate": pooled_rates(rates[n_stack:n_old])[0],
        "pipeline_jobs_false_negative_rate": pooled_rates(rates[n_stack:n_old])[1],
        "pipeline_jobs_class_selection_only_false_positive_rate": pooled_rates(
            class_only[n_stack:n_old]
        )[0],
        "pipeline_jobs_class_selection_only_false_negative_rate": pooled_rates(
            class_only[n_stack:n_old]
        )[1],
        "tamis_family_false_positive_rate": pooled_rates(rates[:n_old])[0],
        "tamis_family_false_negative_rate": pooled_rates(rates[:n_old])[1],
        "variety_jobs_false_positive_rate": pooled_rates(rates[n_old:])[0]
        if rates[n_old:]
        else None,
        "variety_jobs_false_negative_rate": pooled_rates(rates[n_old:])[1]
        if rates[n_old:]
        else None,
        "reference_classes_false_positive_rate": pooled_rates(ref_rates)[0],
        "reference_classes_false_negative_rate": pooled_rates(ref_rates)[1],
        "oracle_selection_false_positive_rate": pooled_rates(oracle_rates)[0],
        "oracle_selection_false_negative_rate": pooled_rates(oracle_rates)[1],
        "per_job": rates,
    }
    meta["test"] = report
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, default=str))
    if not args.model:
        model.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "per_job"}, indent=2))
    if args.install:
        install(model)


def install(model: Path) -> None:
    """Ship ``model`` as the package's ranker, its weights stored in float16 (an ensemble of
    three networks in float32 is 7 MB; the loader casts them back), with its record."""
    from safetensors.torch import load_file, save_file

    state = {k: v.half() for k, v in load_file(str(model)).items()}
    save_file(state, str(TARGET.with_suffix(".safetensors")), metadata={"format": "pt"})
    meta = json.loads(model.with_suffix(".json").read_text())
    meta["stored_dtype"] = "float16"
    TARGET.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))


if __name__ == "__main__":
    main()
