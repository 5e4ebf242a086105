"""tamis: cryo-EM particle picking, 2D classification and automatic class selection.

RELION-compatible on disk (STAR and MRC files), batched tensor algebra on CPU or GPU.
"""

import os as _os

# Large CPU tensors on transparent huge pages: torch then page-faults 2 MiB at a time instead of
# 4 KiB, which makes each fresh weight tensor of the E-step several times cheaper to fill. Read
# by torch at its first allocation, so it only takes effect when tamis is imported before torch;
# a value set by the user is kept.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

__all__ = ["__version__"]
