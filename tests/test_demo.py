"""End to end: the demo pipeline (simulated micrographs -> prep + proc schemes in the background ->
import, CTF, micrograph selection, picking, extraction, VDAM, ranker selection) on a tiny data
set, checked against the ground truth. Runs without ../shared."""

from __future__ import annotations

import json

from tamis.demo import DemoOptions, run_demo
from tamis.pipeline.project import Project


def test_demo_pipeline_end_to_end(tmp_path):
    project = tmp_path / "demo"
    lines = run_demo(
        project,
        # K 3 and 20 mini-batches: with K 6 and 15 mini-batches over ~170 particles the classes
        # were so noisy that the ranker's choice flipped between runs (and machines)
        DemoOptions(n_micrographs=4, size_px=768, particles_per_micrograph=50, iterations=20,
                    nr_classes=3, batches=2, wait_sec=2, inimodel_iterations=19,
                    refine_iter_max=6),
        log=lambda s: None,
    )  # fmt: skip
    assert any(line.startswith("pipeline finished") for line in lines)
    summary = json.loads((project / "summary.json").read_text())
    assert summary["ctf_median_abs_error_A"] < 300
    assert summary["pick_f1"] > 0.7
    assert summary["particles_selected"] > 0
    newest_select = sorted(project.glob("Select/job*"))[-1]
    scores = (newest_select / "class_scores.csv").read_text()
    assert summary["selected_true_fraction"] >= summary["extracted_true_fraction"] - 0.05, (
        f"{summary}\n{newest_select}:\n{scores}"
    )
    # the 3D branch ran once, after the last micrograph, and ended with a post-processed map
    for kind in ("InitialModel", "Refine3D", "MaskCreate", "PostProcess"):
        assert len(list(project.glob(f"{kind}/job*"))) == 1, kind
    # lenient on purpose: ~200 particles, a 19-mini-batch initial model and 6 iterations; at
    # FSC 0.5 with the truth such a map ranged from 14 to 43 A over simulation seeds (the
    # benchmarks hold the quality claims); a map unlike the truth stays near the box's 0.143
    assert summary["map_resolution_A"] < 40 and summary["map_fsc_truth_0143_A"] < 35
    assert (project / "map_slices.png").is_file()
    html = (project / "summary.html").read_text()
    assert "map_slices.png" in html and "postprocess_fsc.png" in html
    assert "gallery.png" in html and "Class scores" in html
    statuses = Project(project).check()
    assert statuses and all(s == "Succeeded" for s in statuses.values())
    # on-the-fly: the second batch made proc run a second pass (a new 2D and Select job)
    assert len(list(project.glob("Class2D/job*"))) == 2
    assert (project / "relion_it_options.py").is_file()
    for name in ("prep", "proc"):
        assert (project / "Schemes" / name / "RELION_JOB_EXIT_SUCCESS").is_file()
    assert not list(project.glob(".relion_lock*/*"))
