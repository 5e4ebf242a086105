"""Crash safety of the schemer: SIGKILL it in the middle of a job and restart; the scheme goes on
from its current node and finishes, and its stale lock does not block it. Also the External job
(RELION's calling convention) and queue submission through a template."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from tamis.pipeline.job import JobStar
from tamis.pipeline.project import Project
from tamis.schemes.run import SchemeRunner
from tamis.schemes.scheme import Edge, Scheme, SchemeJob

SLOW = textwrap.dedent(
    """
    import sys, time, os
    out = sys.argv[sys.argv.index("--o") + 1]
    with open(os.path.join(out, "runs.txt"), "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(float(sys.argv[sys.argv.index("--seconds") + 1]))
    with open(os.path.join(out, "done.txt"), "w") as f:
        f.write("done\\n")
    """
)


def make_scheme(root: Path, seconds: float) -> None:
    (root / "slow.py").write_text(SLOW)
    s = Scheme("Schemes/crash/")
    s.jobs = {"ext1": SchemeJob("ext1"), "ext2": SchemeJob("ext2")}
    s.edges = [Edge("ext1", "ext2")]
    d = root / "Schemes" / "crash"
    for name in s.jobs:
        (d / name).mkdir(parents=True)
        JobStar("relion.external", options={
            "fn_exe": f"{sys.executable} {root / 'slow.py'}",
            "param1_label": "seconds", "param1_value": str(seconds),
        }).write(d / name)  # fmt: skip
    s.write(d / "scheme.star")


def start_schemer(root: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tamis.cli.main", "schemer", "--scheme", "crash", "--run",
         "--project", str(root)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_for(path: Path, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout:
            raise TimeoutError(path)
        time.sleep(0.1)


def finish(root: Path) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = SchemeRunner(root, "crash", log=lambda s: None, poll=0.2).run()
    assert any("taking over a lock" in str(w.message) for w in caught)
    return status


@pytest.mark.parametrize("kill_job_too", [False, True])
def test_sigkill_schemer_then_restart(tmp_path, kill_job_too):
    make_scheme(tmp_path, seconds=4)
    schemer = start_schemer(tmp_path)
    job1 = tmp_path / "External" / "job001"
    wait_for(job1 / "runs.txt")
    os.killpg(schemer.pid, signal.SIGKILL) if kill_job_too else schemer.kill()
    schemer.wait()
    assert (tmp_path / ".relion_lock_scheme_crash").exists()  # stale lock left by the crash
    assert Scheme.read(tmp_path / "Schemes/crash/scheme.star").current_node == "ext1"
    assert finish(tmp_path) == "Succeeded"
    statuses = Project(tmp_path).check()
    assert statuses == {"External/job001/": "Succeeded", "External/job002/": "Succeeded"}
    runs = (job1 / "runs.txt").read_text().split()
    # the job that survived the schemer was waited for, not started twice; a killed job was
    # continued in its own directory (mode continue)
    assert len(runs) == (2 if kill_job_too else 1)
    assert (job1 / "done.txt").is_file()
    assert (tmp_path / "External/job002/done.txt").is_file()
    assert not (tmp_path / ".relion_lock_scheme_crash").exists()


def test_external_job_abort(tmp_path):
    make_scheme(tmp_path, seconds=30)
    project = Project(tmp_path)
    proc = project.schedule(
        "relion.external",
        {"fn_exe": f"{sys.executable} {tmp_path / 'slow.py'}", "param1_label": "seconds",
         "param1_value": "30"},
    )  # fmt: skip
    child = project.run(proc.name, background=True)
    wait_for(tmp_path / proc.name / "runs.txt")
    t0 = time.time()
    (tmp_path / proc.name / "RELION_JOB_ABORT_NOW").touch()
    child.wait(20)
    assert time.time() - t0 < 10
    assert project.check()[proc.name] == "Aborted"


def test_queue_submission_through_template(tmp_path):
    """A fake ``sbatch`` runs the submitted script; the placeholders are RELION's."""
    make_scheme(tmp_path, seconds=0)
    (tmp_path / "template.sh").write_text(
        "#!/bin/bash\n#SBATCH --ntasks=XXXmpinodesXXX\n#SBATCH --cpus-per-task=XXXthreadsXXX\n"
        "#SBATCH --nodes=XXXnodesXXX\n#SBATCH --partition=XXXqueueXXX\n"
        "#SBATCH --error=XXXerrfileXXX\n#SBATCH --output=XXXoutfileXXX\n"
        "# cores XXXcoresXXX dedicated XXXdedicatedXXX extra XXXextra1XXX name XXXnameXXX\n"
        "XXXcommandXXX\n"
    )
    fake = tmp_path / "fake_sbatch"
    fake.write_text('#!/bin/bash\nbash "$1" > /dev/null 2>&1 &\necho Submitted batch job 42\n')
    fake.chmod(0o755)
    project = Project(tmp_path)
    proc = project.schedule(
        "relion.external",
        {"fn_exe": f"{sys.executable} {tmp_path / 'slow.py'}", "param1_label": "seconds",
         "param1_value": "0", "do_queue": "Yes", "qsub": str(fake), "qsubscript": "template.sh",
         "queuename": "gpu", "nr_mpi": "3", "nr_threads": "4", "min_dedicated": "8",
         "qsub_extra1": "--mem=8G"},
    )  # fmt: skip
    assert project.run(proc.name, background=True) is None
    script = (tmp_path / proc.name / "run_submit.script").read_text()
    assert "--ntasks=3\n" in script and "--cpus-per-task=4" in script
    assert "--nodes=2" in script and "--partition=gpu" in script  # ceil(12 / 8)
    assert f"--error={proc.name}run.err" in script
    assert f"cores 12 dedicated 8 extra --mem=8G name {proc.name}" in script
    assert "tamis.pipeline.execute" in script and "XXX" not in script
    wait_for(tmp_path / proc.name / "RELION_JOB_EXIT_SUCCESS", 60)
    assert project.check()[proc.name] == "Succeeded"
