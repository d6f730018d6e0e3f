"""Event files and manifests → one long scalar table plus a table of runs.

Scalars come from tbparse in long format (run, split, tag, step, value); each run's
factors come from its `run.json` (or, failing that, its logged hparams), never from
its directory name.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from trainer.manifest import FINISHED

SPLITS = ("train", "validation")
SCALAR_COLUMNS = ["run", "split", "tag", "step", "value"]


class LogsError(Exception):
    """The log folder holds nothing a report can be built from; the message names the fix."""


@dataclass
class Logs:
    logdir: Path
    experiment: dict            # experiment.json ({} when missing)
    runs: pd.DataFrame          # one row per usable run: run, status, spec fields, manifest columns
    scalars: pd.DataFrame       # long: run, split, tag, step, value (usable runs only)
    manifests: dict[str, dict]  # run → run.json
    problems: list[str] = field(default_factory=list)
    points_read: int = 0
    digest: str = ""


def load_logs(logdir: Path) -> Logs:
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise LogsError(f"no log folder {logdir} — run `make train EXPERIMENT={logdir.name}` first")
    experiment = _read_json(logdir / "experiment.json") or {}
    problems: list[str] = []
    scalars = read_scalars(logdir, problems)
    run_dirs = sorted(p for p in logdir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not run_dirs:
        raise LogsError(f"no run folders under {logdir} — run `make train EXPERIMENT={logdir.name}` first")

    damaged = check_event_files(logdir, problems)
    rows, manifests = [], {}
    hparams: dict[str, dict] | None = None  # parsed only if some run lacks run.json
    runs_with_scalars = set(scalars["run"])
    for run_dir in run_dirs:
        run = run_dir.name
        manifest = _read_json(run_dir / "run.json")
        if manifest is None and (run_dir / "run.json").exists():
            problems.append(f"{run}: run.json is not readable JSON")
        spec = (manifest or {}).get("spec")
        if not spec:
            hparams = read_hparams(logdir) if hparams is None else hparams
            spec = hparams.get(run)
        if not spec:
            problems.append(f"{run}: no run.json and no hparams — its factors are unknown, run excluded")
            continue
        status = (manifest or {}).get("status", "unknown")
        if run in damaged:
            continue  # named by check_event_files
        if run not in runs_with_scalars:
            problems.append(f"{run}: no readable scalars in its event files, run excluded")
            continue
        if status not in FINISHED:
            problems.append(f"{run}: status {status!r} (not finished), run excluded")
            continue
        disagreement = _disagreement(scalars[scalars["run"] == run], manifest or {}, status)
        if disagreement:
            problems.append(f"{run}: {disagreement}, run excluded")
            continue
        manifests[run] = manifest or {}
        rows.append({"run": run, "status": status, **{k: _hashable(v) for k, v in spec.items()},
                     "steps": (manifest or {}).get("steps"),
                     "wall_seconds": (manifest or {}).get("wall_seconds")})
    runs = pd.DataFrame(rows)
    if runs.empty:
        raise LogsError(f"no finished run with readable logs under {logdir}:\n  " + "\n  ".join(problems))
    usable = scalars[scalars["run"].isin(runs["run"])].reset_index(drop=True)
    expected = experiment.get("runs") or []
    for run in expected:
        if run not in manifests:
            problems.append(f"{run}: in the grid but missing from the logs")
    return Logs(logdir=logdir, experiment=experiment, runs=runs, scalars=usable,
                manifests=manifests, problems=problems, points_read=len(scalars),
                digest=digest(logdir))


def read_scalars(logdir: Path, problems: list[str]) -> pd.DataFrame:
    """Every scalar point under `logdir` as (run, split, tag, step, value)."""
    from tbparse import SummaryReader

    frames = []
    for events_dir in sorted({p.parent for p in logdir.glob("*/*/events.out.tfevents.*")}):
        split = events_dir.name
        if split not in SPLITS:
            continue
        for path in sorted(events_dir.glob("events.out.tfevents.*")):
            try:
                # TF2 scalars are stored as tensors: tbparse's .tensors, not .scalars.
                df = SummaryReader(str(path)).tensors
            except Exception as exc:  # noqa: BLE001 - a damaged file is reported, not fatal
                problems.append(f"{events_dir.parent.name}/{split}: unreadable event file {path.name} ({exc})")
                continue
            if df.empty:
                continue
            df = df[["step", "tag", "value"]].copy()
            df["run"], df["split"] = events_dir.parent.name, split
            frames.append(df)
    if not frames:
        return pd.DataFrame(columns=SCALAR_COLUMNS)
    out = pd.concat(frames, ignore_index=True)[SCALAR_COLUMNS]
    out["value"] = out["value"].astype(float)
    out["step"] = out["step"].astype(int)
    return out


def check_event_files(logdir: Path, problems: list[str]) -> set[str]:
    """Runs with an event file that is empty, truncated or corrupt, each named in `problems`.

    tbparse (through TensorBoard's loader) stops quietly at a damaged record and returns
    what came before it, which would put a half-logged run in the tables as if it were
    whole; TensorFlow's record reader checks every record's length and CRC instead.
    """
    import tensorflow as tf

    damaged: set[str] = set()
    for path in sorted(logdir.glob("*/*/events.out.tfevents.*")):
        run, split = path.parent.parent.name, path.parent.name
        if run.startswith(".") or split not in SPLITS:
            continue
        records, error = 0, None
        try:
            for _ in tf.compat.v1.io.tf_record_iterator(str(path)):
                records += 1
        except Exception as exc:  # noqa: BLE001 - DataLossError and OS errors alike mean damage
            error = str(exc).split(" failed with ")[0].splitlines()[0]
        if error is None and records == 0:
            error = "empty file"
        if error:
            problems.append(f"{run}: {split} event file {path.name} is damaged ({error}; "
                            f"{records} good records before it), run excluded")
            damaged.add(run)
    return damaged


def _disagreement(scalars: pd.DataFrame, manifest: dict, status: str) -> str | None:
    """Why a finished run's scalars can't be trusted as a whole, or None."""
    dup = scalars.duplicated(["split", "tag", "step"])
    if dup.any():
        first = scalars[dup].iloc[0]
        return f"step {first['step']} of {first['split']}/{first['tag']} is logged {1 + int(dup.sum())} times"
    if status == "complete":
        if not scalars["value"].map(math.isfinite).all():
            return "non-finite values although run.json says complete"
        steps = manifest.get("steps")
        logged = scalars.loc[(scalars["split"] == "train") & (scalars["tag"] == "step_loss"), "step"]
        if isinstance(steps, int) and len(logged) and sorted(logged) != list(range(1, steps + 1)):
            return f"logs hold {len(logged)} step losses, run.json says {steps} steps"
        epochs = manifest.get("epochs_completed")
        for split in SPLITS:
            logged = scalars.loc[(scalars["split"] == split) & (scalars["tag"] == "epoch_loss"), "step"]
            if isinstance(epochs, int) and sorted(logged) != list(range(epochs)):
                return f"{split} logs hold {len(logged)} epochs, run.json says {epochs}"
    return None


def read_hparams(logdir: Path) -> dict[str, dict]:
    from tbparse import SummaryReader

    try:
        df = SummaryReader(str(logdir), extra_columns={"dir_name"}).hparams
    except Exception:  # noqa: BLE001 - hparams are only a fallback for a missing run.json
        return {}
    if df.empty:
        return {}
    return {run: dict(zip(g["tag"], g["value"])) for run, g in df.groupby("dir_name") if run}


def digest(logdir: Path) -> str:
    """SHA-256 over every file's relative path and bytes: names the exact logs a report used."""
    h = hashlib.sha256()
    for path in sorted(p for p in logdir.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(logdir)).encode())
        h.update(b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value
