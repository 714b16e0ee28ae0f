"""Effects: direct effects, ablations, self-repair and patching."""

from .ablation import Ablation, PairedAblation, ablate, paired_ablation
from .attribution import AttributionPatch, attribution_patch
from .attribution_ablation import AttributionAblation, attribution_ablate
from .direct import DirectEffects, direct_effects
from .interaction import InteractionParts, interaction_parts
from .iterated import IteratedAblation, iterated_ablation
from .mechanisms import LayerRegression, RepairMechanisms, layer_regression, repair_mechanisms
from .neurons import NeuronContributions, neuron_contributions
from .patching import ActivationPatch, activation_patch
from .path import PathPatch, path_patch
from .self_repair import SelfRepair, self_repair
from .text import TextSelfRepair, read_texts, text_self_repair

__all__ = [
    "Ablation",
    "ActivationPatch",
    "AttributionAblation",
    "AttributionPatch",
    "DirectEffects",
    "InteractionParts",
    "IteratedAblation",
    "LayerRegression",
    "NeuronContributions",
    "PairedAblation",
    "PathPatch",
    "RepairMechanisms",
    "SelfRepair",
    "TextSelfRepair",
    "ablate",
    "activation_patch",
    "attribution_ablate",
    "attribution_patch",
    "direct_effects",
    "interaction_parts",
    "iterated_ablation",
    "layer_regression",
    "neuron_contributions",
    "paired_ablation",
    "path_patch",
    "read_texts",
    "repair_mechanisms",
    "self_repair",
    "text_self_repair",
]
