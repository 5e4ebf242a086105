"""``Schemes/NAME/scheme.star``: variables, operators, jobs and edges of a RELION scheme.

Written as RELION writes it: general, floats, bools, strings, operators, jobs, edges; variables,
operators and jobs sorted by name, edges in their own order; ``# version 50001`` before each
block. Reading accepts any block order and missing (empty) tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tamis.errors import InputFileError, TamisError
from tamis.io.star import read_star, write_relion_star

__all__ = ["Scheme", "Edge", "SchemeJob", "Operator", "UNDEFINED"]

UNDEFINED = "undefined"


@dataclass
class Operator:
    type: str
    output: str = UNDEFINED
    input1: str = UNDEFINED
    input2: str = UNDEFINED


@dataclass
class SchemeJob:
    current_name: str
    mode: str = "continue"  # or "new"
    has_started: bool = False


@dataclass
class Edge:
    input: str
    output: str  # the successor; for a fork: when the bool is False
    is_fork: bool = False
    output_if_true: str = UNDEFINED
    boolean: str = UNDEFINED


@dataclass
class Scheme:
    name: str  # "Schemes/prep/"
    current_node: str = UNDEFINED
    floats: dict[str, tuple[float, float]] = field(default_factory=dict)  # value, reset value
    bools: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    strings: dict[str, tuple[str, str]] = field(default_factory=dict)
    operators: dict[str, Operator] = field(default_factory=dict)
    jobs: dict[str, SchemeJob] = field(default_factory=dict)  # original name -> state
    edges: list[Edge] = field(default_factory=list)

    @property
    def short_name(self) -> str:
        return self.name.rstrip("/").split("/")[-1]

    # ---- file ----------------------------------------------------------------------------

    @classmethod
    def read(cls, path: str | Path) -> Scheme:
        path = Path(path)
        if not path.is_file():
            raise InputFileError(path, "scheme file not found")
        blocks = read_star(path)
        general = blocks.get("scheme_general")
        if not isinstance(general, dict) or "rlnSchemeName" not in general:
            raise InputFileError(path, "has no data_scheme_general with rlnSchemeName")
        try:
            return cls._from_blocks(blocks, general)
        except KeyError as exc:
            raise InputFileError(path, f"a scheme table lacks the column {exc.args[0]}") from None
        except (ValueError, TypeError, OverflowError) as exc:
            msg = str(exc).strip().splitlines()
            raise InputFileError(path, f"malformed value ({msg[0] if msg else exc!r})") from None

    @classmethod
    def _from_blocks(cls, blocks: dict, general: dict) -> Scheme:
        sch = cls(
            str(general["rlnSchemeName"]), str(general.get("rlnSchemeCurrentNodeName", UNDEFINED))
        )

        def rows(block: str) -> list[pd.Series]:
            t = blocks.get(block)
            if isinstance(t, dict):  # a one-row table may come back as key/value
                t = pd.DataFrame([t])
            return [] if t is None else [r for _, r in t.iterrows()]

        for r in rows("scheme_floats"):
            sch.floats[str(r["rlnSchemeFloatVariableName"])] = (
                float(r["rlnSchemeFloatVariableValue"]),
                float(r["rlnSchemeFloatVariableResetValue"]),
            )
        for r in rows("scheme_bools"):
            sch.bools[str(r["rlnSchemeBooleanVariableName"])] = (
                _bool(r["rlnSchemeBooleanVariableValue"]),
                _bool(r["rlnSchemeBooleanVariableResetValue"]),
            )
        for r in rows("scheme_strings"):
            sch.strings[str(r["rlnSchemeStringVariableName"])] = (
                _text(r["rlnSchemeStringVariableValue"]),
                _text(r["rlnSchemeStringVariableResetValue"]),
            )
        for r in rows("scheme_operators"):
            sch.operators[str(r["rlnSchemeOperatorName"])] = Operator(
                str(r["rlnSchemeOperatorType"]),
                _text(r["rlnSchemeOperatorOutput"]),
                _text(r["rlnSchemeOperatorInput1"]),
                _text(r["rlnSchemeOperatorInput2"]),
            )
        for r in rows("scheme_jobs"):
            sch.jobs[str(r["rlnSchemeJobNameOriginal"])] = SchemeJob(
                str(r["rlnSchemeJobName"]),
                str(r["rlnSchemeJobMode"]),
                _bool(r["rlnSchemeJobHasStarted"]),
            )
        for r in rows("scheme_edges"):
            sch.edges.append(
                Edge(
                    str(r["rlnSchemeEdgeInputNodeName"]),
                    str(r["rlnSchemeEdgeOutputNodeName"]),
                    _bool(r["rlnSchemeEdgeIsFork"]),
                    _text(r["rlnSchemeEdgeOutputNodeNameIfTrue"]),
                    _text(r["rlnSchemeEdgeBooleanVariable"]),
                )
            )
        return sch

    def write(self, path: str | Path) -> None:
        blocks: dict = {
            "scheme_general": {
                "rlnSchemeName": self.name,
                "rlnSchemeCurrentNodeName": self.current_node,
            }
        }
        if self.floats:
            blocks["scheme_floats"] = (
                [
                    "rlnSchemeFloatVariableName",
                    "rlnSchemeFloatVariableValue",
                    "rlnSchemeFloatVariableResetValue",
                ],
                [[k, _num(v), _num(r)] for k, (v, r) in sorted(self.floats.items())],
            )
        if self.bools:
            blocks["scheme_bools"] = (
                [
                    "rlnSchemeBooleanVariableName",
                    "rlnSchemeBooleanVariableValue",
                    "rlnSchemeBooleanVariableResetValue",
                ],
                [[k, int(v), int(r)] for k, (v, r) in sorted(self.bools.items())],
            )
        if self.strings:
            blocks["scheme_strings"] = (
                [
                    "rlnSchemeStringVariableName",
                    "rlnSchemeStringVariableValue",
                    "rlnSchemeStringVariableResetValue",
                ],
                [[k, v, r] for k, (v, r) in sorted(self.strings.items())],
            )
        if self.operators:
            blocks["scheme_operators"] = (
                ["rlnSchemeOperatorName", "rlnSchemeOperatorType", "rlnSchemeOperatorOutput",
                 "rlnSchemeOperatorInput1", "rlnSchemeOperatorInput2"],
                [[k, o.type, o.output, o.input1, o.input2] for k, o in sorted(self.operators.items())],
            )  # fmt: skip
        if self.jobs:
            blocks["scheme_jobs"] = (
                [
                    "rlnSchemeJobNameOriginal",
                    "rlnSchemeJobName",
                    "rlnSchemeJobMode",
                    "rlnSchemeJobHasStarted",
                ],
                [
                    [k, j.current_name, j.mode, int(j.has_started)]
                    for k, j in sorted(self.jobs.items())
                ],
            )
        if self.edges:
            blocks["scheme_edges"] = (
                ["rlnSchemeEdgeInputNodeName", "rlnSchemeEdgeOutputNodeName", "rlnSchemeEdgeIsFork",
                 "rlnSchemeEdgeOutputNodeNameIfTrue", "rlnSchemeEdgeBooleanVariable"],
                [[e.input, e.output, int(e.is_fork), e.output_if_true, e.boolean] for e in self.edges],
            )  # fmt: skip
        write_relion_star(path, blocks)

    # ---- state ---------------------------------------------------------------------------

    def reset(self) -> None:
        """RELION's ``--reset``: values from reset values, jobs back to their original names and
        not started, the current node the first edge's input."""
        self.floats = {k: (r, r) for k, (_, r) in self.floats.items()}
        self.bools = {k: (r, r) for k, (_, r) in self.bools.items()}
        self.strings = {k: (r, r) for k, (_, r) in self.strings.items()}
        for name, job in self.jobs.items():
            job.current_name, job.has_started = name, False
        self.current_node = self.edges[0].input if self.edges else UNDEFINED

    def next_node(self, node: str | None = None) -> str:
        """The successor of ``node`` (default the current node): the **last** edge out of it (as
        RELION), a fork by its boolean; ``undefined`` when there is none."""
        node = self.current_node if node is None else node
        nxt = UNDEFINED
        for e in self.edges:
            if e.input == node:
                if e.is_fork:
                    if e.boolean not in self.bools:
                        raise TamisError(f"fork from {node}: no boolean variable {e.boolean!r}")
                    nxt = e.output_if_true if self.bools[e.boolean][0] else e.output
                else:
                    nxt = e.output
        return nxt

    def set_variable(self, name: str, value: str, reset_value: str | None = None) -> None:
        """``--set_var``: parse ``value`` as the variable's type (bools: true/True/1/false/...)."""
        if name in self.floats:
            v = float(value)
            self.floats[name] = (
                v,
                float(reset_value) if reset_value is not None else self.floats[name][1],
            )
        elif name in self.bools:
            v = _bool(value)
            self.bools[name] = (
                v,
                _bool(reset_value) if reset_value is not None else self.bools[name][1],
            )
        elif name in self.strings:
            self.strings[name] = (
                value,
                reset_value if reset_value is not None else self.strings[name][1],
            )
        else:
            raise TamisError(f"scheme {self.name}: no variable {name!r}")


def _bool(v) -> bool:
    text = str(v).strip()
    if text in ("1", "true", "True", "Yes", "yes"):
        return True
    if text in ("0", "false", "False", "No", "no"):
        return False
    raise TamisError(f"not a boolean: {v!r}")


def _text(v) -> str:
    return "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)


def _num(v: float) -> str:
    """Floats as RELION writes them (integers without a decimal point)."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))
