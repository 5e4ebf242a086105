"""Shipped schemes, relion_it-style set-up (``tamis it``), schemer --add/--copy."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from tamis.cli.main import app
from tamis.errors import TamisError
from tamis.pipeline.job import JobStar
from tamis.pipeline.jobs import job_type
from tamis.schemes import it
from tamis.schemes.scheme import Scheme


@pytest.mark.parametrize("name", ["prep", "proc"])
def test_shipped_schemes_round_trip_exactly(name, tmp_path):
    src = it.SHIPPED_SCHEMES / name / "scheme.star"
    s = Scheme.read(src)
    s.write(tmp_path / "scheme.star")
    assert (tmp_path / "scheme.star").read_text() == src.read_text()
    assert s.name == f"Schemes/{name}/"
    for job in s.jobs:  # every job is one tamis can run
        job_type(JobStar.read(src.parent / job).type_label)
    # every node on an edge is a job or an operator; the graph loops back to WAIT
    for e in s.edges:
        for n in (e.input, e.output) + ((e.output_if_true,) if e.is_fork else ()):
            assert n in s.jobs or n in s.operators, n
    assert s.edges[0].input == "WAIT"


def test_proc_walks_relions_graph_and_stops_when_told():
    s = Scheme.read(it.SHIPPED_SCHEMES / "proc" / "scheme.star")
    s.bools["has_ctffind"] = (True, False)
    s.bools["has_larger_nr_mics"] = (True, False)
    path, node = [], "WAIT"
    for _ in range(13):
        path.append(node)
        node = s.next_node(node)
    assert path == ["WAIT", "EXIT_maxtime", "HAS_ctffind", "select_mics", "COUNT_mics",
                    "HAS_mics_increased", "SET_prev_nr_mics", "SET_do_topaz", "autopick",
                    "extract", "class2d", "select_parts", "COUNT_parts"]  # fmt: skip
    # after the counts: the 3D branch when enough particles were selected (RELION's
    # min_nr_parts_3d), else wait (or stop)
    assert s.next_node("SET_stop") == "SET_final_or_any"
    assert s.next_node("SET_run_3d") == "CHECK_stop"
    assert s.next_node("CHECK_stop") == "WAIT"
    s.bools["run_3d"] = (True, False)
    assert s.next_node("SET_run_3d") == "CHECK_iniref"
    path, node = [], "CHECK_iniref"
    for _ in range(7):
        path.append(node)
        node = s.next_node(node)
    assert path == ["CHECK_iniref", "inimodel3d", "SET_myref_inimodel", "refine3d", "maskcreate",
                    "postprocess", "CHECK_stop"]  # fmt: skip
    s.bools["has_iniref"] = (True, False)
    assert s.next_node("CHECK_iniref") == "SET_myref_user"
    assert s.next_node("SET_myref_user") == "refine3d"
    s.bools["do_stop"] = (True, False)
    assert s.next_node("CHECK_stop") == "EXIT"


def test_derived_options_follow_relion_it():
    d = it.derived_options(1.0, 200.0)
    assert d["proc__class2d__particle_diameter"] == 220.0
    assert d["proc__refine3d__particle_diameter"] == d["proc__inimodel3d__particle_diameter"] == 220
    assert d["proc__extract__extract_size"] == 300  # ceil(1.5 * 200) even
    assert d["proc__extract__rescale"] == 96  # first with 1.0 * 300 / box < 3.75
    assert d["proc__autopick__log_diam_min"] == pytest.approx(200 * 150 / 180, abs=0.1)
    d = it.derived_options(3.0, 100.0)
    assert d["proc__extract__extract_size"] == 50
    assert d["proc__extract__rescale"] == 48 and d["proc__extract__do_rescale"]
    assert it.derived_options(1.0, 20.0)["proc__extract__rescale"] == 30  # never above the box
    with pytest.raises(TamisError):
        it.derived_options(0, 100)


def test_options_file_apply_and_errors(tmp_path):
    f = tmp_path / "opts.py"
    f.write_text("RelionItOptions = {'proc__class2d__nr_classes': 33, 'proc__do_log': 'False',\n"
                 " 'prep__wait_sec': 5, 'do_prep': True}\n")  # fmt: skip
    opts = it.read_options_file(f)
    assert opts["proc__do_log"] is False
    it.install_schemes(tmp_path)
    it.apply_options(tmp_path, it.complete_options({**opts, "proc__class2d__nr_iter_grad": 30},
                                                   tmp_path))  # fmt: skip
    proc = Scheme.read(tmp_path / "Schemes/proc/scheme.star")
    assert proc.bools["do_log"] == (False, False)
    assert Scheme.read(tmp_path / "Schemes/prep/scheme.star").floats["wait_sec"] == (5.0, 5.0)
    assert JobStar.read(tmp_path / "Schemes/proc/class2d").options["nr_classes"] == "33"
    ranker = JobStar.read(tmp_path / "Schemes/proc/select_parts").options["fn_model"]
    assert ranker == "Schemes/proc/class2d/run_it030_optimiser.star"
    for bad in ({"proc__nope": 1}, {"proc__class2d__nr_classes__x": 1}, {"typo": 1},
                {"proc__nojob__opt": 1}, {"other__x": 1}):  # fmt: skip
        with pytest.raises(TamisError):
            it.apply_options(tmp_path, bad)
    (tmp_path / "bad.py").write_text("import os\n")
    with pytest.raises(TamisError, match="dict literal"):
        it.read_options_file(tmp_path / "bad.py")


def test_it_only_save_and_status(tmp_path):
    r = CliRunner().invoke(app, ["it", "--project", str(tmp_path), "--angpix", "1.2",
                                 "--diameter", "150", "--nr_classes", "20", "--only_save",
                                 "--nr_mpi", "4",
                                 "--set", "proc__select_parts__rank_threshold=0.3"])  # fmt: skip
    assert r.exit_code == 0, r.output
    for job in ("prep/ctffind", "proc/autopick", "proc/class2d", "proc/refine3d"):
        assert JobStar.read(tmp_path / "Schemes" / job).options["nr_mpi"] == "4"
    assert (tmp_path / "relion_it_options.py").is_file()
    assert JobStar.read(tmp_path / "Schemes/proc/select_parts").options["rank_threshold"] == "0.3"
    assert JobStar.read(tmp_path / "Schemes/prep/importmics").options["angpix"] == "1.2"
    r = CliRunner().invoke(app, ["it", "status", "--project", str(tmp_path)])
    assert r.exit_code == 0 and "prep: stopped, current node undefined" in r.output
    r = CliRunner().invoke(app, ["it", "--project", str(tmp_path), "--set", "nope=1"])
    assert r.exit_code == 1 and "nope" in r.output


def test_schemer_add_and_copy(tmp_path):
    run = CliRunner().invoke
    p = ["--project", str(tmp_path)]
    assert run(app, ["schemer", "--scheme", "s", "--add", "variable", "--name", "n",
                     "--value", "3", *p]).exit_code == 0  # fmt: skip
    run(app, ["schemer", "--scheme", "s", "--add", "variable", "--name", "flag", "--value",
              "True", *p])  # fmt: skip
    run(app, ["schemer", "--scheme", "s", "--add", "variable", "--name", "f", "--value",
              "Schemes/s/ext/out.star", *p])  # fmt: skip
    r = run(app, ["schemer", "--scheme", "s", "--add", "operator", "--name", "GT", "--type",
                  "bool=gt", "--i", "n", "--i2", "2", "--o", "flag", *p])  # fmt: skip
    assert r.exit_code == 0, r.output
    JobStar("relion.external", options={"fn_exe": "true", "x": "Schemes/s/ext/a"}).write(
        tmp_path / "template_job.star"
    )
    r = run(app, ["schemer", "--scheme", "s", "--add", "job", "--i",
                  str(tmp_path / "template_job.star"), "--name", "ext", "--mode", "new", *p])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert run(app, ["schemer", "--scheme", "s", "--add", "edge", "--i", "GT", "--o", "ext",
                     *p]).exit_code == 0  # fmt: skip
    r = run(app, ["schemer", "--scheme", "s", "--add", "edge", "--i", "GT", "--o", "ext", *p])
    assert r.exit_code == 1 and "already has an outgoing edge" in r.output
    r = run(app, ["schemer", "--scheme", "s", "--add", "operator", "--name", "B", "--type",
                  "bool=nonsense", "--i", "n", *p])  # fmt: skip
    assert r.exit_code == 1
    s = Scheme.read(tmp_path / "Schemes/s/scheme.star")
    assert s.floats["n"] == (3.0, 3.0) and s.bools["flag"] == (True, True)
    assert s.jobs["ext"].mode == "new" and s.next_node("GT") == "ext"
    assert (tmp_path / "Schemes/s/scheme.star.bck").is_file()
    r = run(app, ["schemer", "--scheme", "s", "--copy", "t", *p])
    assert r.exit_code == 0, r.output
    t = Scheme.read(tmp_path / "Schemes/t/scheme.star")
    assert t.name == "Schemes/t/" and t.strings["f"][0] == "Schemes/t/ext/out.star"
    assert JobStar.read(tmp_path / "Schemes/t/ext").options["x"] == "Schemes/t/ext/a"
    assert not list(tmp_path.glob(".relion_lock_scheme_*"))  # no stale lock (RELION leaves one)


def test_launched_schemers_get_a_short_openmp_spin(tmp_path, monkeypatch):
    it.install_schemes(tmp_path)
    started = []

    class FakePopen:
        def __init__(self, cmd, **kw):
            started.append((cmd, kw["env"]))
            self.pid = 4242 + len(started)

    monkeypatch.setattr(it.subprocess, "Popen", FakePopen)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    pids = it.launch(tmp_path, ["prep", "proc"])
    assert set(pids) == {"prep", "proc"} and len(started) == 2
    assert all(env["GOMP_SPINCOUNT"] == it.SCHEME_SPINCOUNT for _, env in started)
    assert all(env["PATH"] == os.environ["PATH"] for _, env in started)
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")  # the user's own value is kept
    it.launch(tmp_path, ["proc"], reset=False)
    assert started[-1][1]["GOMP_SPINCOUNT"] == "300000"
