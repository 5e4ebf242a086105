"""default_pipeline.star: RELION 3.1/4/5 files read, extended and written as RELION 5's."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tamis.io.star import read_star
from tamis.pipeline import Pipeline
from tamis.pipeline.star import convert_node_label

DATA = Path(__file__).parent / "data" / "star"


def _counts(path):
    b = read_star(path)
    return {k: (len(v) if isinstance(v, pd.DataFrame) else 1) for k, v in b.items()}


def test_relion31_pipeline_read_extended_and_written(tmp_path):
    src = DATA / "default_pipeline.star"
    before = _counts(src)
    pipe = Pipeline.read(src)
    assert pipe.job_counter == 32 and len(pipe.processes) == 31
    assert (
        pipe.processes[7].name == "Class2D/job008/"
        and pipe.processes[7].type_label == "relion.class2d"
    )
    assert pipe.processes[7].alias == "Class2D/LoG/" and pipe.processes[7].status == "Succeeded"
    assert pipe.nodes["Import/job001/movies.star"].type_label.startswith(
        "MicrographMovieGroupMetadata"
    )
    n_in = sum(len(p.inputs) for p in pipe.processes)
    n_out = sum(len(p.outputs) for p in pipe.processes)
    assert n_in == before["pipeline_input_edges"] and n_out == before["pipeline_output_edges"]
    assert len(pipe.nodes) == before["pipeline_nodes"]
    new = pipe.add_process(
        "Class2D",
        "relion.class2d",
        inputs={"Extract/job012/particles.star": "ParticleGroupMetadata.star.relion"},
        outputs={
            "Class2D/job032/run_it200_optimiser.star": "OptimiserData.star.relion.class2d",
            "Class2D/job032/run_it200_data.star": "ParticleGroupMetadata.star.relion.class2d",
        },
    )
    assert new.name == "Class2D/job032/" and pipe.job_counter == 33
    out = tmp_path / "default_pipeline.star"
    pipe.write(out)
    text = out.read_text()
    assert text.count("# version 50001") == 5
    after = _counts(out)
    assert (
        after["pipeline_processes"] == 32
        and after["pipeline_nodes"] == before["pipeline_nodes"] + 2
    )
    assert after["pipeline_input_edges"] == n_in + 1 and after["pipeline_output_edges"] == n_out + 2
    again = Pipeline.read(out)
    assert [p.name for p in again.processes] == [p.name for p in pipe.processes]
    assert [p.inputs for p in again.processes] == [p.inputs for p in pipe.processes]
    assert [p.outputs for p in again.processes] == [p.outputs for p in pipe.processes]
    assert {k: v.type_label for k, v in again.nodes.items()} == {
        k: v.type_label for k, v in pipe.nodes.items()
    }
    assert (
        read_star(out)["pipeline_processes"]["rlnPipeLineProcessTypeLabel"].iloc[-1]
        == "relion.class2d"
    )


def test_relion4_labels_converted():
    assert (
        convert_node_label("ParticlesData.star.relion.class2d")
        == "ParticleGroupMetadata.star.relion.class2d"
    )
    assert (
        convert_node_label("MicrographsCoords.star.relion.autopick")
        == "MicrographCoordsGroup.star.relion.autopick"
    )
    assert convert_node_label("DensityMap.mrc") == "DensityMap.mrc"


def test_job_star_round_trip_and_markers(tmp_path):
    from tamis.pipeline.job import (
        JobStar,
        clear_markers,
        exit_status,
        read_output_nodes,
        touch_node_marker,
        write_output_nodes,
    )

    job = JobStar(
        "relion.class2d",
        False,
        False,
        {"nr_classes": "50", "do_em": "No", "other_args": "--maxsig 5 --j 2", "fn_img": ""},
    )
    d = tmp_path / "Class2D/job010"
    d.mkdir(parents=True)
    job.write(d)
    text = (d / "job.star").read_text()
    assert '"--maxsig 5 --j 2"' in text and ' "" ' in text and "# version 50001" in text
    back = JobStar.read(d)
    assert back == job and not back.get_bool("do_em")
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "run.job").write_text(
        "job_type == relion.autopick\nis_continue == false\nlog_diam_min == 150\n"
    )
    legacy = JobStar.read(tmp_path / "legacy")
    assert legacy.type_label == "relion.autopick" and legacy.options["log_diam_min"] == "150"
    assert exit_status(d) is None
    (d / "RELION_JOB_EXIT_FAILURE").touch()
    assert exit_status(d) == "Failed"
    clear_markers(d)
    assert exit_status(d) is None
    write_output_nodes(
        d, [("Class2D/job010/run_it200_optimiser.star", "OptimiserData.star.relion.class2d")]
    )
    assert read_output_nodes(d) == [
        ("Class2D/job010/run_it200_optimiser.star", "OptimiserData.star.relion.class2d", 1)
    ]
    m = touch_node_marker(
        tmp_path, "Class2D/job010/run_it200_optimiser.star", "OptimiserData.star.relion.class2d"
    )
    assert (
        m == tmp_path / ".Nodes/OptimiserData/Class2D/job010/run_it200_optimiser.star"
        and m.exists()
    )


def test_jobs_run_from_job_star_pick_extract_class2d_select(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from tamis.pipeline.job import JobStar, exit_status, read_output_nodes
    from tamis.pipeline.jobs import job_type, run_job
    from tamis.rank.network import ClassRankerNet
    from tests.helpers import tiny_micrographs

    monkeypatch.chdir(tmp_path)
    tiny_micrographs("Import/job001", n=2, size=512, per=25, snr=0.3, seed=2)
    assert job_type("relion.autopick.log").dirname == "AutoPick"
    assert job_type("relion.class2d.helical").label == "relion.class2d"

    def run(dirname, label, options):
        d = tmp_path / dirname
        d.mkdir(parents=True)
        JobStar(label, options=options).write(d)
        status = run_job(d)
        assert status == "Succeeded", (d / "run.err").read_text()
        assert exit_status(d) == "Succeeded"
        return read_output_nodes(d)

    nodes = run(
        "AutoPick/job002",
        "relion.autopick.log",
        {
            "fn_input_autopick": "Import/job001/micrographs.star",
            "log_diam_min": "90",
            "log_diam_max": "130",
        },
    )
    assert nodes[0][0].endswith("AutoPick/job002/autopick.star")
    nodes = run(
        "Extract/job003",
        "relion.extract",
        {
            "star_mics": "Import/job001/micrographs.star",
            "coords_suffix": nodes[0][0],
            "extract_size": "64",
            "do_float16": "No",
        },
    )
    parts = nodes[0][0]
    nodes = run(
        "Class2D/job004",
        "relion.class2d",
        {
            "fn_img": parts,
            "nr_classes": "3",
            "do_em": "Yes",
            "nr_iter_em": "2",
            "particle_diameter": "130",
            "psi_sampling": "15",
            "offset_range": "3",
            "offset_step": "1.5",
        },
    )
    assert nodes[0][1] == "OptimiserData.star.relion.class2d" and nodes[0][0].endswith(
        "run_it002_optimiser.star"
    )
    save_file(
        {k: v.contiguous() for k, v in ClassRankerNet().state_dict().items()},
        str(tmp_path / "r.safetensors"),
    )
    nodes = run(
        "Select/job005",
        "relion.select.class2dauto",
        {
            "fn_model": nodes[0][0],
            "rank_threshold": "-1000",
            "tamis_ranker_model": str(tmp_path / "r.safetensors"),
        },
    )
    assert [n[1] for n in nodes][0] == "ParticleGroupMetadata.star.relion"
    nodes = run(
        "InitialModel/job006",
        "relion.initialmodel",
        {
            "fn_img": parts,
            "nr_classes": "2",
            "nr_iter": "2",
            "sym_name": "C2",
            "particle_diameter": "130",
        },
    )
    assert nodes[0][0].endswith("InitialModel/job006/initial_model.mrc")
    assert nodes[0][1] == "DensityMap.mrc.relion.initialmodel"
    assert len(nodes) == 4 and (tmp_path / "InitialModel/job006/initial_model.mrc").is_file()
    bad = tmp_path / "Class2D/job006"
    bad.mkdir(parents=True)
    JobStar("relion.class2d", options={"fn_img": "missing.star"}).write(bad)
    assert run_job(bad) == "Failed" and "missing.star" in (bad / "run.err").read_text()


def test_project_schedules_runs_and_records_jobs(tmp_path):
    import json
    import time

    import pytest

    from tamis.pipeline.project import Project
    from tests.helpers import tiny_micrographs

    tiny_micrographs(tmp_path / "Import/job001")
    proj = Project(tmp_path)
    pick = proj.schedule(
        "relion.autopick.log",
        {
            "fn_input_autopick": "Import/job001/micrographs.star",
            "log_diam_min": "90",
            "log_diam_max": "130",
        },
    )
    assert pick.name == "AutoPick/job001/" and proj.read().processes[0].status == "Scheduled"
    assert proj.run(pick.name) == "Succeeded"
    pipe = proj.read()
    assert pipe.processes[0].outputs == ["AutoPick/job001/autopick.star"]
    assert (tmp_path / ".Nodes/MicrographCoordsGroup/AutoPick/job001/autopick.star").exists()
    ext = proj.schedule(
        "relion.extract",
        {
            "star_mics": "Import/job001/micrographs.star",
            "coords_suffix": "AutoPick/job001/autopick.star",
            "extract_size": "64",
        },
    )
    assert proj.read().process(ext.name).inputs == ["AutoPick/job001/autopick.star"]
    child = proj.run(ext.name, background=True)
    child.wait(timeout=120)
    for _ in range(50):
        if proj.check()[ext.name] != "Running":
            break
        time.sleep(0.2)
    assert proj.read().process(ext.name).status == "Succeeded"
    assert "Extract/job002/particles.star" in proj.read().nodes
    # a lock left by a process that is gone is taken over
    proj.lock_path.mkdir(parents=True)
    (proj.lock_path / "owner.json").write_text(
        json.dumps({"host": __import__("socket").gethostname(), "pid": 999999, "time": 0})
    )
    with pytest.warns(UserWarning, match="taking over"):
        with proj.edit() as pipe:
            assert len(pipe.processes) == 2
    assert not proj.lock_path.exists()


def test_refine_other_args_seed_and_performance_flags():
    from tamis.errors import TamisError
    from tamis.pipeline.jobs import _refine_other_args

    assert _refine_other_args("") == {}
    got = _refine_other_args("--dont_combine_weights_via_disc --pool 30 --random_seed 4 --j 2")
    assert got == {"random_seed": 4}
    assert _refine_other_args("--random_seed -1") == {"random_seed": None}  # the clock
    assert _refine_other_args("--offset_prior relion --pool 3") == {"offset_prior": "relion"}
    with pytest.raises(TamisError, match="random_seed"):
        _refine_other_args("--random_seed x")
    with pytest.raises(TamisError, match="--maxsig"):
        _refine_other_args("--maxsig 5")
