"""The report as one call, for notebooks and for `python -m report` alike.

    from report import make_report
    r = make_report("logs/lab", author="Ana Lima", student_id="S-42")
    r.files                      # [reports/lab/report.html, reports/lab/report.pdf, ...]
    r.tables["table03_train_loss_glorot_normal_bs64"]   # a pandas DataFrame, as its CSV
    r.findings                   # the Findings section's sentences

Errors a user can fix raise ReportError (its message names the fix; `exit_code` is what
the command line exits with). Warnings and notes are returned in `messages`, not printed.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from contract.files import write_atomic
from contract.layout import (
    EXPERIMENT_MANIFEST,
    REPORT_HTML,
    REPORT_PDF,
    REPORT_TABLES,
    TEMPLATES,
)

FORMATS = ("pdf", "html", "latex")
EXIT_USAGE, EXIT_UNFINISHED = 2, 1


class ReportError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Report:
    out: Path
    files: list[Path]                     # every file written, in order
    tables: dict[str, pd.DataFrame]       # CSV stem → its table
    context: dict                         # what the templates rendered
    messages: list[str] = field(default_factory=list)   # "warning: …", "note: …", "draft: …"
    removed: list[Path] = field(default_factory=list)   # outputs of an earlier report, removed

    @property
    def findings(self) -> list[str]:
        for sec in self.context["sections"]:
            if sec.title == "Findings":
                return [t for b in sec.blocks for t in ([b["text"]] if "text" in b else b.get("items", []))]
        return []


def make_report(logdir, out=None, *, template: str | None = None, formats=("pdf", "html"),
                summary: str = "final", smoothing: float = 0.6, target_loss: float | None = None,
                author: str | None = None, student_id: str | None = None, date: str | None = None,
                cache: Path | None = None, use_cache: bool = True, final: bool = False,
                verbose: bool = False, **load_options) -> Report:
    """Read `logdir`, write the report into `out` (default reports/<logdir name>), return
    what was written. `load_options` go to report.load.load_logs."""
    from report.build import build
    from report.figures import FigureCache
    from report.load import LogsError, load_logs
    from report.render import missing_glyphs, render_html, render_pdf

    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    logdir = Path(logdir)
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ReportError(f"format {', '.join(bad) or '(none)'} is not valid; valid values: {', '.join(FORMATS)}")
    out = Path(out) if out is not None else Path("reports") / logdir.name
    messages: list[str] = []
    # A final report of an unfinished grid writes nothing: not even a parse cache in a new `out`.
    fresh_final = final and cache is None and not out.exists()
    cache_dir = None if not use_cache or fresh_final else (Path(cache) if cache else out / ".cache")
    figure_cache = FigureCache(cache_dir / "figures" if cache_dir else None)
    try:
        logs = load_logs(logdir, cache_dir=cache_dir, verbose=verbose, **load_options)
    except LogsError as exc:
        raise ReportError(str(exc)) from None
    template = (template or (logs.experiment.get("experiment") or {}).get("template")
                or getattr(logs, "template_hint", None) or TEMPLATES[0])
    if template not in TEMPLATES:
        raise ReportError(f"{logdir}/{EXPERIMENT_MANIFEST} names the template {str(template)[:80]!r}, which does not "
                          f"exist; valid templates: {', '.join(TEMPLATES)} (choose one with --template, TEMPLATE= "
                          "with make)")
    if logs.unfinished:
        shown = ", ".join(f"{run} ({status})" for run, status in list(logs.unfinished.items())[:8])
        more = f" and {len(logs.unfinished) - 8} more" if len(logs.unfinished) > 8 else ""
        line = f"{len(logs.unfinished)} run(s) of the grid are not finished: {shown}{more}"
        if final:
            raise ReportError(f"{line}\n--final (STRICT=1) wants a finished grid; nothing was written. Finish it "
                              "with `make train` (the same EXPERIMENT and LOGDIR), or drop --final for a DRAFT "
                              "report", EXIT_UNFINISHED)
        messages.append(f"draft: {line}")
    context = build(logs, template=template, summary=summary, smoothing=smoothing, figure_cache=figure_cache,
                    target_loss=target_loss, title_block={"author": author, "id": student_id, "date": date})
    context["logs"] = logs
    if template == "lab":
        empty = [name for name, key in (("author", "author"), ("ID", "id")) if not context[key]]
        if empty:
            messages.append(f"warning: the title block has no {' and no '.join(empty)}; give them with `make report "
                            "AUTHOR=\"…\" STUDENT_ID=…` (or --author/--student-id, or [experiment] author/id in "
                            "the experiment file)")
    written, tables = [], {}
    for table in context["tables"]:
        stem = f"table{table.number:02d}_{table.key}"
        tables[stem] = table.frame()
        written.append(out / REPORT_TABLES / f"{stem}.csv")
        write_atomic(written[-1], tables[stem].to_csv(index=False))
    html = render_html(context)
    if "html" in formats:
        write_atomic(out / REPORT_HTML, html)
        written.append(out / REPORT_HTML)
    if "pdf" in formats:
        missing = missing_glyphs(text_of(context))
        if missing:
            messages.append(
                f"warning: no installed font has {len(missing)} character(s) of this report "
                f"({' '.join(missing[:12])}{' …' if len(missing) > 12 else ''}): the PDF shows them as empty boxes. "
                "Install fonts that cover them (apt-get install fonts-noto-cjk fonts-noto-color-emoji) or read "
                "the HTML, which your browser renders with its own fonts")
        pdf, refused = render_pdf(html)
        write_atomic(out / REPORT_PDF, pdf)
        written.append(out / REPORT_PDF)
        if refused:
            messages.append(f"note: refused {len(refused)} outside resource(s) named in the report text")
    if "latex" in formats:
        from report.latex import render_latex

        written += render_latex(context, out)
    removed = remove_stale(out, keep=set(written))
    if removed:
        messages.append(f"note: removed {len(removed)} output(s) of an earlier report that this one does not make: "
                        f"{', '.join(p.name for p in removed[:6])}{' …' if len(removed) > 6 else ''}")
    context["figure_cache"] = figure_cache
    return Report(out=out, files=written, tables=tables, context=context, messages=messages, removed=removed)


def remove_stale(out: Path, keep: set[Path]) -> list[Path]:
    """Remove the report outputs in `out` that this run did not write: a report.pdf left by
    an earlier run when only HTML was asked for, CSVs of another template's tables, LaTeX
    output not asked for again. Only names a report writes are touched."""
    from report.latex import FIGURES, TEX_NAME

    candidates = [out / REPORT_HTML, out / REPORT_PDF, out / TEX_NAME]
    for folder, pattern in ((out / REPORT_TABLES, r"table\d{2,}_[A-Za-z0-9._-]+\.csv"),
                            (out / FIGURES, r"figure\d{2,}\.pdf")):
        if folder.is_dir():
            candidates += [p for p in folder.iterdir() if re.fullmatch(pattern, p.name)]
    removed = []
    for path in sorted(candidates):
        if path not in keep and path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed


def text_of(context: dict) -> str:
    """The words of a report (title block, sections, captions, tables), for the font check."""
    parts = [str(context.get(k, "")) for k in ("title", "author", "id", "date", "draft")]
    for section in context["sections"]:
        parts.append(section.title)
        blocks = [b for block in section.blocks for b in (block["blocks"] if block["kind"] == "row" else [block])]
        for block in blocks:
            parts += [str(block.get(k, "")) for k in ("text", "caption")] + list(block.get("items", []))
            if block.get("table") is not None:
                t = block["table"]
                parts += [t.caption, *t.columns, *(v for row in t.rows for v in row)]
    return "\n".join(parts)
