"""The report as a numbered document: sections, and figures and tables numbered in the
order they are added, so the HTML and the PDF (rendered from the same HTML) carry the
same numbers."""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

from report.tables import Table


@dataclass
class Section:
    number: str
    title: str
    level: int = 1
    blocks: list[dict] = field(default_factory=list)


class Document:
    """Collects sections and numbers figures and tables as they are added."""

    def __init__(self, smoothing: float):
        self.sections: list[Section] = []
        self.tables: list[Table] = []
        self.figures = 0
        self.smoothing = smoothing
        self._counters = [0, 0, 0]

    def section(self, title: str, level: int = 1) -> Section:
        self._counters[level - 1] += 1
        for i in range(level, 3):
            self._counters[i] = 0
        number = ".".join(str(n) for n in self._counters[:level])
        sec = Section(number, title, level)
        self.sections.append(sec)
        return sec

    def figure(self, sec: Section, caption: str, svg: str, *, smoothed: bool = False) -> None:
        self.figures += 1
        if smoothed and self.smoothing:
            caption += f" (smoothed: TensorBoard EMA, weight {self.smoothing:g}; faint line raw)"
        uri = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
        sec.blocks.append({"kind": "figure", "number": self.figures, "caption": caption, "src": uri})

    def table(self, sec: Section, table: Table) -> None:
        table.number = len(self.tables) + 1
        self.tables.append(table)
        sec.blocks.append({"kind": "table", "table": table})

    def side_by_side(self, sec: Section, count: int = 2) -> None:
        """Lay the section's last `count` blocks (a figure and its table, say) out in one row;
        their numbers stay as they were given."""
        blocks = sec.blocks[-count:]
        del sec.blocks[-count:]
        sec.blocks.append({"kind": "row", "blocks": blocks})

    def text(self, sec: Section, text: str) -> None:
        sec.blocks.append({"kind": "paragraph", "text": text})

    def bullets(self, sec: Section, items: list[str | None]) -> None:
        items = [i for i in items if i]
        if items:
            sec.blocks.append({"kind": "bullets", "items": items})
