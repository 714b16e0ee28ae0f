"""Saving and loading compensation graphs: GraphML, GEXF and node-link JSON.

Attributes are plain str/int/float/bool (undefined values are absent), so all
three formats round-trip them exactly. GEXF has no place for graph-level
attributes in networkx's writer; :func:`save_graph` stores them as JSON in the
file's ``<meta><description>`` and :func:`load_graph` restores them (plain
``networkx.read_gexf`` returns nodes and edges with their attributes, plus an
``id`` per edge and a ``label`` per node that :func:`load_graph` drops; ``networkx.read_graphml`` adds
empty ``node_default`` / ``edge_default`` graph attributes, dropped too).
Files are written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import networkx as nx

from ..errors import InputError, OptionError, OutputError
from ..io import atomic_write_text

FORMATS = {"graphml": ".graphml", "gexf": ".gexf", "json": ".json"}
_META_TAG = "hydra_probe-graph-attributes:"


def _check_plain(G: nx.DiGraph) -> None:
    def bad(where: str, d: dict) -> None:
        for k, v in d.items():
            if v is None or not isinstance(v, (str, int, float, bool)):
                raise OutputError(f"{where} attribute {k!r} is {type(v).__name__} {v!r}; exports need plain "
                                  "str/int/float/bool values (omit undefined ones).")
            if isinstance(v, float) and v != v:
                raise OutputError(f"{where} attribute {k!r} is NaN; omit undefined values instead (NaN does "
                                  "not round-trip: it never equals itself).")

    bad("graph", G.graph)
    for n, d in G.nodes(data=True):
        bad(f"node {n!r}", d)
    for u, v, d in G.edges(data=True):
        bad(f"edge {u!r}->{v!r}", d)


def _gexf_text(G: nx.DiGraph) -> str:
    text = "\n".join(nx.generate_gexf(G))
    meta = escape(_META_TAG + json.dumps(G.graph, sort_keys=True))
    if "<meta" in text and "</meta>" in text:
        return text.replace("</meta>", f"<description>{meta}</description></meta>", 1)
    return text.replace("<graph ", f"<meta><description>{meta}</description></meta><graph ", 1)


def _json_text(G: nx.DiGraph) -> str:
    return json.dumps(nx.node_link_data(G, edges="edges"), indent=1, allow_nan=False)


def save_graph(G: nx.DiGraph, folder_or_path: str | os.PathLike,
               formats: Sequence[str] = ("graphml", "gexf", "json"), *, name: str = "compensation_graph"
               ) -> dict[str, Path]:
    """Write ``G`` in each of ``formats`` (atomically); returns {format: path}.

    ``folder_or_path``: a folder (files ``{name}.graphml`` etc. go inside; it
    is created) or a file path whose suffix names one format (then
    ``formats`` is ignored).
    """
    _check_plain(G)
    target = Path(folder_or_path)
    by_suffix = {v: k for k, v in FORMATS.items()}
    if target.suffix in by_suffix:
        paths = {by_suffix[target.suffix]: target}
    elif target.suffix and not target.is_dir():
        raise OptionError(f"cannot tell the format of {str(target)!r}; use a folder or a path ending in "
                          f"{', '.join(FORMATS.values())}.")
    else:
        unknown = [f for f in formats if f not in FORMATS]
        if unknown or not formats:
            raise OptionError(f"unknown graph format(s) {unknown or formats!r}; choose from {', '.join(FORMATS)}.")
        paths = {f: target / f"{name}{FORMATS[f]}" for f in formats}
    writers = {"graphml": lambda: "\n".join(nx.generate_graphml(G)), "gexf": lambda: _gexf_text(G),
               "json": lambda: _json_text(G)}
    for fmt, p in paths.items():
        atomic_write_text(p, writers[fmt]())
    return paths


def load_graph(path: str | os.PathLike) -> nx.DiGraph:
    """Read a graph written by :func:`save_graph` (format from the suffix)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"graph file {str(p)!r} does not exist.")
    try:
        if p.suffix == ".graphml":
            G = nx.read_graphml(p)
            for k in ("node_default", "edge_default"):  # added by the reader, empty for our files
                if G.graph.get(k) == {}:
                    del G.graph[k]
        elif p.suffix == ".gexf":
            G = nx.read_gexf(p)
            G.graph.pop("mode", None)
            for k in ("node_default", "edge_default"):
                if G.graph.get(k) == {}:
                    del G.graph[k]
            for n, d in G.nodes(data=True):
                if d.get("label") == n:  # the reader adds each node's id as its label
                    del d["label"]
            for _, _, d in G.edges(data=True):
                d.pop("id", None)
            import xml.etree.ElementTree as ET

            for el in ET.parse(p).getroot().iter():
                if el.tag.endswith("description") and (el.text or "").startswith(_META_TAG):
                    G.graph.update(json.loads(el.text[len(_META_TAG):]))
        elif p.suffix == ".json":
            G = nx.node_link_graph(json.loads(p.read_text(encoding="utf-8")), edges="edges")
        else:
            raise InputError(f"unknown graph file type {p.suffix!r}; expected {', '.join(FORMATS.values())}.")
    except (OSError, ValueError, KeyError, nx.NetworkXError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot read a graph from {p}: {e}") from None
    if not G.is_directed():
        G = nx.DiGraph(G)
    return G
