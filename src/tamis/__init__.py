"""tamis: cryo-EM particle picking, 2D classification and automatic class selection.

RELION-compatible on disk (STAR and MRC files), batched tensor algebra on CPU or GPU.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
