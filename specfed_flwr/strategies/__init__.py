"""Flower strategies of specfed-flwr."""

from .specfed import SpecFedResult, SpecFedStrategy

__all__ = ["SpecFedStrategy", "SpecFedResult"]
