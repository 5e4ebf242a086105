"""Write tamis's shipped ``prep`` scheme (``src/tamis/data/schemes/prep``). The ``proc`` scheme is
edited in place since its 3D branch (commit eb0d70d; its graph is checked by tests/test_it.py):
the generator written for its 2D part was removed rather than left to overwrite it.

The graphs follow RELION's shipped schemes (see ../shared/docs/relion-ranker-schemes-pipeliner.md
section 2.10) with the jobs tamis has:

- ``prep``: WAIT -> EXIT_maxtime -> importmovies -> motioncorr -> ctffind -> COUNT_mics ->
  (stop check) -> WAIT, RELION's; with ``do_movies`` false (tamis's addition, set by ``tamis it
  --mics``), EXIT_maxtime -> importmics -> ctffind instead, for motion-corrected micrographs.
  ``ctffind`` reads ``$$ctf_input`` (set with ``do_movies`` by ``tamis it``).

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
                "current_nr_mics": (0.0, 0.0), "do_at_most": (50.0, 50.0)}  # fmt: skip
    s.bools = {"do_movies": (True, True)}
    s.strings = {"micrographs": ("micrographs", "micrographs"),
                 "ctf_input": ("Schemes/prep/motioncorr/corrected_micrographs.star",) * 2,
                 "ctf_mics": ("Schemes/prep/ctffind/micrographs_ctf.star",) * 2}  # fmt: skip
    s.operators = {
        "WAIT": Operator("wait", U, "wait_sec"),
        "EXIT_maxtime": Operator("exit_maxtime", U, "maxtime_hr"),
        "COUNT_mics": Operator("float=count_images", "current_nr_mics", "ctf_mics", "micrographs"),
    }
    s.jobs = {name: SchemeJob(name) for name in ("importmics", "importmovies", "motioncorr",
                                                  "ctffind")}  # fmt: skip
    s.edges = [
        Edge("WAIT", "EXIT_maxtime"),
        Edge("EXIT_maxtime", "importmics", True, "importmovies", "do_movies"),
        Edge("importmovies", "motioncorr"),
        Edge("motioncorr", "ctffind"),
        Edge("importmics", "ctffind"),
        Edge("ctffind", "COUNT_mics"),
    ]
    stop_check(s, "COUNT_mics", "current_nr_mics")
    imports = {"do_raw": "Yes", "optics_group_name": "opticsGroup1", "fn_mtf": "", "kV": "300",
               "Cs": "2.7", "Q0": "0.1", "beamtilt_x": "0", "beamtilt_y": "0", "do_other": "No"}  # fmt: skip
    jobs = {
        "importmics": JobStar("relion.import.movies", options={
            **imports, "fn_in_raw": "Micrographs/*.mrc", "is_multiframe": "No", "angpix": "1.4",
        }),
        "importmovies": JobStar("relion.import.movies", options={
            **imports, "fn_in_raw": "Movies/*.tif", "is_multiframe": "Yes", "angpix": "1.0",
        }),
        "motioncorr": JobStar("relion.motioncorr.own", options={
            "input_star_mics": "Schemes/prep/importmovies/movies.star", "first_frame_sum": "1",
            "last_frame_sum": "-1", "dose_per_frame": "1", "pre_exposure": "0",
            "eer_grouping": "32", "do_float16": "Yes", "do_dose_weighting": "Yes",
            "do_save_noDW": "Yes", "do_save_ps": "Yes", "group_for_ps": "4", "bfactor": "150",
            "patch_x": "5", "patch_y": "5", "group_frames": "1", "bin_factor": "1",
            "fn_gain_ref": "", "gain_rot": "No rotation (0)", "gain_flip": "No flipping (0)",
            "fn_defect": "", "do_own_motioncor": "Yes", "other_args": "--do_at_most $$do_at_most",
            "nr_threads": "2",
        }),
        "ctffind": JobStar("relion.ctffind.ctffind4", options={
            "input_star_mics": "$$ctf_input", "use_noDW": "Yes",
            "do_phaseshift": "No", "box": "512", "resmin": "30", "resmax": "5",
            "dfmin": "5000", "dfmax": "50000", "dfstep": "500", "dast": "100",
        }),
    }  # fmt: skip
    write(s, jobs)


if __name__ == "__main__":
    prep()
    print(f"wrote {TARGET}/prep")
