"""hydra_probe: self-repair and compensation analysis of transformer language models.

Single ablations are a lower bound on a component's role: downstream
components compensate (the Hydra effect). hydra_probe measures direct and
total effects, decomposes self-repair exactly over downstream components and
the final norm, verifies compensation with paired ablations, and sets
ablation results beside activation, path and attribution patching.
"""

__version__ = "0.1.0"

from . import tasks
from .components import Component, Group
from .effects import (
    Ablation,
    ActivationPatch,
    DirectEffects,
    PairedAblation,
    SelfRepair,
    ablate,
    activation_patch,
    direct_effects,
    paired_ablation,
    self_repair,
)
from .errors import (
    ArchitectureError,
    ComponentError,
    HydraProbeError,
    InputError,
    InterventionError,
    MetricError,
    NumericalError,
    OptionError,
    OutputError,
    ResourceError,
    TaskError,
)
from .metrics import METRICS, Metric
from .models import HookedModel, load_default_model, load_model
from .results import Result, load_result
from .tasks import Task

__all__ = [
    "Ablation",
    "ActivationPatch",
    "ArchitectureError",
    "Component",
    "ComponentError",
    "DirectEffects",
    "Group",
    "HookedModel",
    "HydraProbeError",
    "InputError",
    "InterventionError",
    "METRICS",
    "Metric",
    "MetricError",
    "NumericalError",
    "OptionError",
    "OutputError",
    "PairedAblation",
    "ResourceError",
    "Result",
    "SelfRepair",
    "Task",
    "TaskError",
    "__version__",
    "ablate",
    "activation_patch",
    "direct_effects",
    "load_default_model",
    "load_model",
    "load_result",
    "paired_ablation",
    "self_repair",
    "tasks",
]
