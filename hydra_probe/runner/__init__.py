"""Execution of interventions (fast local path and nnsight path)."""

from .readout import Readout
from .runner import Runner, RunOutput

__all__ = ["RunOutput", "Readout", "Runner"]
