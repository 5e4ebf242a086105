"""Data-parallel runs over ranks (torch.distributed on gloo, launched by torchrun on this CPU):
1 and 2 ranks give the same classification, a job with ``nr_mpi 2`` runs its ranks through the
pipeliner, a killed rank fails the job cleanly and ``--continue`` finishes it, and a SLURM
submission (fake ``sbatch``/``srun``) starts one torchrun agent per node that meet by
rendezvous."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tamis import distributed
from tamis.io.mrc import read_mrc
from tamis.io.star import read_star
from tamis.pipeline.job import JobStar, exit_status
from tamis.pipeline.jobs import executor
from tamis.pipeline.project import Project
from tests.helpers import tiny_particles, wait_for

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with gloo",
)

#: Ranks add the E-step's sums in another order than one process: float64 sums agree to about
#: 1e-15 relative. Tolerances stated for the outputs after several iterations:
CLASS_IMAGE_RTOL = 1e-5  # class images, relative to their range
LOGLIK_RTOL = 1e-9  # total log-likelihood
# and every particle in the same class with the same psi and origin.


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    tiny_particles(out / "sim", n=300, seed=2)
    return out


ARGS = [
    "--K", "4", "--ctf", "--tau2_fudge", "2", "--particle_diameter", "130",
    "--flatten_solvent", "--zero_mask", "--center_classes", "--oversampling", "1",
    "--psi_step", "20", "--offset_range", "3", "--offset_step", "1.5", "--norm", "--scale",
    "--random_seed", "5", "--batch_size", "32", "--j", "1",
]  # fmt: skip


def _class2d(out: Path, ranks: int, extra: list[str], cwd: Path) -> subprocess.CompletedProcess:
    args = ["class2d", "--i", "sim/particles.star", "--o", f"{out}/run", *ARGS, *extra]
    if ranks == 1:
        cmd = [sys.executable, "-m", "tamis.cli.main", *args]
    else:
        cmd = distributed.launch_command(ranks, "tamis.cli.main", args)
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _assert_same(a: str, b: str, it: int) -> None:
    # data.star, whoever wrote which rows: the same lines, every value equal (floats to
    # LOGLIK_RTOL: the norm correction is a ratio of sums)
    ta = Path(f"{a}_it{it:03d}_data.star").read_text().splitlines()[1:]
    tb = Path(f"{b}_it{it:03d}_data.star").read_text().splitlines()[1:]
    assert len(ta) == len(tb)
    for la, lb in zip(ta, tb, strict=True):
        fa, fb = la.split("\t"), lb.split("\t")
        assert len(fa) == len(fb)
        for x, y in zip(fa, fb, strict=True):
            if x != y:
                assert float(x) == pytest.approx(float(y), rel=LOGLIK_RTOL), (la, lb)
    da = read_star(f"{a}_it{it:03d}_data.star")["particles"]
    db = read_star(f"{b}_it{it:03d}_data.star")["particles"]
    for label in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        np.testing.assert_array_equal(da[label].to_numpy(), db[label].to_numpy(), err_msg=label)
    ra, _ = read_mrc(f"{a}_it{it:03d}_classes.mrcs")
    rb, _ = read_mrc(f"{b}_it{it:03d}_classes.mrcs")
    assert np.abs(ra - rb).max() <= CLASS_IMAGE_RTOL * np.ptp(ra)
    ma, mb = read_star(f"{a}_it{it:03d}_model.star"), read_star(f"{b}_it{it:03d}_model.star")
    la = float(ma["model_general"]["rlnLogLikelihood"])
    lb = float(mb["model_general"]["rlnLogLikelihood"])
    assert abs(la - lb) <= LOGLIK_RTOL * abs(la)
    # the accuracy estimates: each rank estimates its share of RELION's 10 particles
    for label in ("rlnAccuracyRotations", "rlnAccuracyTranslationsAngst"):
        np.testing.assert_allclose(
            ma["model_classes"][label].to_numpy(float),
            mb["model_classes"][label].to_numpy(float),
            rtol=1e-12,
            err_msg=label,
        )


@pytest.mark.parametrize(
    "algo, extra, last",
    [
        ("em", ["--iter", "4"], 4),
        ("vdam", ["--grad", "--iter", "12", "--grad_write_iter", "4",
                  "--class_inactivity_threshold", "0.1"], 12),
    ],
)  # fmt: skip
def test_two_ranks_give_the_single_process_result(sim, algo, extra, last):
    one = _class2d(Path(f"{algo}1"), 1, extra, sim)
    two = _class2d(Path(f"{algo}2"), 2, extra, sim)
    _assert_same(str(sim / f"{algo}1/run"), str(sim / f"{algo}2/run"), last)
    # rank 0 alone reports
    assert two.stdout.count("done:") == 1 and one.stdout.count("done:") == 1


def test_share_splits_evenly_and_single_process_is_identity():
    parts = [distributed.share(10, distributed.Ranks(r, 3)) for r in range(3)]
    assert parts == [(0, 3), (3, 6), (6, 10)]
    t = torch.arange(4.0)
    distributed.all_sum([t, None, torch.zeros(0)])  # no process group: nothing changes
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert distributed.all_sum_floats([1.5]) == [1.5]
    assert distributed.any_flag(True) and not distributed.any_flag(False)


def _job(project: Path, **options) -> str:
    base = {
        "fn_img": "sim/particles.star", "do_em": "Yes", "do_grad": "No", "nr_classes": "4",
        "particle_diameter": "130", "psi_sampling": "10", "nr_threads": "1",
        "other_args": "--random_seed 5",
    }  # fmt: skip
    base.update(options)
    return Project(project).schedule("relion.class2d", base).name


@pytest.fixture()
def project(sim, tmp_path):
    import shutil

    shutil.copytree(sim / "sim", tmp_path / "sim")
    return tmp_path


def test_executor_follows_nr_mpi_and_names_bad_choices(monkeypatch):
    def job(label, **opts):
        return JobStar(label, options={k: str(v) for k, v in opts.items()})

    assert executor(job("relion.class2d", nr_mpi=2)) == ("torchrun", 2)
    assert executor(job("relion.class2d", nr_mpi=1)) == ("local", 1)
    assert executor(job("relion.extract", nr_mpi=3)) == ("dask", 3)
    assert executor(job("relion.select.class2dauto", nr_mpi=4)) == ("local", 1)
    assert executor(job("relion.class2d", nr_mpi=2, tamis_executor="local")) == ("local", 1)
    from tamis.errors import TamisError

    with pytest.raises(TamisError, match="tamis_executor"):
        executor(job("relion.class2d", tamis_executor="mpi"))
    with pytest.raises(TamisError, match="do not go micrograph"):
        executor(job("relion.class2d", tamis_executor="dask"))
    # a session's dask scheduler takes the micrograph jobs, not the others
    monkeypatch.setenv("TAMIS_DASK_SCHEDULER", "tcp://head:8786")
    assert executor(job("relion.ctffind", nr_mpi=1)) == ("dask", 1)
    assert executor(job("relion.ctffind", nr_mpi=1, tamis_executor="local")) == ("local", 1)
    assert executor(job("relion.class2d", nr_mpi=1)) == ("local", 1)


def test_pipeline_job_with_two_ranks_equals_one(project):
    a = _job(project, nr_iter_em="3")
    b = _job(project, nr_iter_em="3", nr_mpi="2")
    p = Project(project)
    assert p.run(a) == "Succeeded"
    assert p.run(b) == "Succeeded"
    _assert_same(str(project / a / "run"), str(project / b / "run"), 3)
    out = (project / b / "run.out").read_text()
    assert out.count("Succeeded") == 1  # rank 0's status line only
    assert (project / b / "RELION_OUTPUT_NODES.star").is_file()


def _rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers under ``launcher``."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid != launcher:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(d.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_killed_rank_fails_the_job_cleanly_and_continue_finishes(project):
    reference = _job(project, nr_iter_em="5", nr_mpi="2")
    p = Project(project)
    assert p.run(reference) == "Succeeded"
    name = _job(project, nr_iter_em="5", nr_mpi="2")
    d = project / name
    child = p.run(name, background=True)
    wait_for(d / "run_it002_optimiser.star", child)
    ranks = _rank_pids(child.pid)
    assert set(ranks) == {0, 1}
    os.kill(ranks[1], signal.SIGKILL)
    child.wait(timeout=120)  # no hang: rank 0 sees its peer gone, torchrun ends
    assert exit_status(d) == "Failed"
    assert p.check()[name] == "Failed"
    # nothing torn under a final name, no temporary files left
    assert not list(d.glob(".*.tmp"))
    last = max(int(f.name[6:9]) for f in d.glob("run_it*_optimiser.star"))
    assert last < 5
    for f in d.glob("run_it*_*.star"):
        read_star(f)
    job = JobStar.read(d)
    job.options["fn_cont"] = f"{name}run_it{last:03d}_optimiser.star"
    job.write(d)
    assert p.run(name, is_continue=True) == "Succeeded"
    _assert_same(str(project / reference / "run"), str(d / "run"), 5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAKE_SBATCH = """#!/bin/bash
# runs the script here, in the background, as if on a 2-node allocation
export SLURM_JOB_ID=4242 SLURM_NNODES=2 SLURM_JOB_NODELIST=localhost
out=$(sed -n 's/^#SBATCH --output=//p' "$1")
err=$(sed -n 's/^#SBATCH --error=//p' "$1")
nohup bash "$1" >> "${out:-/dev/null}" 2>> "${err:-/dev/null}" &
echo "Submitted batch job 4242"
"""
FAKE_SCONTROL = """#!/bin/bash
echo localhost
"""
FAKE_SRUN = """#!/bin/bash
# one task per node (--ntasks-per-node=1), every "node" this machine
while [[ "$1" == --* ]]; do shift; done
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait $p || rc=$?; done
exit $rc
"""


def test_slurm_template_starts_one_torchrun_agent_per_node(project, tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp("fakebin")
    for name, text in (
        ("sbatch", FAKE_SBATCH),
        ("srun", FAKE_SRUN),
        ("scontrol", FAKE_SCONTROL),
    ):
        f = bin_dir / name
        f.write_text(text)
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    template = Path(__file__).parents[1] / "docs" / "templates" / "slurm_torchrun.sh"
    text = template.read_text().replace("29500", str(_free_port()))
    text = text.replace("#SBATCH XXXextra1XXX\n", "")
    (project / "slurm.sh").write_text(text)
    name = _job(project, nr_iter_em="2", nr_mpi="2", do_queue="Yes", qsubscript="slurm.sh",
                qsub=str(bin_dir / "sbatch"), min_dedicated="1", queuename="cpu")  # fmt: skip
    env = os.environ.copy()
    os.environ["PATH"] = f"{bin_dir}:{env['PATH']}"
    try:
        assert Project(project).run(name) is None  # submitted
    finally:
        os.environ["PATH"] = env["PATH"]
    script = (project / name / "run_submit.script").read_text()
    assert "torch.distributed.run" in script and "--rdzv-backend=c10d" in script
    deadline = time.time() + 300
    while exit_status(project / name) is None:
        assert time.time() < deadline, (project / name / "run.err").read_text()
        time.sleep(0.2)
    assert exit_status(project / name) == "Succeeded", (project / name / "run.err").read_text()
    # rank 0 prints its status after the marker: wait for the batch script's output to land
    out = ""
    deadline = time.time() + 60
    while "Succeeded" not in out and time.time() < deadline:
        time.sleep(0.2)
        out = (project / name / "run.out").read_text()
    time.sleep(1.0)  # and for any other rank that would (wrongly) print one
    assert (project / name / "run.out").read_text().count("Succeeded") == 1
    assert (project / name / "run_it002_classes.mrcs").is_file()


def _assert_same_3d(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        da = read_star(a / name)["particles"]
        db = read_star(b / name)["particles"]
        for label in ("rlnClassNumber", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
            if label in da:
                np.testing.assert_allclose(
                    da[label].to_numpy(float), db[label].to_numpy(float), atol=1e-6,
                    err_msg=f"{name} {label}",
                )  # fmt: skip


def test_initial_model_and_auto_refine_two_ranks_equal_one(project):
    p = Project(project)
    jobs = {}
    for mpi in ("1", "2"):
        ini = p.schedule("relion.initialmodel", {
            "fn_img": "sim/particles.star", "nr_iter": "4", "particle_diameter": "130",
            "nr_threads": "1", "nr_mpi": mpi, "other_args": "--random_seed 7"}).name  # fmt: skip
        assert p.run(ini) == "Succeeded", (project / ini / "run.err").read_text()
        ref = p.schedule("relion.refine3d", {
            "fn_img": "sim/particles.star", "fn_ref": f"{ini}initial_model.mrc",
            "particle_diameter": "130", "ini_high": "30", "sampling": "30 degrees",
            "auto_local_sampling": "15 degrees", "tamis_iter_max": "2", "nr_threads": "1",
            "nr_mpi": mpi, "other_args": "--random_seed 7"}).name  # fmt: skip
        assert p.run(ref) == "Succeeded", (project / ref / "run.err").read_text()
        jobs[mpi] = (ini, ref)
    (ini1, ref1), (ini2, ref2) = jobs["1"], jobs["2"]
    _assert_same_3d(project / ini1, project / ini2, ["run_it004_data.star"])
    m1, _ = read_mrc(project / ini1 / "initial_model.mrc")
    m2, _ = read_mrc(project / ini2 / "initial_model.mrc")
    assert np.abs(m1 - m2).max() <= CLASS_IMAGE_RTOL * np.ptp(m1)
    _assert_same_3d(project / ref1, project / ref2, ["run_data.star"])
    h1, _ = read_mrc(project / ref1 / "run_class001.mrc")
    h2, _ = read_mrc(project / ref2 / "run_class001.mrc")
    assert np.abs(h1 - h2).max() <= CLASS_IMAGE_RTOL * np.ptp(h1)


def test_abort_stops_every_rank(project):
    p = Project(project)
    name = _job(project, nr_iter_em="50", nr_mpi="2")
    d = project / name
    child = p.run(name, background=True)
    wait_for(d / "run_it001_optimiser.star", child)
    (d / "RELION_JOB_ABORT_NOW").touch()
    child.wait(timeout=120)
    assert exit_status(d) == "Aborted"
    assert child.returncode == 0  # no rank failed: all stopped at the same iteration
    assert not (d / "run_it050_optimiser.star").exists()


def _write_shared_rank(rank: int, size: int, init: str, out: str, fail_rank: int) -> None:
    import builtins

    import torch.distributed as dist

    from tamis.errors import TamisError

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        chunks = {0: "a\tb\nc\td", 1: "", 2: "e\tf"}
        if rank == fail_rank:
            real_open = builtins.open

            def full_disk(file, mode="r", *a, **k):
                if "r+b" in mode:
                    raise OSError(28, "No space left on device")
                return real_open(file, mode, *a, **k)

            builtins.open = full_disk
        try:
            distributed.write_shared(out, "HEAD\n", chunks[rank], "\nTAIL\n")
            result = "ok"
        except TamisError as exc:
            result = f"error: {exc}"
        Path(f"{out}.rank{rank}").write_text(result)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fail_rank", [-1, 2])
def test_write_shared_puts_every_ranks_rows_in_order(tmp_path, fail_rank):
    import torch.multiprocessing as mp

    out = tmp_path / "data.star"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_write_shared_rank, args=(3, init, str(out), fail_rank), nprocs=3, join=True)
    results = [(tmp_path / f"data.star.rank{r}").read_text() for r in range(3)]
    if fail_rank < 0:
        assert results == ["ok"] * 3
        assert out.read_text() == "HEAD\na\tb\nc\td\ne\tf\n\nTAIL\n"
    else:  # one rank's disk is full: every rank stops with that error, nothing is left
        assert all(r.startswith("error: ") and "No space left" in r for r in results)
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".data")] == []
