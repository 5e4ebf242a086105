"""The long run of the kill test (issue 19): ``.venv/bin/python scripts/fault_soak.py
[--rounds 50] [--seed 1]``. Each round kills every job of ``tests/faults/test_kill_jobs.JOBS`` at a
seeded random point, checks that no torn file is left under a final name, re-runs the job and
compares its outputs with an uninterrupted run's. Prints the counts."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.test_kill_jobs import kill_round  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    kills = mid = failures = 0
    t0 = time.perf_counter()
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            try:
                k, m = kill_round(Path(d), args.seed * 100_000 + r)
                kills, mid = kills + k, mid + m
            except Exception:  # noqa: BLE001 - a failed round is what this counts
                failures += 1
                print(f"round {r}: FAILED\n{traceback.format_exc(limit=8)}", flush=True)
        print(f"round {r + 1}/{args.rounds}: {kills} kills ({mid} before the exit marker), "
              f"{failures} failed rounds, {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
