"""The document model: a report as a list of blocks, rendered by :mod:`.render` to Markdown and HTML."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass
class Doc:
    """A report as blocks: ("h", level, text) | ("p", text) | ("list", items) | ("pre", text)
    | ("table", frame, caption) | ("fig", name, caption).

    Text may hold `code` and **bold** spans; table cells are strings or numbers.
    """

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        """A heading of ``level`` (1 = the title)."""
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        """A paragraph."""
        self.blocks.append(("p", text))

    def items(self, items: list[str]) -> None:
        """A bulleted list."""
        self.blocks.append(("list", items))

    def pre(self, text: str) -> None:
        """Preformatted text."""
        self.blocks.append(("pre", text))

    def table(self, frame: pd.DataFrame, caption: str = "") -> None:
        """A table (its cells already formatted, or numbers formatted by the renderer)."""
        self.blocks.append(("table", frame, caption))

    def fig(self, name: str, caption: str) -> None:
        """A figure ``figures/{name}.png`` (and ``.svg``)."""
        self.blocks.append(("fig", name, caption))


__all__ = ["Doc"]
