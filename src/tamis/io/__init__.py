"""RELION-compatible file I/O: STAR, MRC, particle sets, coordinates, cryoSPARC import.

The names below are imported on first use, so that ``import tamis.io.star`` (the pipeline's job
processes) does not pay for torch, which only the particle-set and cryoSPARC modules need.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "coordinate_file_name": "coords",
    "read_coordinate_list": "coords",
    "read_coordinates": "coords",
    "write_coordinate_list": "coords",
    "write_coordinates": "coords",
    "read_cryosparc": "cryosparc",
    "MrcStack": "mrc",
    "open_stack": "mrc",
    "read_mrc": "mrc",
    "write_mrc": "mrc",
    "ParticleBatch": "particles",
    "ParticleSet": "particles",
    "DataStar": "star",
    "format_image_names": "star",
    "parse_image_names": "star",
    "read_data_star": "star",
    "read_star": "star",
    "write_data_star": "star",
    "write_star": "star",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f"tamis.io.{_HOME[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tamis.io' has no attribute {name!r}")
