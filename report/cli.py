"""`python -m report`: TensorBoard logs of one experiment → report.pdf, report.html (report.tex) and CSVs.

It parses and checks the options, then calls report.api.make_report, which notebooks call too.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from contract.layout import TEMPLATES, control_characters
from report.api import EXIT_USAGE, FORMATS

DEFAULT_SMOOTHING = 0.6  # TensorBoard's scalar dashboard default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m report", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--logdir", type=Path, default=Path("logs/lab"), help="one experiment's log folder")
    p.add_argument("--out", type=Path, help="output folder (default: reports/<experiment>)")
    p.add_argument("--template", help=f"{' or '.join(TEMPLATES)} (default: the experiment file's)")
    p.add_argument("--format", default="pdf,html",
                   help="comma-separated: pdf, html, latex (report.tex with its figures as PDF files; default: pdf,html)")
    p.add_argument("--summary", default="final", help="table values: final, best or last-K (default: final)")
    p.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                   help=f"TensorBoard EMA weight in [0, 1) for per-step curves (default: {DEFAULT_SMOOTHING}, "
                        "TensorBoard's own; 0 draws them raw)")
    p.add_argument("--author", help="the title block's author (default: the experiment file's)")
    p.add_argument("--student-id", help="the title block's ID (default: the experiment file's)")
    p.add_argument("--date", help="the title block's date (default: the experiment file's, else today)")
    p.add_argument("--target-loss", type=float,
                   help="one training loss for the Gradient noise section's steps-to-target and critical-batch "
                        "tables (default: 4 levels from the highest final windowed training loss up to 1.5× it)")
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
    from report.api import ReportError, make_report

    try:
        r = make_report(args.logdir, args.out, template=args.template, formats=args.formats, summary=args.summary,
                        smoothing=args.smoothing, target_loss=args.target_loss, author=args.author,
                        student_id=args.student_id, date=args.date, cache=args.cache, use_cache=not args.no_cache,
                        final=args.final, verbose=args.verbose, factors=args.factors)
    except ReportError as exc:
        print(f"error: {exc}".replace("\n", "\nerror: "), file=sys.stderr)
        return exc.exit_code
    for message in r.messages:
        print(message, file=sys.stderr)
    logs, ctx, cache = r.context["logs"], r.context, r.context["figure_cache"]
    shown = [f for f in r.files if f.suffix in (".pdf", ".html", ".tex") and f.parent == r.out]
    print(f"report: {logs.logdir} → {', '.join(map(str, shown))} "
          f"({ctx['runs_read']} runs, {ctx['points_read']} points, {ctx['n_figures']} figures, "
          f"{len(ctx['tables'])} tables; {len(logs.problems)} data problem(s); "
          f"{logs.cache_hits} of {logs.cache_hits + logs.cache_misses} event files from the parse cache, "
          f"{cache.hits} of {cache.hits + cache.misses} figures from the figure cache)")
    return 0
