"""A RELION job directory: ``job.star`` (type label, continue flag, options), exit markers,
``RELION_OUTPUT_NODES.star`` and the ``.Nodes`` markers of the project.

``job.star`` options are strings as RELION writes them: booleans ``Yes``/``No``, the empty string
``""``, values with spaces quoted. The legacy ``run.job`` text format (``label == value``) is read
too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tamis.errors import InputFileError, TamisError
from tamis.io.star import read_star, write_relion_star

__all__ = [
    "JobStar",
    "EXIT_MARKERS",
    "checked_job_dir",
    "exit_status",
    "clear_markers",
    "read_output_nodes",
    "write_output_nodes",
    "touch_node_marker",
]

EXIT_MARKERS = {
    "Succeeded": "RELION_JOB_EXIT_SUCCESS",
    "Failed": "RELION_JOB_EXIT_FAILURE",
    "Aborted": "RELION_JOB_EXIT_ABORTED",
}
ABORT_NOW = "RELION_JOB_ABORT_NOW"


@dataclass
class JobStar:
    type_label: str  # "relion.class2d"
    is_continue: bool = False
    is_tomo: bool = False
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> JobStar:
        path = Path(path)
        if path.is_dir():
            path = path / "job.star"
        if not path.is_file():
            legacy = path.with_name("run.job")
            if legacy.is_file():
                return cls._read_legacy(legacy)
            raise InputFileError(path, "job.star not found")
        blocks = read_star(path)
        job = blocks.get("job")
        if not isinstance(job, dict) or not ("rlnJobTypeLabel" in job or "rlnJobType" in job):
            raise InputFileError(path, "has no data_job block with rlnJobTypeLabel")
        label = str(job.get("rlnJobTypeLabel", job.get("rlnJobType")))
        opts = blocks.get("joboptions_values")
        options: dict[str, str] = {}
        if isinstance(opts, dict):
            opts = pd.DataFrame([opts])
        if isinstance(opts, pd.DataFrame):
            missing = {"rlnJobOptionVariable", "rlnJobOptionValue"} - set(opts.columns)
            if missing:
                raise InputFileError(
                    path, f"data_joboptions_values lacks {', '.join(sorted(missing))}"
                )
            for _, row in opts.iterrows():
                v = row["rlnJobOptionValue"]
                options[str(row["rlnJobOptionVariable"])] = "" if pd.isna(v) else str(v)
        return cls(
            label, _flag(job, "rlnJobIsContinue", path), _flag(job, "rlnJobIsTomo", path), options
        )

    @classmethod
    def _read_legacy(cls, path: Path) -> JobStar:
        label, options, cont = "", {}, False
        for line in path.read_text().splitlines():
            if "==" not in line:
                continue
            key, _, value = (p.strip() for p in line.partition("=="))
            if key == "job_type":
                label = value
            elif key == "is_continue":
                cont = value.lower() in ("true", "1", "yes")
            else:
                options[key] = value
        return cls(label, cont, False, options)

    def write(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "job.star"
        write_relion_star(
            path,
            {
                "job": {
                    "rlnJobTypeLabel": self.type_label,
                    "rlnJobIsContinue": int(self.is_continue),
                    "rlnJobIsTomo": int(self.is_tomo),
                },
                "joboptions_values": (
                    ["rlnJobOptionVariable", "rlnJobOptionValue"],
                    [[k, v] for k, v in self.options.items()],
                ),
            },
        )

    def get_bool(self, key: str, default: bool = False) -> bool:
        v = self.options.get(key)
        return default if v is None else v.strip().lower() in ("yes", "true", "1")


def _flag(job: dict, key: str, path: Path) -> bool:
    """A 0/1 field of data_job (RELION writes integers)."""
    v = job.get(key, 0)
    try:
        return bool(int(v))
    except (TypeError, ValueError, OverflowError):
        raise InputFileError(path, f"{key} is {v}, not 0 or 1") from None


def checked_job_dir(project: str | Path, name: str) -> Path:
    """``project / name`` when it stays inside the project once links are followed; a clear
    error otherwise (a job directory, or its type directory, that links elsewhere is never
    written: nothing of a job lands outside its project)."""
    root = Path(project).resolve()
    d = Path(project) / name
    target = d.resolve()
    if not target.is_relative_to(root):
        raise TamisError(
            f"{d}: the job directory leads outside the project (to {target}); tamis writes job "
            "outputs only inside the project"
        )
    return d


def exit_status(job_dir: str | Path) -> str | None:
    """``Succeeded``/``Failed``/``Aborted`` from the job's exit marker, or None (running)."""
    d = Path(job_dir)
    for status, marker in EXIT_MARKERS.items():
        if (d / marker).exists():
            return status
    return None


def clear_markers(job_dir: str | Path) -> None:
    """Remove stale exit and abort markers before a (re)run, as RELION's runJob does."""
    d = Path(job_dir)
    for marker in [*EXIT_MARKERS.values(), ABORT_NOW]:
        (d / marker).unlink(missing_ok=True)


def read_output_nodes(job_dir: str | Path) -> list[tuple[str, str, int]]:
    """``RELION_OUTPUT_NODES.star`` -> [(name, type label, depth)] (empty if absent)."""
    path = Path(job_dir) / "RELION_OUTPUT_NODES.star"
    if not path.is_file():
        return []
    table = read_star(path).get("output_nodes")
    if isinstance(table, dict):
        table = pd.DataFrame([table])
    if not isinstance(table, pd.DataFrame):
        raise InputFileError(path, "has no data_output_nodes table")
    depth = table.get("rlnPipeLineNodeTypeLabelDepth", pd.Series([1] * len(table)))
    return [
        (str(n), str(t), int(d))
        for n, t, d in zip(
            table["rlnPipeLineNodeName"], table["rlnPipeLineNodeTypeLabel"], depth, strict=True
        )
    ]


def write_output_nodes(job_dir: str | Path, nodes: list[tuple[str, str]]) -> None:
    """Declare a job's outputs (name, node type label) for the pipeliner."""
    write_relion_star(
        Path(job_dir) / "RELION_OUTPUT_NODES.star",
        {
            "output_nodes": (
                ["rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel"],
                [list(n) for n in nodes],
            )
        },
    )


def touch_node_marker(project: str | Path, name: str, type_label: str, depth: int = 1) -> Path:
    """``.Nodes/<first depth tokens of the label>/<name>``: the empty files RELION's GUI browses."""
    top = ".".join(type_label.split(".")[: max(depth, 1)])
    marker = Path(project) / ".Nodes" / top / name
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return marker
