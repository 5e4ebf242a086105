"""The schemer loop on a small scheme: operators, new jobs from templates with $$variables and
Schemes/NAME/JOB/ paths, pipeline edges, restart from the current node."""

from __future__ import annotations

from tamis.pipeline.job import JobStar
from tamis.pipeline.project import Project
from tamis.schemes import Edge, Operator, Scheme, SchemeJob
from tamis.schemes.run import SchemeRunner, prepare_job, scheme_dir


def _setup(tmp_path):
    from tests.helpers import tiny_micrographs

    tiny_micrographs(tmp_path / "Import/job001")
    s = Scheme("Schemes/proc/", "WAIT")
    s.floats = {"wait_sec": (0.0, 0.0), "box": (64.0, 64.0)}
    s.strings = {"mics": ("Import/job001/micrographs.star", "Import/job001/micrographs.star")}
    s.operators = {"WAIT": Operator("wait", "undefined", "wait_sec"), "EXIT": Operator("exit")}
    s.jobs = {"pick": SchemeJob("pick", "continue"), "extract": SchemeJob("extract", "continue")}
    s.edges = [Edge("WAIT", "pick"), Edge("pick", "extract"), Edge("extract", "EXIT")]
    d = scheme_dir(tmp_path, "proc")
    (d / "pick").mkdir(parents=True)
    (d / "extract").mkdir(parents=True)
    JobStar(
        "relion.autopick.log",
        options={"fn_input_autopick": "$$mics", "log_diam_min": "90", "log_diam_max": "130"},
    ).write(d / "pick")
    JobStar(
        "relion.extract",
        options={
            "star_mics": "$$mics",
            "coords_suffix": "Schemes/proc/pick/autopick.star",
            "extract_size": "$$box",
            "do_float16": "No",
        },
    ).write(d / "extract")
    s.write(d / "scheme.star")
    return s


def test_prepare_job_substitutes_variables_and_job_names(tmp_path):
    s = _setup(tmp_path)
    s.jobs["pick"].current_name = "AutoPick/job007/"
    job = prepare_job(s, "extract", tmp_path, lambda n: None)
    assert job.options["star_mics"] == "Import/job001/micrographs.star"
    assert job.options["coords_suffix"] == "AutoPick/job007/autopick.star"
    assert job.options["extract_size"] == "64"


def test_scheme_runs_jobs_and_restarts_from_its_current_node(tmp_path):
    _setup(tmp_path)
    logs = []
    runner = SchemeRunner(tmp_path, "proc", log=logs.append, background=False)
    assert runner.run() == "Succeeded"
    pipe = Project(tmp_path).read()
    assert [p.name for p in pipe.processes] == ["AutoPick/job001/", "Extract/job002/"]
    assert pipe.process("Extract/job002/").inputs == ["AutoPick/job001/autopick.star"]
    assert all(p.status == "Succeeded" for p in pipe.processes)
    s = Scheme.read(scheme_dir(tmp_path, "proc") / "scheme.star")
    assert s.jobs["extract"].current_name == "Extract/job002/" and s.jobs["extract"].has_started
    assert (scheme_dir(tmp_path, "proc") / "RELION_JOB_EXIT_SUCCESS").exists()
    # as after a kill during 'extract': restart there; a started continue job is continued
    s.current_node = "extract"
    s.write(scheme_dir(tmp_path, "proc") / "scheme.star")
    assert SchemeRunner(tmp_path, "proc", log=logs.append, background=False).run() == "Succeeded"
    pipe = Project(tmp_path).read()
    assert len(pipe.processes) == 2 and JobStar.read(tmp_path / "Extract/job002").is_continue
    assert any("(continue)" in line for line in logs)


def test_background_jobs_and_abort(tmp_path):
    _setup(tmp_path)
    d = scheme_dir(tmp_path, "proc")
    runner = SchemeRunner(tmp_path, "proc", log=lambda s: None, poll=0.1)
    assert runner.run() == "Succeeded"
    s = Scheme.read(d / "scheme.star")
    s.reset()
    s.write(d / "scheme.star")
    (d / "RELION_JOB_ABORT_NOW").touch()
    runner.aborted = lambda: True  # an abort requested while the schemer runs
    assert runner.run() == "Aborted" and (d / "RELION_JOB_EXIT_ABORTED").exists()


def test_cli_schemer_edits_and_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tamis.cli.main import app

    _setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    inv = CliRunner().invoke
    assert inv(app, ["schemer", "--scheme", "proc", "--run"]).exit_code == 0
    assert (
        inv(app, ["schemer", "--scheme", "proc", "--set_var", "box", "--value", "48"]).exit_code
        == 0
    )
    s = Scheme.read("Schemes/proc/scheme.star")
    assert s.floats["box"] == (48.0, 64.0) and (tmp_path / "Schemes/proc/scheme.star.bck").exists()
    res = inv(
        app, ["schemer", "--scheme", "proc", "--set_job_option", "pick", "log_diam_min", "80"]
    )
    assert res.exit_code == 0, res.output
    s = Scheme.read("Schemes/proc/scheme.star")
    assert (
        not s.jobs["pick"].has_started
        and not s.jobs["extract"].has_started
        and s.current_node == "pick"
    )
    assert JobStar.read(tmp_path / "Schemes/proc/pick").options["log_diam_min"] == "80"
    assert inv(app, ["schemer", "--scheme", "proc", "--run"]).exit_code == 0
    pipe = Project(tmp_path).read()
    assert [p.name for p in pipe.processes][-2:] == ["AutoPick/job003/", "Extract/job004/"]
    bad = inv(
        app, ["schemer", "--scheme", "proc", "--set_job_mode", "pick", "--value", "sometimes"]
    )
    assert bad.exit_code == 1
