"""Compensation graphs: build from self-repair, verify with paired ablations, export, draw.

Data flow: effects -> graph. Graph code reads effect results and may run
effects (paired and iterated ablation) for verification; effects never
import from here.
"""

from .build import NORM, add_mechanisms, compensation_graph, component_attrs, edge_frame, hydra_slope, node_frame
from .draw import draw_graph, layout
from .export import load_graph, save_graph
from .verify import EdgeVerification, compensators_of, graph_conditions, iterated_from_graph, verify_edges

__all__ = ["NORM", "EdgeVerification", "add_mechanisms", "compensation_graph", "compensators_of", "component_attrs", "draw_graph",
           "edge_frame", "graph_conditions", "hydra_slope", "iterated_from_graph", "layout", "load_graph",
           "node_frame", "save_graph", "verify_edges"]
