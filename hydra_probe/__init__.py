"""hydra_probe: self-repair and compensation analysis of transformer language models.

Single ablations are a lower bound on a component's role: downstream
components compensate (the Hydra effect). hydra_probe measures direct and
total effects, decomposes self-repair exactly over downstream components and
the final norm, verifies compensation with paired ablations, and sets
ablation results beside activation, path and attribution patching.
"""

from . import graph, tasks
from ._version import __version__
from .claims.conditions import ConditionComparison, compare_conditions, compare_tasks
from .components import Component, Group
from .effects import (  # the mechanisms of self-repair
    Ablation,
    ActivationPatch,
    AttributionPatch,
    DirectEffects,
    InteractionParts,
    IteratedAblation,
    LayerRegression,
    NeuronContributions,
    PairedAblation,
    PathPatch,
    RepairMechanisms,
    SelfRepair,
    TextSelfRepair,
    ablate,
    activation_patch,
    attribution_patch,
    direct_effects,
    interaction_parts,
    iterated_ablation,
    layer_regression,
    neuron_contributions,
    paired_ablation,
    path_patch,
    read_texts,
    repair_mechanisms,
    self_repair,
    text_self_repair,
)
from .errors import (
    ArchitectureError,
    ComponentError,
    ConcurrencyError,
    ForeignHookError,
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
    "ConditionComparison",
    "ComponentError",
    "ConcurrencyError",
    "DirectEffects",
    "EdgeVerification",
    "ForeignHookError",
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
    "TextSelfRepair",
    "TriangulationReport",
    "__version__",
    "ablate",
    "activation_patch",
    "attribution_patch",
    "compensation_graph",
    "compare_conditions",
    "compare_tasks",
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
    "read_texts",
    "save_graph",
    "self_repair",
    "tasks",
    "text_self_repair",
    # the mechanisms of self-repair
    "LayerRegression",
    "NeuronContributions",
    "RepairMechanisms",
    "layer_regression",
    "neuron_contributions",
    "repair_mechanisms",
    "triangulate",
    "verify_edges",
]
