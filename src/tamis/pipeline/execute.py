"""``python -m tamis.pipeline.execute JOBDIR``: run one job directory (the local runner's child
process, or one rank of it under ``torchrun``). Exit status 0 whatever the job's outcome: the
outcome is in the exit marker. A rank other than 0 that failed exits 1, so that ``torchrun``
stops the others."""

from __future__ import annotations

import os
import sys

from tamis.pipeline.jobs import run_job


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tamis.pipeline.execute JOBDIR")
    status = run_job(sys.argv[1])
    if os.environ.get("RANK", "0") == "0":
        print(status, flush=True)
    elif status == "Failed":
        sys.exit(1)


if __name__ == "__main__":
    main()
