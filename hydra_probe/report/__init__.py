"""The triangulation report: orchestration, document, renderers, results.json and figures.

- ``triangulation``: ``triangulate`` runs the public effect and graph
  functions and holds their result objects in a ``TriangulationReport``
  (its per-component table and verdicts come from :mod:`hydra_probe.claims`).
- ``document``: the report as a :class:`~.blocks.Doc`, one function per
  section (``SECTIONS``); ``prose``: its sentences; ``tables``: its tables.
- ``render``: Markdown and self-contained HTML (with its CSS).
- ``store``: results.json, written and read back; ``writer``: the folder.
- ``figures``: draws from result frames only.

Nothing here computes a measurement.
"""

from ..claims import VERDICT_RULE, VERDICTS
from .triangulation import TriangulationReport, triangulate

__all__ = ["VERDICTS", "VERDICT_RULE", "TriangulationReport", "triangulate"]
