"""Write tamis's shipped ``prep`` and ``proc`` schemes (``src/tamis/data/schemes/``).

The graphs follow RELION's shipped schemes (see ../shared/docs/relion-ranker-schemes-pipeliner.md
section 2.10) with the jobs tamis has:

- ``prep``: WAIT -> EXIT_maxtime -> importmics -> ctffind -> COUNT_mics -> (stop check) -> WAIT.
  No motion correction (not in tamis): ``importmics`` imports motion-corrected micrographs.
- ``proc``: WAIT -> EXIT_maxtime -> HAS_ctffind -> select_mics -> COUNT_mics ->
  HAS_mics_increased -> SET_prev_nr_mics -> SET_do_topaz -> autopick -> extract -> class2d ->
  select_parts -> COUNT_parts -> (stop check) -> WAIT. No 3D branch (not in tamis yet).

Stop check (tamis's addition; RELION's schemes only end at ``maxtime_hr``): with
``nr_mics_to_process`` > 0 the scheme exits once that many micrographs went through a pass;
0 (the default) keeps waiting for new micrographs as RELION does.

Run: ``.venv/bin/python scripts/make_schemes.py``
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tamis.pipeline.job import JobStar
from tamis.pipeline.jobs import job_type
from tamis.schemes.scheme import Edge, Operator, Scheme, SchemeJob

TARGET = Path(__file__).resolve().parents[1] / "src" / "tamis" / "data" / "schemes"
U = "undefined"


def stop_check(s: Scheme, after: str, count: str) -> None:
    """``after`` -> HAS_limit -> CHECK_done -> SET_stop -> fork(do_stop: EXIT / WAIT)."""
    s.floats["nr_mics_to_process"] = (0.0, 0.0)
    s.bools.update({"has_limit": (False, False), "done_all": (False, False)})
    s.bools["do_stop"] = (False, False)
    s.operators.update(
        {
            "HAS_limit": Operator("bool=gt", "has_limit", "nr_mics_to_process", "0"),
            "CHECK_done": Operator("bool=ge", "done_all", count, "nr_mics_to_process"),
            "SET_stop": Operator("bool=and", "do_stop", "has_limit", "done_all"),
            "EXIT": Operator("exit"),
        }
    )
    s.edges += [
        Edge(after, "HAS_limit"),
        Edge("HAS_limit", "CHECK_done"),
        Edge("CHECK_done", "SET_stop"),
        Edge("SET_stop", "WAIT", True, "EXIT", "do_stop"),
    ]


def write(s: Scheme, jobs: dict[str, JobStar]) -> None:
    d = TARGET / s.short_name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    s.write(d / "scheme.star")
    for name, job in jobs.items():
        job_type(job.type_label)  # must be a registered tamis job
        (d / name).mkdir()
        job.write(d / name)


def prep() -> None:
    s = Scheme("Schemes/prep/")
    s.floats = {"maxtime_hr": (48.0, 48.0), "wait_sec": (180.0, 180.0),
                "current_nr_mics": (0.0, 0.0)}  # fmt: skip
    s.strings = {"micrographs": ("micrographs", "micrographs"),
                 "ctf_mics": ("Schemes/prep/ctffind/micrographs_ctf.star",) * 2}  # fmt: skip
    s.operators = {
        "WAIT": Operator("wait", U, "wait_sec"),
        "EXIT_maxtime": Operator("exit_maxtime", U, "maxtime_hr"),
        "COUNT_mics": Operator("float=count_images", "current_nr_mics", "ctf_mics", "micrographs"),
    }
    s.jobs = {"importmics": SchemeJob("importmics"), "ctffind": SchemeJob("ctffind")}
    s.edges = [
        Edge("WAIT", "EXIT_maxtime"),
        Edge("EXIT_maxtime", "importmics"),
        Edge("importmics", "ctffind"),
        Edge("ctffind", "COUNT_mics"),
    ]
    stop_check(s, "COUNT_mics", "current_nr_mics")
    jobs = {
        "importmics": JobStar("relion.import.movies", options={
            "do_raw": "Yes", "fn_in_raw": "Micrographs/*.mrc", "is_multiframe": "No",
            "optics_group_name": "opticsGroup1", "fn_mtf": "", "angpix": "1.4", "kV": "300",
            "Cs": "2.7", "Q0": "0.1", "beamtilt_x": "0", "beamtilt_y": "0", "do_other": "No",
        }),
        "ctffind": JobStar("relion.ctffind.ctffind4", options={
            "input_star_mics": "Schemes/prep/importmics/micrographs.star", "use_noDW": "No",
            "do_phaseshift": "No", "box": "512", "resmin": "30", "resmax": "5",
            "dfmin": "5000", "dfmax": "50000", "dfstep": "500", "dast": "100",
        }),
    }  # fmt: skip
    write(s, jobs)


def proc() -> None:
    s = Scheme("Schemes/proc/")
    s.floats = {
        "current_nr_mics": (0.0, 0.0), "prev_nr_mics": (0.0, 0.0), "maxtime_hr": (48.0, 48.0),
        "wait_sec": (180.0, 180.0), "current_nr_parts": (0.0, 0.0),
    }  # fmt: skip
    s.bools = {"has_ctffind": (False, False), "has_larger_nr_mics": (False, False),
               "do_log": (True, True), "do_topaz": (False, False)}  # fmt: skip
    s.strings = {
        "ctffind_mics": ("Schemes/prep/ctffind/micrographs_ctf.star",) * 2,
        "selected_mics": ("Schemes/proc/select_mics/micrographs.star",) * 2,
        "selected_parts": ("Schemes/proc/select_parts/particles.star",) * 2,
        "particles": ("particles", "particles"),
        "micrographs": ("micrographs", "micrographs"),
        "topaz_model": ("", ""),
    }
    s.operators = {
        "WAIT": Operator("wait", U, "wait_sec"),
        "EXIT_maxtime": Operator("exit_maxtime", U, "maxtime_hr"),
        "HAS_ctffind": Operator("bool=file_exists", "has_ctffind", "ctffind_mics"),
        "COUNT_mics": Operator("float=count_images", "current_nr_mics", "selected_mics",
                               "micrographs"),
        "COUNT_parts": Operator("float=count_images", "current_nr_parts", "selected_parts",
                                "particles"),
        "SET_prev_nr_mics": Operator("float=set", "prev_nr_mics", "current_nr_mics"),
        "HAS_mics_increased": Operator("bool=gt", "has_larger_nr_mics", "current_nr_mics",
                                       "prev_nr_mics"),
        "SET_do_topaz": Operator("bool=not", "do_topaz", "do_log"),
    }  # fmt: skip
    s.jobs = {
        "select_mics": SchemeJob("select_mics"),
        "autopick": SchemeJob("autopick"),
        "extract": SchemeJob("extract"),
        "class2d": SchemeJob("class2d", "new"),
        "select_parts": SchemeJob("select_parts", "new"),
    }
    s.edges = [
        Edge("WAIT", "EXIT_maxtime"),
        Edge("EXIT_maxtime", "HAS_ctffind"),
        Edge("HAS_ctffind", "WAIT", True, "select_mics", "has_ctffind"),
        Edge("select_mics", "COUNT_mics"),
        Edge("COUNT_mics", "HAS_mics_increased"),
        Edge("HAS_mics_increased", "WAIT", True, "SET_prev_nr_mics", "has_larger_nr_mics"),
        Edge("SET_prev_nr_mics", "SET_do_topaz"),
        Edge("SET_do_topaz", "autopick"),
        Edge("autopick", "extract"),
        Edge("extract", "class2d"),
        Edge("class2d", "select_parts"),
        Edge("select_parts", "COUNT_parts"),
    ]
    stop_check(s, "COUNT_parts", "current_nr_mics")
    jobs = {
        "select_mics": JobStar("relion.select.onvalue", options={
            "fn_mic": "$$ctffind_mics", "fn_data": "", "fn_model": "",
            "do_select_values": "Yes", "select_label": "rlnCtfMaxResolution",
            "select_minval": "-9999", "select_maxval": "6",
        }),
        "autopick": JobStar("relion.autopick.log", options={
            "fn_input_autopick": "Schemes/proc/select_mics/micrographs.star",
            "do_log": "$$do_log", "do_topaz": "$$do_topaz", "do_topaz_pick": "Yes",
            "topaz_model": "$$topaz_model", "topaz_particle_diameter": "180",
            "topaz_nr_particles": "-1", "log_diam_min": "150", "log_diam_max": "180",
            "log_invert": "No", "log_maxres": "20", "log_adjust_thr": "0",
            "log_upper_thr": "999", "angpix": "-1",
        }),
        "extract": JobStar("relion.extract", options={
            "star_mics": "Schemes/proc/select_mics/micrographs.star",
            "coords_suffix": "Schemes/proc/autopick/autopick.star", "do_reextract": "No",
            "extract_size": "256", "do_rescale": "Yes", "rescale": "64", "do_invert": "Yes",
            "do_norm": "Yes", "bg_diameter": "-1", "do_float16": "Yes",
            "do_fom_threshold": "No", "minimum_pick_fom": "0",
        }),
        "class2d": JobStar("relion.class2d", options={
            "fn_img": "Schemes/proc/extract/particles.star", "nr_classes": "50",
            "do_grad": "Yes", "nr_iter_grad": "200", "do_em": "No", "nr_iter_em": "25",
            "particle_diameter": "200", "tau_fudge": "2", "do_ctf_correction": "Yes",
            "ctf_intact_first_peak": "No", "do_zero_mask": "Yes", "highres_limit": "-1",
            "do_center": "Yes", "psi_sampling": "6", "offset_range": "5", "offset_step": "1",
            "nr_threads": "2", "use_gpu": "No", "gpu_ids": "",
        }),
        "select_parts": JobStar("relion.select.class2dauto", options={
            "fn_model": "Schemes/proc/class2d/run_it200_optimiser.star",
            "do_class_ranker": "Yes", "rank_threshold": "-1", "select_nr_parts": "-1",
            "select_nr_classes": "-1",
        }),
    }  # fmt: skip
    write(s, jobs)


if __name__ == "__main__":
    prep()
    proc()
    print(f"wrote {TARGET}/prep and {TARGET}/proc")
