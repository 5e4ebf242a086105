"""RELION's project layout: the pipeline file (``default_pipeline.star``), job directories."""

from tamis.pipeline.star import Node, Pipeline, Process

__all__ = ["Pipeline", "Process", "Node"]
