"""RELION's Schemes: the scheme.star model (variables, operators, jobs, edges)."""

from tamis.schemes.scheme import Edge, Operator, Scheme, SchemeJob

__all__ = ["Scheme", "Edge", "Operator", "SchemeJob"]
