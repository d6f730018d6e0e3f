"""`python -m report`: TensorBoard logs of one experiment → report.pdf, report.html and CSVs."""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from pathlib import Path

from contract.layout import (
    EXPERIMENT_MANIFEST,
    REPORT_HTML,
    REPORT_PDF,
    REPORT_TABLES,
    TEMPLATES,
    control_characters,
)

FORMATS = ("pdf", "html")
EXIT_USAGE = 2
EXIT_UNFINISHED = 1
DEFAULT_SMOOTHING = 0.6  # TensorBoard's scalar dashboard default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m report", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--logdir", type=Path, default=Path("logs/lab"), help="one experiment's log folder")
    p.add_argument("--out", type=Path, help="output folder (default: reports/<experiment>)")
    p.add_argument("--template", help=f"{' or '.join(TEMPLATES)} (default: the experiment file's)")
    p.add_argument("--format", default="pdf,html", help="comma-separated: pdf, html (default: both)")
    p.add_argument("--summary", default="final", help="table values: final, best or last-K (default: final)")
    p.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                   help=f"TensorBoard EMA weight in [0, 1) for per-step curves (default: {DEFAULT_SMOOTHING}, "
                        "TensorBoard's own; 0 draws them raw)")
    p.add_argument("--author", help="the title block's author (default: the experiment file's)")
    p.add_argument("--student-id", help="the title block's ID (default: the experiment file's)")
    p.add_argument("--date", help="the title block's date (default: the experiment file's, else today)")
    p.add_argument("--target-loss", type=float,
                   help="training loss for the steps-to-target table (default: the highest final "
                        "training loss among the runs)")
    p.add_argument("--cache", type=Path,
                   help="parse cache folder (default: OUT/.cache); only changed event files are reparsed")
    p.add_argument("--no-cache", action="store_true", help="parse every event file again, keep no cache")
    p.add_argument("--final", action="store_true",
                   help="exit with status 1, writing nothing, if any run of the grid is not finished "
                        "(default: write the report marked DRAFT)")
    p.add_argument("--verbose", action="store_true", help="let TensorFlow print its start-up lines")
    p.add_argument("--factors", help="for runs written by others (no run.json, no hparams): a pattern matched "
                                     "against each run folder's name, e.g. \"{initializer}_bs{batch_size}_{batch_norm}\", "
                                     "or a .csv/.toml file mapping run → factors (header run,initializer,batch_size,...)")
    return p.parse_args(argv)


def _check(args) -> list[str]:
    from report.tables import parse_summary

    errors = []
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        errors.append(f"--format {args.format!r} is not valid; valid values: {', '.join(FORMATS)} (comma-separated)")
    if args.template is not None and args.template not in TEMPLATES:
        errors.append(f"--template {args.template!r} is not valid; valid values: {', '.join(TEMPLATES)}")
    try:
        parse_summary(args.summary)
    except ValueError as exc:
        errors.append(str(exc))
    if not 0 <= args.smoothing < 1:
        errors.append(f"--smoothing {args.smoothing} is not valid; give a weight in [0, 1), e.g. 0.6")
    if args.target_loss is not None and not (math.isfinite(args.target_loss) and args.target_loss > 0):
        errors.append(f"--target-loss {args.target_loss} is not valid; give a positive training loss, e.g. 0.5")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        errors.append(f"--out {args.out} is a file, not a folder; name a folder (it is created if missing)")
    for name in ("author", "student_id", "date"):
        value = getattr(args, name)
        if value is not None and control_characters(value):
            errors.append(f"--{name.replace('_', '-')} holds control characters; give plain text")
    if args.factors is not None:
        from report.factors import factors_error

        error = factors_error(args.factors)
        if error:
            errors.append(error)
    args.formats = formats
    return errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    errors = _check(args)
    if errors:
        print("error: " + "\n       ".join(errors), file=sys.stderr)
        return EXIT_USAGE
    if not args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported
    from contract.files import write_atomic
    from report.build import build
    from report.load import LogsError, load_logs
    from report.render import missing_glyphs, render_html, render_pdf

    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    from report.figures import FigureCache

    out = args.out or Path("reports") / args.logdir.name
    # --final writes nothing for an unfinished grid: not even a parse cache in a new --out.
    fresh_final = args.final and args.cache is None and not out.exists()
    cache_dir = None if args.no_cache or fresh_final else (args.cache or out / ".cache")
    figure_cache = FigureCache(cache_dir / "figures" if cache_dir else None)
    try:
        logs = load_logs(args.logdir, cache_dir=cache_dir, verbose=args.verbose, factors=args.factors)
    except LogsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    template = (args.template or (logs.experiment.get("experiment") or {}).get("template") or logs.template_hint
                or TEMPLATES[0])
    if template not in TEMPLATES:
        print(f"error: {args.logdir}/{EXPERIMENT_MANIFEST} names the template {str(template)[:80]!r}, which "
              f"does not exist; valid templates: {', '.join(TEMPLATES)} (choose one with --template, "
              "TEMPLATE= with make)", file=sys.stderr)
        return EXIT_USAGE
    if logs.unfinished:
        shown = ", ".join(f"{run} ({status})" for run, status in list(logs.unfinished.items())[:8])
        more = f" and {len(logs.unfinished) - 8} more" if len(logs.unfinished) > 8 else ""
        print(f"{'error' if args.final else 'draft'}: {len(logs.unfinished)} run(s) of the grid are not finished: "
              f"{shown}{more}", file=sys.stderr)
        if args.final:
            print("error: --final (STRICT=1) wants a finished grid; nothing was written. Finish it with "
                  "`make train` (the same EXPERIMENT and LOGDIR), or drop --final for a DRAFT report",
                  file=sys.stderr)
            return EXIT_UNFINISHED
    context = build(logs, template=template, summary=args.summary, smoothing=args.smoothing,
                    figure_cache=figure_cache, target_loss=args.target_loss,
                    title_block={"author": args.author, "id": args.student_id, "date": args.date})
    if template == "lab":
        empty = [name for name, key in (("author", "author"), ("ID", "id")) if not context[key]]
        if empty:
            print(f"warning: the title block has no {' and no '.join(empty)}; give them with `make report "
                  "AUTHOR=\"…\" STUDENT_ID=…` (or --author/--student-id, or [experiment] author/id in the "
                  "experiment file)", file=sys.stderr)
    csvs = []
    for table in context["tables"]:
        csvs.append(out / REPORT_TABLES / f"table{table.number:02d}_{table.key}.csv")
        write_atomic(csvs[-1], table.frame().to_csv(index=False))
    html = render_html(context)
    written = []
    if "html" in args.formats:
        write_atomic(out / "report.html", html)
        written.append(out / "report.html")
    if "pdf" in args.formats:
        missing = missing_glyphs(html_text(context))
        if missing:
            print(f"warning: no installed font has {len(missing)} character(s) of this report "
                  f"({' '.join(missing[:12])}{' …' if len(missing) > 12 else ''}): the PDF shows them as empty "
                  "boxes. Install fonts that cover them (apt-get install fonts-noto-cjk fonts-noto-color-emoji) "
                  "or read the HTML, which your browser renders with its own fonts", file=sys.stderr)
        pdf, refused = render_pdf(html)
        write_atomic(out / "report.pdf", pdf)
        written.append(out / "report.pdf")
        if refused:
            print(f"note: refused {len(refused)} outside resource(s) named in the report text", file=sys.stderr)
    stale = remove_stale(out, keep=set(csvs) | set(written))
    if stale:
        print(f"note: removed {len(stale)} output(s) of an earlier report that this one does not make: "
              f"{', '.join(p.name for p in stale[:6])}{' …' if len(stale) > 6 else ''}", file=sys.stderr)
    print(f"report: {logs.logdir} → {', '.join(map(str, written))} "
          f"({context['runs_read']} runs, {context['points_read']} points, {context['n_figures']} figures, "
          f"{len(context['tables'])} tables; {len(logs.problems)} data problem(s); "
          f"{logs.cache_hits} of {logs.cache_hits + logs.cache_misses} event files from the parse cache, "
          f"{figure_cache.hits} of {figure_cache.hits + figure_cache.misses} figures from the figure cache)")
    return 0


def remove_stale(out: Path, keep: set[Path]) -> list[Path]:
    """Remove the report outputs in `out` that this run did not write: a report.pdf left by
    an earlier run when only HTML was asked for, CSVs of another template's tables. Only
    names a report writes are touched (report.html, report.pdf, tables/tableNN_*.csv)."""
    candidates = [out / REPORT_HTML, out / REPORT_PDF]
    tables = out / REPORT_TABLES
    if tables.is_dir():
        candidates += [p for p in tables.iterdir() if re.fullmatch(r"table\d{2,}_[A-Za-z0-9._-]+\.csv", p.name)]
    removed = []
    for path in sorted(candidates):
        if path not in keep and path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed


def html_text(context: dict) -> str:
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

