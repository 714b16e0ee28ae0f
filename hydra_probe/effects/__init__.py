"""Effects: direct effects, ablations, self-repair and patching."""

from .ablation import Ablation, PairedAblation, ablate, paired_ablation
from .direct import DirectEffects, direct_effects
from .patching import ActivationPatch, activation_patch
from .self_repair import SelfRepair, self_repair

__all__ = ["Ablation", "ActivationPatch", "DirectEffects", "PairedAblation", "SelfRepair", "ablate",
           "activation_patch", "direct_effects", "paired_ablation", "self_repair"]
