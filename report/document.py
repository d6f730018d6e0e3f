"""The report as a numbered document: sections, and figures and tables numbered in the
order they are added, so the HTML and the PDF (rendered from the same HTML) carry the
same numbers."""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from report.tables import Table

REF = re.compile(r"⟦(\d+)⟧")


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

    @staticmethod
    def ref(table: Table) -> str:
        """'Table N' in text written before the document is finished: a section filled
        late (Findings) adds its own tables after the ones it names, so numbers are only
        final in `finish()`, which rewrites these marks."""
        return f"Table ⟦{table.number}⟧"

    def finish(self) -> None:
        """Number tables in reading order and resolve the marks `ref` left in the text."""
        order = [b["table"] for sec in self.sections for block in sec.blocks
                 for b in (block["blocks"] if block["kind"] == "row" else [block]) if b["kind"] == "table"]
        final = {t.number: i + 1 for i, t in enumerate(order)}
        for t in order:
            t.number = final[t.number]
        self.tables = order

        def fix(text):
            return REF.sub(lambda m: str(final[int(m.group(1))]), text) if isinstance(text, str) else text

        for sec in self.sections:
            for block in sec.blocks:
                for b in (block["blocks"] if block["kind"] == "row" else [block]):
                    for k in ("text", "caption"):
                        if k in b:
                            b[k] = fix(b[k])
                    if "items" in b:
                        b["items"] = [fix(i) for i in b["items"]]
                    if b["kind"] == "table":
                        b["table"].rows = [[fix(v) for v in row] for row in b["table"].rows]
                        b["table"].caption = fix(b["table"].caption)
                        b["table"].data = [{k: fix(v) for k, v in d.items()} for d in b["table"].data]

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
