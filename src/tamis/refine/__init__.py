"""The 3D engine: projection, back-projection, symmetry and reconstruction of volumes
(:mod:`tamis.refine.fourier3d`); the refinement jobs build on it."""
