"""`python -m trainer.clean` (`make clean`): remove one experiment's logs and report, or
every experiment's with --all, and nothing else.

A folder is removed only when it is what this project made: a log folder holds an
experiment.json and nothing but run folders, event files and locks; a report folder holds
nothing but a report's outputs. Anything else (a LOGDIR of `.`, `/`, the project, a
folder with a file of the user's in it) is refused with the reason, before anything is
deleted. Standard library and `contract` only, so it runs before the venv exists.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from fnmatch import fnmatch
from pathlib import Path

from contract.files import read_json_dict
from contract.layout import EVENT_FILE_GLOB, EXPERIMENT_MANIFEST, LOCK_DIR, REPORT_OUTPUTS, RUN_MANIFEST

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXIT_REFUSED = 2


def _protected(folder: Path) -> str | None:
    """Why `folder` may never be removed, or None."""
    folder = folder.resolve()
    if folder == Path(folder.anchor):
        return "it is the file system's root"
    if folder == PROJECT_ROOT or folder in PROJECT_ROOT.parents:
        return "it is the project folder or one of its parents"
    if folder == Path.home().resolve():
        return "it is your home folder"
    return None


def log_folder_problem(folder: Path) -> str | None:
    """Why `folder` is not an experiment's log folder made by the trainer, or None."""
    manifest = read_json_dict(folder / EXPERIMENT_MANIFEST)
    if manifest is None:
        return f"it has no readable {EXPERIMENT_MANIFEST}, so the trainer did not make it"
    planned = set(manifest.get("runs") or [])
    foreign = []
    for entry in folder.iterdir():
        if entry.name in (EXPERIMENT_MANIFEST, LOCK_DIR) or fnmatch(entry.name, EVENT_FILE_GLOB):
            continue
        is_run = entry.is_dir() and (entry.name in planned or (entry / RUN_MANIFEST).is_file()
                                     or not any(entry.iterdir()))
        if not is_run:
            foreign.append(entry.name)
    if foreign:
        return f"it holds what the trainer does not write: {', '.join(sorted(foreign)[:5])}"
    return None


def report_folder_problem(folder: Path) -> str | None:
    """Why `folder` is not a report folder made by `python -m report`, or None."""
    names = {p.name for p in folder.iterdir()}
    if not names & set(REPORT_OUTPUTS):
        return "it holds no report"
    foreign = sorted(names - set(REPORT_OUTPUTS))
    if foreign:
        return f"it holds what a report does not write: {', '.join(foreign[:5])}"
    return None


def targets(logdir: Path, reports: Path, experiment: str | None) -> tuple[list[Path], list[str], list[Path]]:
    """(folders to remove, every reason to refuse, folders left alone as not ours). Nothing
    is removed when there is any refusal."""
    refusals = [f"{label}={root}: refused, {why}" for label, root in (("LOGDIR", logdir), ("REPORTS", reports))
                if (why := _protected(root))]
    if experiment is not None and (not experiment or Path(experiment).name != experiment or experiment in (".", "..")):
        refusals.append(f"EXPERIMENT={experiment!r}: not an experiment name (no '/' or '..')")
    if refusals:
        return [], refusals, []
    found, skipped = [], []
    for root, check, ours in ((logdir, log_folder_problem, lambda f: (f / EXPERIMENT_MANIFEST).exists()),
                              (reports, report_folder_problem, lambda f: any((f / n).exists() for n in REPORT_OUTPUTS))):
        if not root.is_dir():
            continue
        folders = [root / experiment] if experiment else sorted(p for p in root.iterdir() if p.is_dir())
        for folder in folders:
            if not folder.is_dir():
                continue
            if experiment is None and not ours(folder):
                skipped.append(folder)  # --all: a folder we did not make is not one of ours
                continue
            why = _protected(folder) or check(folder)
            if why:
                refusals.append(f"{folder}: refused, {why}; remove it yourself if you mean to")
            else:
                found.append(folder)
    return found, refusals, skipped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.clean", description=__doc__.split("\n\n")[0])
    p.add_argument("--logdir", type=Path, default=Path("logs"), help="log root (default: logs)")
    p.add_argument("--reports", type=Path, default=Path("reports"), help="report root (default: reports)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="remove this experiment's logs and report")
    which.add_argument("--all", action="store_true", help="remove every experiment's logs and reports")
    args = p.parse_args(argv)
    found, refusals, skipped = targets(args.logdir, args.reports, None if args.all else args.experiment)
    if refusals:
        print("error: nothing was removed:\n  " + "\n  ".join(refusals), file=sys.stderr)
        return EXIT_REFUSED
    if not found:
        what = "experiment" if args.all else f"{args.experiment!r}"
        print(f"clean: nothing to remove (no logs or report of {what} under {args.logdir} or {args.reports})")
        return 0
    for folder in found:
        shutil.rmtree(folder)
        print(f"removed {folder}")
    for folder in skipped:
        print(f"left alone {folder} (not made by the trainer or the report)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
