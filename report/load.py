"""Event files and manifests → one long scalar table plus a table of runs.

Scalars come from tbparse in long format (run, split, tag, step, value); each run's
factors come from its `run.json` (or, failing that, its logged hparams), never from
its directory name.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from report.cache import ParseCache
from trainer.manifest import FINISHED, read_json_dict

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
    cache_hits: int = 0     # event files read from the parse cache
    cache_misses: int = 0   # event files parsed


def load_logs(logdir: Path, *, cache_dir: Path | None = None) -> Logs:
    """Read a grid's logs; `cache_dir` keeps parsed event files between calls."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise LogsError(f"no log folder {logdir} — run `make train EXPERIMENT={logdir.name}` first")
    experiment = _read_json(logdir / "experiment.json") or {}
    problems: list[str] = []
    cache = ParseCache(cache_dir)
    scalars, damaged = read_event_files(logdir, problems, cache)
    run_dirs = sorted(p for p in logdir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not run_dirs:
        raise LogsError(f"no run folders under {logdir} — run `make train EXPERIMENT={logdir.name}` first")

    rows, manifests = [], {}
    hparams: dict[str, dict] | None = None  # parsed only if some run lacks run.json
    by_run = {run: group for run, group in scalars.groupby("run", observed=True, sort=False)}
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
            continue  # named by read_event_files
        if run not in by_run:
            problems.append(f"{run}: no readable scalars in its event files, run excluded")
            continue
        if status not in FINISHED:
            problems.append(f"{run}: status {status!r} (not finished), run excluded")
            continue
        disagreement = _disagreement(by_run[run], manifest or {}, status)
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
                digest=digest(logdir), cache_hits=cache.hits, cache_misses=cache.misses)


def read_event_files(logdir: Path, problems: list[str],
                     cache: ParseCache | None = None) -> tuple[pd.DataFrame, set[str]]:
    """Every scalar point under `logdir` as (run, split, tag, step, value), and the runs
    with an event file that is empty, truncated or corrupt (each named in `problems`).

    Each file is first checked record by record (length and CRC, TensorFlow's reader):
    tbparse, through TensorBoard's loader, stops quietly at a damaged record and returns
    what came before it, which would put a half-logged run in the tables as if whole.
    Then it is read with tbparse in long format. Both results are cached per file.
    """
    cache = cache or ParseCache(None)
    frames, damaged = [], set()
    for path in sorted(logdir.glob("*/*/events.out.tfevents.*")):
        run, split = path.parent.parent.name, path.parent.name
        if run.startswith(".") or split not in SPLITS:
            continue
        relpath = str(path.relative_to(logdir))
        cached = cache.get(path, relpath)
        if cached is None:
            key = cache.key(path, relpath)
            df, header = _parse(path)
            cache.put(path, relpath, df, header, key)
        else:
            df, header = cached
        if header["error"]:
            problems.append(f"{run}: {split} event file {path.name} is damaged ({header['error']}; "
                            f"{header['records']} good records before it), run excluded")
            damaged.add(run)
            continue
        if not df.empty:
            frames.append(df.assign(run=run, split=split))
    cache.prune()
    if not frames:
        return pd.DataFrame(columns=SCALAR_COLUMNS), damaged
    out = pd.concat(frames, ignore_index=True)[SCALAR_COLUMNS]
    out["value"] = out["value"].astype(float)
    out["step"] = out["step"].astype(int)
    # A few distinct names repeated 10^5 times: categoricals compare and group an order of
    # magnitude faster than pandas' string dtype.
    for column in ("run", "split", "tag"):
        out[column] = out[column].astype("category")
    return out, damaged


def _parse(path: Path) -> tuple[pd.DataFrame, dict]:
    """One event file → (step, tag, value) frame and {"records", "error"}."""
    import tensorflow as tf
    from tbparse import SummaryReader
    from tensorflow.python.util import deprecation

    records, error = 0, None
    try:
        with deprecation.silence():  # tf_record_iterator: the one reader that reports damage
            for _ in tf.compat.v1.io.tf_record_iterator(str(path)):
                records += 1
    except Exception as exc:  # noqa: BLE001 - DataLossError and OS errors alike mean damage
        error = str(exc).split(" failed with ")[0].splitlines()[0]
    if error is None and records == 0:
        error = "empty file"
    empty = pd.DataFrame({"step": pd.Series(dtype=int), "tag": pd.Series(dtype=object),
                          "value": pd.Series(dtype=float)})
    if error:
        return empty, {"records": records, "error": error}
    # TF2 scalars are stored as tensors: tbparse's .tensors, not .scalars.
    df = SummaryReader(str(path)).tensors
    df = empty if df.empty else df[["step", "tag", "value"]].astype({"value": float})
    return df, {"records": records, "error": None}


def _disagreement(scalars: pd.DataFrame, manifest: dict, status: str) -> str | None:
    """Why a finished run's scalars can't be trusted as a whole, or None."""
    dup = scalars.duplicated(["split", "tag", "step"])
    if dup.any():
        first = scalars[dup].iloc[0]
        return f"step {first['step']} of {first['split']}/{first['tag']} is logged {1 + int(dup.sum())} times"
    split, tag = scalars["split"].astype(str).to_numpy(), scalars["tag"].astype(str).to_numpy()
    steps_of = scalars["step"].to_numpy()
    if status == "complete":
        if not np.isfinite(scalars["value"].to_numpy()).all():
            return "non-finite values although run.json says complete"
        steps = manifest.get("steps")
        logged = steps_of[(split == "train") & (tag == "step_loss")]
        if isinstance(steps, int) and len(logged) and not _is_range(logged, 1, steps + 1):
            return f"logs hold {len(logged)} step losses, run.json says {steps} steps"
        epochs = manifest.get("epochs_completed")
        for name in SPLITS:
            logged = steps_of[(split == name) & (tag == "epoch_loss")]
            if isinstance(epochs, int) and not _is_range(logged, 0, epochs):
                return f"{name} logs hold {len(logged)} epochs, run.json says {epochs}"
    return None


def _is_range(values: np.ndarray, start: int, stop: int) -> bool:
    return len(values) == stop - start and bool((np.sort(values) == np.arange(start, stop)).all())


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
    return read_json_dict(path)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value
