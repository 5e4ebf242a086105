"""2D classification: RELION's regularised-likelihood EM and VDAM as batched tensor algebra."""

from tamis.class2d.em import Class2DResult
from tamis.class2d.job import run_class2d
from tamis.class2d.state import Class2DOptions

__all__ = ["Class2DOptions", "Class2DResult", "run_class2d"]
