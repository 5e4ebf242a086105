"""Particle picking: RELION's LoG picker, template matching and a supervised deep picker."""

from tamis.pick.micrograph import Micrograph, read_micrograph
from tamis.pick.peaks import Picks, find_peaks

__all__ = ["Micrograph", "read_micrograph", "Picks", "find_peaks"]
