"""Per-micrograph jobs on dask workers: a LocalCluster run of CTF estimation, picking and
extraction equals the serial run; a worker killed mid-micrograph leaves nothing half-written
under a final name and its micrograph is done again; an error on a worker stops the job with
the same one-line error."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tamis.errors import InputFileError
from tamis.io.mrc import read_mrc
from tamis.io.star import read_star
from tamis.pipeline.job import exit_status
from tamis.pipeline.project import Project
from tamis.workers import Workers, dask_available, map_items

needs_dask = pytest.mark.skipif(
    not dask_available(),
    reason="dask.distributed is not installed: pip install 'tamis[scale]' to run these tests",
)


def test_serial_map_keeps_order_and_runs_here():
    pid = os.getpid()
    out = list(map_items(lambda x: (x * x, os.getpid()), [3, 1, 2]))
    assert out == [(0, (9, pid)), (1, (1, pid)), (2, (4, pid))]


@needs_dask
def test_worker_killed_mid_item_is_replaced_and_its_item_redone(tmp_path):
    work_dir = tmp_path

    def slow_write(item: int) -> int:
        import os as _os
        import time as _time
        from pathlib import Path as _Path

        from tamis.io.star import atomic_path

        d = _Path(work_dir)
        (d / f"start_{item}_{_os.getpid()}").touch()
        with atomic_path(d / f"out_{item}.txt") as tmp:
            tmp.write_text("half")
            _time.sleep(3.0 if item == 3 else 0.2)
            tmp.write_text(f"done {item}")
        return item * item

    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for f in work_dir.glob("start_3_*"):
                pid = int(f.name.split("_")[2])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    results = dict(map_items(slow_write, list(range(6)), Workers(n=2)))
    t.join()
    assert killed, "the item never started"
    assert results == {i: i * i for i in range(6)}
    starts = sorted(f.name for f in work_dir.glob("start_3_*"))
    assert len(starts) == 2  # started, killed, done again on a fresh worker
    for i in range(6):  # complete under every final name
        assert (work_dir / f"out_{i}.txt").read_text() == f"done {i}"


@needs_dask
def test_error_on_a_worker_is_the_jobs_error(tmp_path):
    def fails(item: int) -> int:
        from tamis.errors import InputFileError as _E

        if item == 2:
            raise _E(f"mic_{item}.mrc", "truncated")
        return item

    with pytest.raises(InputFileError, match="mic_2.mrc: truncated"):
        dict(map_items(fails, list(range(4)), Workers(n=2)))


def _outputs(job_dir: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in sorted(job_dir.rglob("*")):
        if not p.is_file() or p.name.startswith(("run.", "RELION_", ".", "job", "note")):
            continue
        rel = str(p.relative_to(job_dir))
        if p.suffix == ".star":
            out[rel] = read_star(p)
        elif p.suffix in (".mrc", ".mrcs", ".ctf"):
            out[rel] = np.asarray(read_mrc(p)[0])
        elif p.suffix != ".png":
            out[rel] = p.read_bytes()
    return out


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            assert sorted(x) == sorted(y), key
            for block in x:
                if hasattr(x[block], "equals"):
                    xa = x[block].reset_index(drop=True)
                    ya = y[block].reset_index(drop=True)
                    # job directories differ; every other value is equal
                    xa = xa.replace(r"job00\d", "jobX", regex=True)
                    ya = ya.replace(r"job00\d", "jobX", regex=True)
                    assert xa.equals(ya), (key, block)
                else:
                    assert x[block] == y[block], (key, block)
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=key)
        else:
            assert x == y, key


@needs_dask
def test_local_cluster_ctf_picking_extraction_equal_serial(tmp_path, monkeypatch):
    from tests.helpers import tiny_micrographs

    monkeypatch.chdir(tmp_path)  # project-relative names, as RELION's
    tiny_micrographs("Import/job001", n=4, size=384, per=12, snr=0.3, seed=2)
    p = Project(tmp_path)
    names = {}
    for mpi in ("1", "2"):
        ctf = p.schedule("relion.ctffind", {
            "input_star_mics": "Import/job001/micrographs.star", "box": "128", "resmax": "8",
            "dfmin": "5000", "dfmax": "30000", "dfstep": "2000", "nr_mpi": mpi}).name  # fmt: skip
        pick = p.schedule("relion.autopick.log", {
            "fn_input_autopick": "Import/job001/micrographs.star", "log_diam_min": "90",
            "log_diam_max": "130", "nr_mpi": mpi}).name  # fmt: skip
        ext = p.schedule("relion.extract", {
            "star_mics": "Import/job001/micrographs.star", "coords_suffix": f"{pick}autopick.star",
            "extract_size": "48", "do_float16": "No", "nr_mpi": mpi}).name  # fmt: skip
        for job in (ctf, pick, ext):
            assert p.run(job) == "Succeeded", (tmp_path / job / "run.err").read_text()
        names[mpi] = (ctf, pick, ext)
    for serial, parallel in zip(names["1"], names["2"], strict=True):
        _same(_outputs(tmp_path / serial), _outputs(tmp_path / parallel))
    assert exit_status(tmp_path / names["2"][2]) == "Succeeded"
    for job in names["2"]:
        assert "on 2 dask workers (a LocalCluster)" in (tmp_path / job / "run.out").read_text()


@needs_dask
def test_a_sessions_scheduler_takes_every_micrograph_job(tmp_path, monkeypatch):
    """TAMIS_DASK_SCHEDULER: workers started once (here a LocalCluster standing in for a
    `dask scheduler` + `dask worker` pair) take the per-micrograph jobs of a session, nr_mpi 1."""
    from dask.distributed import LocalCluster

    from tests.helpers import tiny_micrographs

    monkeypatch.chdir(tmp_path)  # project-relative names, as RELION's
    tiny_micrographs("Import/job001", n=3, size=384, per=12, snr=0.3, seed=2)
    p = Project(tmp_path)
    opts = {"fn_input_autopick": "Import/job001/micrographs.star", "log_diam_min": "90",
            "log_diam_max": "130"}  # fmt: skip
    serial = p.schedule("relion.autopick.log", opts).name
    assert p.run(serial) == "Succeeded"
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                      silence_logs=40) as cluster:  # fmt: skip
        monkeypatch.setenv("TAMIS_DASK_SCHEDULER", cluster.scheduler_address)
        on_dask = p.schedule("relion.autopick.log", opts).name
        assert p.run(on_dask) == "Succeeded", (tmp_path / on_dask / "run.err").read_text()
        out = (tmp_path / on_dask / "run.out").read_text()
        assert f"on 2 dask workers ({cluster.scheduler_address})" in out
    _same(_outputs(tmp_path / serial), _outputs(tmp_path / on_dask))


@needs_dask
def test_a_scheduler_without_workers_is_one_error_not_a_wait(monkeypatch):
    from dask.distributed import LocalCluster

    from tamis.errors import TamisError

    monkeypatch.setenv("TAMIS_DASK_WAIT", "2")
    with LocalCluster(n_workers=0, dashboard_address=None, silence_logs=40) as cluster:
        with pytest.raises(TamisError, match="no worker joined within 2 s"):
            dict(map_items(abs, [1, 2], Workers(cluster=cluster.scheduler_address)))
