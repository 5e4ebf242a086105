"""``default_pipeline.star``: processes, nodes and edges of a RELION project.

Reads RELION 3.1 (integer types), 4 (``*Data`` node labels) and 5 files; writes RELION 5's
labels with a ``# version 50001`` line before each block, as RELION 5 does. Unknown labels are
kept as they are. RELION 4 and 5 map RELION 3.1's integer node types with their own numbering
(which changed in 4.0); tamis reads them with 3.1's meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tamis.errors import InputFileError
from tamis.io.star import read_star, write_relion_star

__all__ = ["Pipeline", "Process", "Node", "STATUS", "convert_node_label", "PROCESS_LABELS_31"]

STATUS = ["Running", "Scheduled", "Succeeded", "Failed", "Aborted"]

#: RELION 3.1 ``rlnPipeLineProcessType`` -> process label.
PROCESS_LABELS_31 = {
    0: "relion.import", 1: "relion.motioncorr", 2: "relion.ctffind", 3: "relion.manualpick",
    4: "relion.autopick", 5: "relion.extract", 7: "relion.select", 8: "relion.class2d",
    9: "relion.class3d", 10: "relion.refine3d", 12: "relion.maskcreate", 13: "relion.joinstar",
    14: "relion.subtract", 15: "relion.postprocess", 16: "relion.localres",
    18: "relion.initialmodel", 19: "relion.multibody", 20: "relion.polish",
    21: "relion.ctfrefine", 22: "dynamight", 23: "modelangelo", 99: "relion.external",
}  # fmt: skip

#: RELION 3.1 ``rlnPipeLineNodeType`` -> RELION 5 node label.
NODE_LABELS_31 = {
    0: "MicrographMovieGroupMetadata.star.relion",
    1: "MicrographGroupMetadata.star.relion",
    2: "MicrographCoordsGroup.star.relion",
    3: "ParticleGroupMetadata.star.relion",
    4: "ParticleGroupMetadata.star.relion",
    5: "Image2DGroupMetadata.star.relion",
    6: "DensityMap.mrc",
    7: "Mask3D.mrc",
    8: "OptimiserData.star.relion",
    9: "OptimiserData.star.relion",
    10: "DensityMap.mrc.halfmap",
    11: "DensityMap.mrc.relion.postprocess",
    12: "Image3D.mrc.localresmap",
    13: "LogFile.pdf.relion",
    14: "ProcessData.star.relion.postprocess",
    15: "ParamsData.txt.relion.polish",
}

#: RELION 4 node-label heads -> RELION 5 (``convertOldNodeTypeLabel``).
_OLD_HEADS = {
    "ParticlesData": "ParticleGroupMetadata",
    "MicrographMoviesData": "MicrographMovieGroupMetadata",
    "MicrographsData": "MicrographGroupMetadata",
    "MicrographsCoords": "MicrographCoordsGroup",
    "ImagesData": "Image2DGroupMetadata",
    "TomogramGroupMetadata": "TomogramGroupMetadata",
}


def convert_node_label(label: str) -> str:
    """A RELION 4 node label in RELION 5's words (other labels unchanged)."""
    head, dot, rest = label.partition(".")
    return _OLD_HEADS.get(head, head) + dot + rest


@dataclass
class Process:
    name: str  # "Class2D/job010/"
    type_label: str  # "relion.class2d"
    status: str = "Scheduled"
    alias: str = "None"
    inputs: list[str] = field(default_factory=list)  # node names
    outputs: list[str] = field(default_factory=list)


@dataclass
class Node:
    name: str
    type_label: str
    depth: int = 1


@dataclass
class Pipeline:
    job_counter: int = 1
    processes: list[Process] = field(default_factory=list)
    nodes: dict[str, Node] = field(default_factory=dict)

    # ---- reading -------------------------------------------------------------------------

    @classmethod
    def read(cls, path: str | Path) -> Pipeline:
        path = Path(path)
        if not path.is_file():
            raise InputFileError(path, "pipeline file not found")
        blocks = read_star(path)
        general = blocks.get("pipeline_general")
        if not isinstance(general, dict) or "rlnPipeLineJobCounter" not in general:
            raise InputFileError(path, "has no data_pipeline_general with rlnPipeLineJobCounter")
        old = (
            "version 5" not in path.read_text()[:4096] and "# version 50001" not in path.read_text()
        )
        pipe = cls(int(general["rlnPipeLineJobCounter"]))
        nodes = blocks.get("pipeline_nodes")
        if isinstance(nodes, pd.DataFrame):
            for _, row in nodes.iterrows():
                if "rlnPipeLineNodeTypeLabel" in row.index:
                    label = str(row["rlnPipeLineNodeTypeLabel"])
                    label = convert_node_label(label) if old else label
                elif "rlnPipeLineNodeType" in row.index:
                    label = NODE_LABELS_31.get(int(row["rlnPipeLineNodeType"]), "")
                else:
                    raise InputFileError(path, "pipeline_nodes has no node type column")
                depth = (
                    int(row["rlnPipeLineNodeTypeLabelDepth"])
                    if "rlnPipeLineNodeTypeLabelDepth" in row.index
                    else 1
                )
                name = str(row["rlnPipeLineNodeName"])
                pipe.nodes[name] = Node(name, label, depth)
        procs = blocks.get("pipeline_processes")
        if isinstance(procs, pd.DataFrame):
            for _, row in procs.iterrows():
                if "rlnPipeLineProcessTypeLabel" in row.index:
                    label = str(row["rlnPipeLineProcessTypeLabel"])
                    status = str(row["rlnPipeLineProcessStatusLabel"])
                elif "rlnPipeLineProcessType" in row.index:
                    label = PROCESS_LABELS_31.get(
                        int(row["rlnPipeLineProcessType"]), "relion.external"
                    )
                    status = STATUS[int(row["rlnPipeLineProcessStatus"])]
                else:
                    raise InputFileError(path, "pipeline_processes has no process type column")
                pipe.processes.append(
                    Process(
                        str(row["rlnPipeLineProcessName"]),
                        label,
                        status,
                        str(row.get("rlnPipeLineProcessAlias", "None")),
                    )
                )
        index = {p.name: p for p in pipe.processes}
        edges_in = blocks.get("pipeline_input_edges")
        if isinstance(edges_in, pd.DataFrame):
            for _, row in edges_in.iterrows():
                proc, node = str(row["rlnPipeLineEdgeProcess"]), str(row["rlnPipeLineEdgeFromNode"])
                if proc in index and node in pipe.nodes:  # RELION ignores dangling edges
                    index[proc].inputs.append(node)
        edges_out = blocks.get("pipeline_output_edges")
        if isinstance(edges_out, pd.DataFrame):
            for _, row in edges_out.iterrows():
                proc, node = str(row["rlnPipeLineEdgeProcess"]), str(row["rlnPipeLineEdgeToNode"])
                if proc in index and node in pipe.nodes:
                    index[proc].outputs.append(node)
        return pipe

    # ---- editing -------------------------------------------------------------------------

    def process(self, name: str) -> Process | None:
        return next((p for p in self.processes if p.name == name), None)

    def new_job_name(self, dirname: str) -> str:
        """``<dirname>/jobNNN/`` for the next job (RELION pads to 3 digits)."""
        return f"{dirname}/job{self.job_counter:03d}/"

    def add_process(
        self,
        dirname: str,
        type_label: str,
        *,
        inputs: dict[str, str] | None = None,
        outputs: dict[str, str] | None = None,
        status: str = "Scheduled",
        alias: str = "None",
    ) -> Process:
        """Add a job (a new ``jobNNN``; the counter moves on) with input and output nodes
        (file name -> node label)."""
        if status not in STATUS:
            raise ValueError(f"unknown status {status!r}")
        proc = Process(self.new_job_name(dirname), type_label, status, alias)
        self.job_counter += 1
        for name, label in (inputs or {}).items():
            self.nodes.setdefault(name, Node(name, label))
            proc.inputs.append(name)
        for name, label in (outputs or {}).items():
            self.nodes[name] = Node(name, label)
            proc.outputs.append(name)
        self.processes.append(proc)
        return proc

    # ---- writing -------------------------------------------------------------------------

    def write(self, path: str | Path) -> None:
        """RELION 5's layout and labels, atomically."""
        blocks: dict = {
            "pipeline_general": {"rlnPipeLineJobCounter": self.job_counter},
            "pipeline_processes": (
                ["rlnPipeLineProcessName", "rlnPipeLineProcessAlias",
                 "rlnPipeLineProcessTypeLabel", "rlnPipeLineProcessStatusLabel"],
                [[p.name, p.alias, p.type_label, p.status] for p in self.processes],
            ),
            "pipeline_nodes": (
                ["rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel", "rlnPipeLineNodeTypeLabelDepth"],
                [[n.name, n.type_label, n.depth] for n in self.nodes.values()],
            ),
        }  # fmt: skip
        ins = [[node, p.name] for p in self.processes for node in p.inputs]
        outs = [[p.name, node] for p in self.processes for node in p.outputs]
        if ins:
            blocks["pipeline_input_edges"] = (
                ["rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"],
                ins,
            )
        if outs:
            blocks["pipeline_output_edges"] = (
                ["rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode"],
                outs,
            )
        write_relion_star(path, blocks)
