"""The triangulation report: orchestration (``triangulate``), figures and rendering.

``triangulate`` runs the public effect and graph functions and holds their
result objects; ``figures`` draws from result frames only; ``render``
writes report.md, report.html, results.json, CSVs, graph exports and
figures. Nothing here computes a measurement.
"""

from .triangulation import VERDICT_RULE, VERDICTS, TriangulationReport, triangulate

__all__ = ["VERDICTS", "VERDICT_RULE", "TriangulationReport", "triangulate"]
