"""hydra_probe: self-repair and compensation analysis of transformer language models.

Single ablations are a lower bound on a component's role: downstream
components compensate (the Hydra effect). hydra_probe measures direct and
total effects, decomposes self-repair exactly over downstream components and
the final norm, verifies compensation with paired ablations, and sets
ablation results beside activation, path and attribution patching.
"""

from . import graph, tasks
from ._version import __version__
from .components import Component, Group
from .effects import (
    Ablation,
    ActivationPatch,
    AttributionPatch,
    DirectEffects,
    InteractionParts,
    IteratedAblation,
    PairedAblation,
    PathPatch,
    SelfRepair,
    ablate,
    activation_patch,
    attribution_patch,
    direct_effects,
    interaction_parts,
    iterated_ablation,
    paired_ablation,
    path_patch,
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
    RemoteError,
    ResourceError,
    TaskError,
)
from .graph import (
    EdgeVerification,
    compensation_graph,
    compensators_of,
    draw_graph,
    hydra_slope,
    load_graph,
    save_graph,
    verify_edges,
)
from .metrics import METRICS, Metric
from .models import HookedModel, load_default_model, load_model
from .report import TriangulationReport, triangulate
from .results import Result, load_result
from .tasks import Task

__all__ = [
    "Ablation",
    "ActivationPatch",
    "AttributionPatch",
    "ArchitectureError",
    "Component",
    "ComponentError",
    "DirectEffects",
    "EdgeVerification",
    "Group",
    "HookedModel",
    "HydraProbeError",
    "InputError",
    "InteractionParts",
    "InterventionError",
    "IteratedAblation",
    "METRICS",
    "Metric",
    "MetricError",
    "NumericalError",
    "OptionError",
    "OutputError",
    "PairedAblation",
    "RemoteError",
    "ResourceError",
    "Result",
    "PathPatch",
    "SelfRepair",
    "Task",
    "TaskError",
    "TriangulationReport",
    "__version__",
    "ablate",
    "activation_patch",
    "attribution_patch",
    "compensation_graph",
    "compensators_of",
    "direct_effects",
    "draw_graph",
    "graph",
    "hydra_slope",
    "interaction_parts",
    "iterated_ablation",
    "load_default_model",
    "load_graph",
    "load_model",
    "load_result",
    "paired_ablation",
    "path_patch",
    "save_graph",
    "self_repair",
    "tasks",
    "triangulate",
    "verify_edges",
]
