"""RELION-compatible file I/O: STAR, MRC, particle sets, coordinates, cryoSPARC import."""

from tamis.io.coords import (
    coordinate_file_name,
    read_coordinate_list,
    read_coordinates,
    write_coordinate_list,
    write_coordinates,
)
from tamis.io.cryosparc import read_cryosparc
from tamis.io.mrc import MrcStack, open_stack, read_mrc, write_mrc
from tamis.io.particles import ParticleBatch, ParticleSet
from tamis.io.star import (
    DataStar,
    format_image_names,
    parse_image_names,
    read_data_star,
    read_star,
    write_data_star,
    write_star,
)

__all__ = [
    "DataStar",
    "MrcStack",
    "ParticleBatch",
    "ParticleSet",
    "coordinate_file_name",
    "format_image_names",
    "open_stack",
    "parse_image_names",
    "read_coordinate_list",
    "read_coordinates",
    "read_cryosparc",
    "read_data_star",
    "read_mrc",
    "read_star",
    "write_coordinate_list",
    "write_coordinates",
    "write_data_star",
    "write_mrc",
    "write_star",
]
