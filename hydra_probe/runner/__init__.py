"""Execution of interventions (fast local path and nnsight path)."""

from .readout import Readout
from .runner import CopyOutput, Runner

__all__ = ["CopyOutput", "Readout", "Runner"]
