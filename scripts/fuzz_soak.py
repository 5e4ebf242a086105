"""The long run of the reader fuzzer (issue 19): ``.venv/bin/python scripts/fuzz_soak.py
[--n 10000] [--seed 1] [--out DIR] [--readers star,mrc,...]``. Prints per reader the cases, the inputs read, the inputs
refused with one TamisError line, the findings (any other exception, a multi-line error or a
hang) and the wall time; findings are saved under ``--out`` for a re-run."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.fuzz import fuzz_reader, short  # noqa: E402
from tests.faults.readers import readers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10000, help="cases per reader")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="fuzz_findings")
    ap.add_argument("--readers", default="", help="comma-separated names (default: all)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # mrcfile's warnings on odd headers are expected here
    out = Path(args.out)
    summary = {}
    only = {x for x in args.readers.split(",") if x}
    for r in readers():
        if only and r.name not in only:
            continue
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            rep = fuzz_reader(r.name, r.read, r.seeds, Path(d), args.n, args.seed, binary=r.binary)
        dt = time.perf_counter() - t
        summary[r.name] = dict(
            cases=rep.cases, read=rep.accepted, refused=rep.rejected,
            findings=len(rep.findings), hangs=rep.hangs, seconds=round(dt, 1),
        )  # fmt: skip
        print(r.name, summary[r.name], flush=True)
        for i, (data, tb) in enumerate(rep.findings):
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{r.name}_{i}.bin").write_bytes(data)
            (out / f"{r.name}_{i}.txt").write_text(tb)
            if i < 3:
                print(short(tb, 4))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
