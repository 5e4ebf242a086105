"""``python -m tamis.pipeline.execute JOBDIR``: run one job directory (the local runner's child
process). Exit status 0 whatever the job's outcome: the outcome is in the exit marker."""

from __future__ import annotations

import sys

from tamis.pipeline.jobs import run_job


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tamis.pipeline.execute JOBDIR")
    print(run_job(sys.argv[1]), flush=True)


if __name__ == "__main__":
    main()
