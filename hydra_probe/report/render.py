"""Renderers of the document model (:class:`~.blocks.Doc`): Markdown and self-contained HTML.

Markdown links figures from ``figures/``; HTML embeds them as ``data:`` URIs,
with inline CSS, no scripts and no external resources.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from ..formatting import fmt
from .blocks import Doc


def _md_cell(x: Any) -> str:
    return (x if isinstance(x, str) else fmt(x)).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Doc) -> str:
    """The document as Markdown (figures linked as ``figures/{name}.png``, with an SVG link)."""
    out: list[str] = []
    for b in doc.blocks:
        k = b[0]
        if k == "h":
            out.append("#" * b[1] + " " + b[2])
        elif k == "p":
            out.append(b[1])
        elif k == "list":
            out.append("\n".join(f"- {it}" for it in b[1]))
        elif k == "pre":
            out.append("```\n" + b[1].rstrip("\n") + "\n```")
        elif k == "table":
            f, cap = b[1], b[2]
            lines = ["| " + " | ".join(map(_md_cell, f.columns)) + " |",
                     "|" + "|".join("---" for _ in f.columns) + "|"]
            lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in f.itertuples(index=False)]
            out.append((f"*{cap}*\n\n" if cap else "") + "\n".join(lines))
        elif k == "fig":
            out.append(f"![{b[2]}](figures/{b[1]}.png)\n\n*{b[2]}* ([SVG](figures/{b[1]}.svg))")
    return "\n\n".join(out) + "\n"


# ============================================================================ html
CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45;background:#fff}
h1{font-size:1.6em;border-bottom:2px solid #0072B2;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;
border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.8em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;vertical-align:top}
td{white-space:nowrap}td.text{white-space:normal;text-align:left;min-width:8em}
th{background:#f3f6f9}td:first-child,th:first-child{text-align:left}tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption,.caption{font-size:.85em;color:#555}pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.8em}
code{background:#f6f8fa;padding:0 .2em}
"""


def _inline(text: str) -> str:
    """Escape, then render `code` and **bold** spans."""
    s = html.escape(text)
    parts = s.split("`")
    s = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = s.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


_NUMBER = re.compile(r"^[-+]?(\d|\.\d)")


def to_html(doc: Doc, figures: dict[str, Path], title: str) -> str:
    """The document as one self-contained HTML page: inline :data:`CSS`, figures ({name: png path}) embedded as
    ``data:`` URIs (figures not drawn are left out), no scripts, no external resources."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"]
    for b in doc.blocks:
        k = b[0]
        if k == "h":
            out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
        elif k == "p":
            out.append(f"<p>{_inline(b[1])}</p>")
        elif k == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(it)}</li>" for it in b[1]) + "</ul>")
        elif k == "pre":
            out.append(f"<pre>{html.escape(b[1])}</pre>")
        elif k == "table":
            f, cap = b[1], b[2]
            rows = ["<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in f.columns) + "</tr>"]
            def td(v: Any) -> str:
                if isinstance(v, str):
                    wrap = not _NUMBER.match(v) and (" " in v or len(v) > 24)  # prose wraps, numbers do not
                    cls = ' class="text"' if wrap else ""
                    return f"<td{cls}>{html.escape(v)}</td>"
                return f"<td>{html.escape(fmt(v))}</td>"

            rows += ["<tr>" + "".join(td(v) for v in r) + "</tr>" for r in f.itertuples(index=False)]
            out.append((f'<p class="caption">{_inline(cap)}</p>' if cap else "") + "<table>" + "".join(rows)
                       + "</table>")
        elif k == "fig":
            p = figures.get(b[1])
            if p is None:
                continue
            data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{_inline(b[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"



__all__ = ["CSS", "to_html", "to_markdown"]
