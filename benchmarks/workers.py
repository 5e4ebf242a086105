"""Per-micrograph jobs on dask workers against one process: CTF estimation, LoG picking and
extraction of simulated micrographs.

Three ways on this machine, one after the other (after a warm-up pass in this process): one
process with 1 thread, a LocalCluster of
2 workers with 1 thread each (``tamis.workers.Workers(n=2)``), and one process with 2 threads.
Seconds per job (the cluster's start included), and whether the outputs equal the one-process
run's. Then a session's cluster (``TAMIS_DASK_SCHEDULER``): 2 workers started once, warmed by one
pass, timed on the next.

Run: ``.venv/bin/python benchmarks/workers.py --work DIR [--n 16] [--size 2048]``; prints a JSON
report (also ``DIR/report_workers.json``).
"""

from __future__ import annotations

import tamis  # noqa: F401  (before torch: sets its allocation options)

# isort: split
import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from tamis.extract import ExtractOptions, extract_particles
from tamis.io.mrc import read_mrc
from tamis.io.star import read_star
from tamis.pick.jobs import PickJob, micrograph_inputs, run_picker
from tamis.pick.log import LogOptions, pick_log
from tamis.prep.ctffind import CtfFindOptions, run_ctffind
from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs
from tamis.workers import Workers


def run_all(mics: Path, out: Path, workers: Workers, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    times = {}
    t = time.perf_counter()
    run_ctffind(mics, out / "ctf", CtfFindOptions(box=256, max_resolution=6, defocus_step=1000),
                log=lambda s: None, workers=workers)  # fmt: skip
    times["ctffind"] = time.perf_counter() - t
    opts = LogOptions(150, 250)
    t = time.perf_counter()
    run_picker(micrograph_inputs([mics]), out / "pick", lambda m, k: pick_log(m, opts),
               PickJob(diameter=250), log=lambda s: None, workers=workers)  # fmt: skip
    times["pick"] = time.perf_counter() - t
    t = time.perf_counter()
    extract_particles(mics, out / "pick" / "autopick.star", out / "extract",
                      ExtractOptions(extract_size=128, rescale=64), log=lambda s: None,
                      workers=workers)  # fmt: skip
    times["extract"] = time.perf_counter() - t
    return {k: round(v, 2) for k, v in times.items()}


def _same(a: Path, b: Path) -> bool:
    for f in sorted(a.rglob("*")):
        g = b / f.relative_to(a)
        if f.suffix in (".mrc", ".mrcs", ".ctf"):
            if not np.array_equal(read_mrc(f)[0], read_mrc(g)[0]):
                return False
        elif f.suffix == ".star":
            x, y = read_star(f), read_star(g)
            for k in x:
                if hasattr(x[k], "equals"):
                    xa = x[k].replace(str(a), "X", regex=True)
                    ya = y[k].replace(str(b), "X", regex=True)
                    if not xa.equals(ya):
                        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", required=True)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=2048)
    args = ap.parse_args()
    work = Path(args.work)
    star = work / "mics" / "micrographs.star"
    if not star.exists():
        simulate_micrographs(
            MicrographSimulation(n_micrographs=args.n, height_px=args.size, width_px=args.size,
                                 pixel_size=1.5, particles_per_micrograph=120, snr=0.1, seed=3),
            work / "mics",
        )  # fmt: skip
    cwd = os.getcwd()
    os.chdir(work)
    try:
        runs = {}
        run_all(Path("mics/micrographs.star"), Path("out_warmup"), Workers(), 1)  # caches, imports
        for name, workers, threads in (("1process_1thread", Workers(), 1),
                                       ("2workers_1thread", Workers(n=2, threads=1), 1),
                                       ("1process_2threads", Workers(), 2)):  # fmt: skip
            out = Path(f"out_{name}")
            runs[name] = run_all(Path("mics/micrographs.star"), out, workers, threads)
            print(name, runs[name], flush=True)
        # a session's workers, started once (TAMIS_DASK_SCHEDULER): warm, then timed
        import dask
        from dask.distributed import LocalCluster

        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        with (
            dask.config.set({"distributed.nanny.pre-spawn-environ": env}),
            LocalCluster(
                n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=40
            ) as cluster,
        ):
            session = Workers(n=2, cluster=cluster.scheduler_address)
            run_all(Path("mics/micrographs.star"), Path("out_session_warmup"), session, 1)
            runs["2workers_session"] = run_all(
                Path("mics/micrographs.star"), Path("out_2workers_session"), session, 1
            )
            print("2workers_session", runs["2workers_session"], flush=True)
        same = _same(Path("out_1process_1thread"), Path("out_2workers_1thread")) and _same(
            Path("out_1process_1thread"), Path("out_2workers_session")
        )
    finally:
        os.chdir(cwd)
    report = {
        "micrographs": args.n,
        "size": args.size,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "seconds": runs,
        "speedup_2workers": {
            k: round(runs["1process_1thread"][k] / runs["2workers_1thread"][k], 2)
            for k in runs["1process_1thread"]
        },
        "speedup_2workers_session": {
            k: round(runs["1process_1thread"][k] / runs["2workers_session"][k], 2)
            for k in runs["1process_1thread"]
        },
        "outputs_equal": same,
    }
    (work / "report_workers.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
