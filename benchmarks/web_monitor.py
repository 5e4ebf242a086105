"""Page-load times of ``tamis web`` on a large synthetic project: 10,000 micrographs (CTF table,
one coordinate file each) and a 2D job with 200 classes. Serves the project with uvicorn on
127.0.0.1 and times each page and live fragment with httpx (p50/p95 over --repeats requests,
after one warm-up request that renders the thumbnails).

    .venv/bin/python benchmarks/web_monitor.py --out /tmp/webbench
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import uvicorn

from tamis.io.mrc import write_mrc
from tamis.io.star import write_star
from tamis.pipeline.star import Pipeline
from tamis.web.app import create_app


def make_project(root: Path, n_mics: int, n_classes: int, n_parts: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline()
    for d, label in (("CtfFind", "relion.ctffind"), ("AutoPick", "relion.autopick.log"),
                     ("Class2D", "relion.class2d")):  # fmt: skip
        pipe.add_process(d, label, status="Succeeded")
    pipe.write(root / "default_pipeline.star")
    names = [f"Micrographs/FoilHole_{i:06d}.mrc" for i in range(n_mics)]
    (root / "CtfFind/job001").mkdir(parents=True, exist_ok=True)
    write_star({
        "optics": pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1]}),
        "micrographs": pd.DataFrame({
            "rlnMicrographName": names, "rlnOpticsGroup": 1,
            "rlnDefocusU": rng.uniform(8000, 25000, n_mics), "rlnDefocusV": rng.uniform(8000, 25000, n_mics),
            "rlnCtfMaxResolution": rng.uniform(3, 9, n_mics)}),
    }, root / "CtfFind/job001/micrographs_ctf.star")  # fmt: skip
    pick = root / "AutoPick/job002/Micrographs"
    pick.mkdir(parents=True, exist_ok=True)
    coords = []
    for i, n in enumerate(names):
        f = pick / f"{Path(n).stem}_autopick.star"
        xy = rng.uniform(0, 4000, (int(rng.integers(50, 300)), 2))
        body = "\n".join(f"{x:.1f} {y:.1f}" for x, y in xy)
        f.write_text(f"\ndata_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n{body}\n")
        coords.append(str(f.relative_to(root)))
        if i % 2000 == 0:
            print(f"  {i} coordinate files", flush=True)
    write_star({"coordinate_files": pd.DataFrame({"rlnMicrographName": names,
                                                  "rlnMicrographCoordinates": coords})},
               root / "AutoPick/job002/autopick.star")  # fmt: skip
    c2d = root / "Class2D/job003"
    c2d.mkdir(parents=True, exist_ok=True)
    write_mrc(c2d / "run_it025_classes.mrcs",
              rng.normal(size=(n_classes, 64, 64)).astype(np.float32), 2.0)  # fmt: skip
    dist = rng.dirichlet(np.ones(n_classes))
    write_star({
        "model_general": {"rlnCurrentResolution": 8.0},
        "model_classes": pd.DataFrame({
            "rlnReferenceImage": [f"{i:06d}@Class2D/job003/run_it025_classes.mrcs"
                                  for i in range(1, n_classes + 1)],
            "rlnClassDistribution": dist, "rlnEstimatedResolution": rng.uniform(6, 30, n_classes)}),
    }, c2d / "run_it025_model.star")  # fmt: skip
    write_star({
        "optics": pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1]}),
        "particles": pd.DataFrame({
            "rlnImageName": [f"{i % 1000 + 1:06d}@Extract/p{i // 1000}.mrcs" for i in range(n_parts)],
            "rlnClassNumber": rng.integers(1, n_classes + 1, n_parts)}),
    }, c2d / "run_it025_data.star")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/webbench")
    ap.add_argument("--mics", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--particles", type=int, default=300_000)
    ap.add_argument("--repeats", type=int, default=40)
    a = ap.parse_args()
    root = Path(a.out)
    if not (root / "default_pipeline.star").exists():
        t0 = time.time()
        make_project(root, a.mics, a.classes, a.particles)
        print(f"project made in {time.time() - t0:.0f} s: {root}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=port,
                                        log_level="warning"))  # fmt: skip
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    pages = [
        "/",
        "/micrographs",
        "/class2d",
        "/live/micrographs",
        "/live/class2d?job=Class2D/job003/",
    ]
    with httpx.Client(base_url=base, timeout=120) as c:
        for p in pages:
            t0 = time.perf_counter()
            r = c.get(p)
            first = time.perf_counter() - t0
            if p == "/class2d":  # render every thumbnail once, as a browser would
                t1 = time.perf_counter()
                for n in range(1, a.classes + 1):
                    c.get(f"/img/class?job=Class2D/job003/&n={n}&it=25")
                print(f"  {a.classes} thumbnails in {time.perf_counter() - t1:.1f} s")
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                r = c.get(p)
                times.append(time.perf_counter() - t0)
            ms = 1000 * np.asarray(times)
            print(f"{p:40s} {r.status_code} {len(r.content) / 1e3:8.0f} kB  first {1000 * first:7.0f} ms"
                  f"  p50 {np.percentile(ms, 50):6.0f} ms  p95 {np.percentile(ms, 95):6.0f} ms")  # fmt: skip
    srv.should_exit = True


if __name__ == "__main__":
    main()
