"""``tamis web``: a live local monitor for a RELION/tamis project (pipeline, micrographs, 2D
classes with a correctable selection, 3D map), reading only the project's files."""
