"""De novo 3D initial model on simulated particles, judged against the truth.

``.venv/bin/python benchmarks/initial_model.py --work DIR [--structure asym|c4] [--n 5000]
[--seed 1] [--iter 200] [--K 3] [--j 2] [--device cpu|cuda] [--relion PATH/relion_refine]
[--relion_iters N] [--resume]``

Data: ``--n`` particles of 64 px at 4 A/px, SNR 0.05, 10% junk (ice, carbon edges, aggregates,
empty boxes), defocus 0.8-2.5 um, from one structure: ``asym``, the hard 2D recipe's
two-subunit ribosome-sized pseudo-protein (~245 x 160 A: a large particle in the box), or
``c4``, four copies of a ~60 A pseudo-protein domain around the z axis (~150 A across).

tamis runs the InitialModel job's command (``--K 3 --iter 200 --grad --denovo_3dref --sym C1
--ctf --flatten_solvent --zero_mask --pad 1 --oversampling 1 --healpix_order 1 --offset_range 6
--offset_step 2 --tau2_fudge 4``, mask 260 A), then the largest class is aligned to the truth
(rotation, shift, either hand) and its FSC computed. The reference resolution is that of a
reconstruction of the same particles from their true orientations and shifts (CTF-weighted,
no prior), judged the same way. With ``--initial_model_sym`` (c4: C4) the symmetry is found
and applied as the InitialModel job does. With ``--relion``, RELION's relion_refine runs the
same command on the same files (``--grad_write_iter 1`` so that every iteration's files carry
a time stamp), stopped after ``--relion_iters`` iterations; per-iteration seconds go side by
side into the report.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from recipes import hard_structures  # noqa: E402

from tamis.class2d.fourier2d import FourierWindow  # noqa: E402
from tamis.fourier import rfft2_centered, shift_phases  # noqa: E402
from tamis.geometry import euler_to_matrix  # noqa: E402
from tamis.io.mrc import read_mrc, write_mrc  # noqa: E402
from tamis.io.particles import ParticleSet  # noqa: E402
from tamis.padded_grid import reconstruct  # noqa: E402
from tamis.refine.compare import compare_to_truth  # noqa: E402
from tamis.refine.fourier3d import back_project  # noqa: E402
from tamis.refine.initial_model import InitialModelOptions, run_initial_model  # noqa: E402
from tamis.simulate.particles import ParticleSimulation, simulate_particles  # noqa: E402
from tamis.simulate.structure import (  # noqa: E402
    atoms_to_volume,
    random_protein,
    rotate_about_z,
)

BOX, PIXEL, DIAMETER = 64, 4.0, 260.0


def _c4_structure(folder: Path) -> str:
    path = folder / "c4.mrc"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        dom, w = random_protein("random:41:2500")
        dom = dom + np.array([38.0, 0.0, 10.0])
        copies = [rotate_about_z(dom, np.pi / 2 * k) for k in range(4)]
        vol = atoms_to_volume(np.concatenate(copies), np.tile(w, 4), 160, 2.0, bfactor=50.0)
        write_mrc(path, vol.numpy(), 2.0)
    return str(path)


def simulate(work: Path, structure: str, n: int, seed: int) -> Path:
    star = work / "sim" / "particles.star"
    if not star.exists():
        spec = hard_structures(work / "structures")[0] if structure == "asym" else None
        spec = spec or _c4_structure(work / "structures")
        simulate_particles(
            ParticleSimulation(
                structures=[spec], n_particles=n, box_size=BOX, pixel_size=PIXEL, snr=0.05,
                junk_fraction=0.10, seed=seed,
            ),
            work / "sim",
        )  # fmt: skip
    return star


def true_orientation_map(work: Path) -> torch.Tensor:
    """Reconstruction of the true particles from their true angles and shifts."""
    import pandas as pd

    truth = pd.read_csv(work / "sim" / "ground_truth.csv")
    ps = ParticleSet.from_file(work / "sim" / "particles.star")
    keep = np.flatnonzero(truth["kind"].to_numpy() == "particle")
    window = FourierWindow.create(BOX, BOX)
    ctf_params = ps.ctf_params()
    m = 2 * BOX
    d = torch.zeros((1, m, m, m), dtype=torch.complex128)
    w = torch.zeros((1, m, m, m), dtype=torch.float64)
    for s in range(0, len(keep), 256):
        rows = keep[s : s + 256]
        img = ps.load_images(rows).to(torch.float64)
        spec = rfft2_centered(img)
        shift = torch.tensor(
            truth[["shift_x_px", "shift_y_px"]].to_numpy()[rows], dtype=torch.float64
        )
        # undo the simulated shift: move the content back by -shift
        spec = spec * shift_phases(-shift[:, None, None, :], *_freqs())
        ctf = ctf_params[torch.as_tensor(rows)].compute((BOX, BOX)).to(torch.float64)
        ang = torch.tensor(truth[["rot", "tilt", "psi"]].to_numpy()[rows], dtype=torch.float64)
        rot = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
        x = window.gather(spec * ctf)[None]
        cw = window.gather(ctf * ctf)[None]
        dd, ww = back_project(x, cw, rot, window, pad=2)
        d += dd
        w += ww
    return reconstruct(d, w, box=BOX, r_max=BOX / 2, tau2=None, pad=2)[0]


def _freqs():
    from tamis.fourier import rfft_frequencies

    ky, kx = rfft_frequencies((BOX, BOX), dtype=torch.float64)
    return kx, ky, (BOX, BOX)


def run_relion(relion: str, work: Path, star: Path, args, iters: int) -> list[float]:
    out = (work / "relion" / "run").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        relion, "--o", str(out), "--iter", str(args.iter), "--grad", "--denovo_3dref",
        "--i", star.name, "--ctf", "--K", str(args.K), "--sym", "C1", "--flatten_solvent",
        "--zero_mask", "--dont_combine_weights_via_disc", "--pool", "30", "--pad", "1",
        "--particle_diameter", str(DIAMETER), "--oversampling", "1", "--healpix_order", "1",
        "--offset_range", "6", "--offset_step", "2", "--auto_sampling", "--tau2_fudge", "4",
        "--j", str(args.j), "--grad_write_iter", "1", "--random_seed", str(args.seed),
    ]  # fmt: skip
    log = open(work / "relion" / "relion.log", "w")
    t0 = time.time()
    # image names in the STAR file are relative to its folder (RELION reads them from the cwd)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=star.parent)
    target = Path(f"{out}_it{iters:03d}_optimiser.star")
    while proc.poll() is None and not target.exists():
        time.sleep(2)
    proc.kill()
    stamps = [t0]
    for it in range(0, iters + 1):
        f = Path(f"{out}_it{it:03d}_optimiser.star")
        if f.exists():
            stamps.append(f.stat().st_mtime)
    return list(np.diff(stamps))


def save_report(work: Path, report: dict) -> None:
    """``report.json`` in ``work``, written whole (temp file, then rename)."""
    tmp = work / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=float))
    tmp.replace(work / "report.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--structure", choices=["asym", "c4"], default="asym")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--iter", type=int, default=200)
    ap.add_argument("--K", type=int, default=3)
    ap.add_argument("--j", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--relion", default="")
    ap.add_argument("--relion_iters", type=int, default=20)
    ap.add_argument("--skip_tamis", action="store_true")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue tamis's run in --work from its last written iteration (a whole job can "
        "take several sittings on 2 cores; each sitting's seconds are kept in the report)",
    )
    args = ap.parse_args()
    work = Path(args.work)
    torch.set_num_threads(args.j)
    star = simulate(work, args.structure, args.n, args.seed)
    truth = torch.from_numpy(read_mrc(work / "sim" / "structures" / "structure_01.mrc")[0])
    old = work / "report.json"
    report: dict = json.loads(old.read_text()) if old.exists() else {}  # runs add to it
    report.update(structure=args.structure, n=args.n, seed=args.seed)
    ref_path = work / "true_orientations.mrc"
    if not ref_path.exists():
        write_mrc(ref_path, true_orientation_map(work).numpy(), PIXEL, stack=False)
    ref = compare_to_truth(torch.from_numpy(read_mrc(ref_path)[0]), truth, PIXEL)
    report["true_orientations_res05"] = ref.resolution_05
    if not args.skip_tamis:
        t0 = time.perf_counter()
        sym = "C4" if args.structure == "c4" else None
        root = work / "InitialModel" / "run"
        written = sorted(root.parent.glob("run_it[0-9][0-9][0-9]_optimiser.star"))
        resume = written[-1] if args.resume and written else None
        if resume is None:  # a fresh run: the sittings of an earlier one are not this run's
            for key in ("tamis_sittings", "tamis_iteration_seconds"):
                report.pop(key, None)
        sittings = report.get("tamis_sittings", []) + [
            {"from_iteration": int(resume.name[6:9]) if resume else 0, "seconds": 0.0}
        ]
        per_it = dict(report.get("tamis_iteration_seconds", {}))
        last = [t0]

        def log(line: str) -> None:
            """Print, and keep the report current after every iteration (a sitting may be
            killed: the next ``--resume`` goes on from the last written iteration). An
            iteration's seconds: from the previous iteration's line (the first of a sitting
            from its start, set-up included) to its own."""
            print(line, flush=True)
            m = re.match(r"iteration\s+(\d+):", line)
            if m:
                now = time.perf_counter()
                per_it[m.group(1)] = now - last[0]
                last[0] = now
                sittings[-1]["seconds"] = now - t0
                report.update(
                    tamis_sittings=sittings,
                    tamis_seconds=sum(x["seconds"] for x in sittings),
                    tamis_iteration_seconds=per_it,
                )
                save_report(work, report)

        res = run_initial_model(
            None if resume else str(star), str(root),
            InitialModelOptions(K=args.K, iter=args.iter, particle_diameter=DIAMETER, j=args.j,
                                random_seed=args.seed, device=args.device),
            initial_model_sym=sym, continue_from=resume, log=log,
        )  # fmt: skip
        sittings[-1]["seconds"] = time.perf_counter() - t0
        report.update(tamis_sittings=sittings, tamis_seconds=sum(x["seconds"] for x in sittings))
        found = compare_to_truth(torch.from_numpy(read_mrc(res.initial_model)[0]), truth, PIXEL)
        report.update(
            tamis_res05=found.resolution_05,
            tamis_res0143=found.resolution_0143,
            tamis_correlation=found.correlation,
            tamis_hand_flipped=found.flipped,
            tamis_class=res.chosen_class,
            tamis_symmetry_score=res.symmetry_score,
            success=found.resolution_05 <= 1.2 * ref.resolution_05,
        )
    if args.relion:
        report["relion_iteration_seconds"] = run_relion(
            args.relion, work, star, args, args.relion_iters
        )
    save_report(work, report)
    print(json.dumps(report, default=float))


if __name__ == "__main__":
    main()
