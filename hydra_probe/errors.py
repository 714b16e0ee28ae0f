"""The package's exception family.

Every error raised on purpose by hydra_probe is a :class:`HydraProbeError`;
its subclasses say which kind of input was wrong. Messages say what was wrong
and how to fix it. ``InputError`` subclasses are the user's to fix (the CLI
exits with code 2 on them).
"""

from __future__ import annotations


class HydraProbeError(Exception):
    """Base class of every error raised on purpose by hydra_probe."""


class InputError(HydraProbeError, ValueError):
    """Bad input from the caller: fix the call and run again."""


class ComponentError(InputError):
    """An unknown, out-of-range or foreign component name or selector."""


class ArchitectureError(InputError):
    """A model whose architecture is not supported (or not a causal LM)."""


class TaskError(InputError):
    """A task that cannot be measured: empty, mismatched lengths, bad answers."""


class MetricError(InputError):
    """An unknown metric, a callable with the wrong output, or an undefined normalisation."""


class OptionError(InputError):
    """An unknown option value (ablation value, scale policy, direction, device...)."""


class OutputError(InputError):
    """An output location that cannot be written safely (e.g. a non-empty folder)."""


class ForeignHookError(InputError):
    """The model carries forward hooks hydra_probe did not register, on modules whose outputs it reads."""


class ConcurrencyError(HydraProbeError, RuntimeError):
    """The model is busy with an analysis in another thread (one model runs one analysis at a time)."""


class NumericalError(HydraProbeError, ArithmeticError):
    """NaN or infinite activations or metrics were produced."""


class InterventionError(HydraProbeError, RuntimeError):
    """An intervention did not touch the model as planned (a hook never fired)."""


class ResourceError(HydraProbeError, MemoryError):
    """A batch did not fit in memory even at the smallest size."""


class RemoteError(HydraProbeError, RuntimeError):
    """A remote server (NDIF) rejected or failed a request, or could not be reached."""


__all__ = [
    "HydraProbeError",
    "InputError",
    "ComponentError",
    "ArchitectureError",
    "TaskError",
    "MetricError",
    "OptionError",
    "OutputError",
    "ForeignHookError",
    "ConcurrencyError",
    "NumericalError",
    "InterventionError",
    "ResourceError",
    "RemoteError",
]
