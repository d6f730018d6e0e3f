"""Event files and manifests → one long scalar table plus a table of runs.

Scalars come from tbparse in long format (run, split, tag, step, value); each run's
factors come from the `RunSpec` in its `run.json` (or, failing that, its logged hparams),
read back through `contract.spec`, never from its directory name. Folders without a
run.json that the grid does not name are runs written by others (Keras' TensorBoard
callback, tf.summary by hand, SummaryWriter): report.others reads them, their factors
from their hparams or the --factors the user gives.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from contract.files import read_json_dict
from contract.layout import (COMPLETE, EPOCH_LOSS, EVENT_FILE_GLOB, EXPERIMENT_MANIFEST, FINISHED, RUN_MANIFEST,
                             SPLITS, STEP_LOSS, TEMPLATES, TRAIN, is_comparison_tag)
from contract.spec import RunSpec, SpecError
from contract.stderr import quietly
from report.cache import ParseCache
from report.foreign import is_run

# The experiment files that come with the project (read for messages only).
PRESETS_DIR = Path(__file__).resolve().parent.parent / "experiments"
SCALAR_COLUMNS = ["run", "split", "tag", "step", "value"]


class LogsError(Exception):
    """The log folder holds nothing a report can be built from; the message names the fix."""


@dataclass
class Logs:
    logdir: Path
    experiment: dict            # experiment.json ({} when missing)
    runs: pd.DataFrame          # one row per usable run: run, status, spec fields, manifest columns
    specs: dict[str, RunSpec]   # run → its spec (the rows of `runs` are these, flattened)
    scalars: pd.DataFrame       # long: run, split, tag, step, value (usable runs only)
    manifests: dict[str, dict]  # run → run.json
    problems: list[str] = field(default_factory=list)
    # Runs of the grid that have no finished result yet: run → "missing", or its status
    # ("running", "interrupted", "failed"). A report with any is a draft.
    unfinished: dict[str, str] = field(default_factory=dict)
    points_read: int = 0
    digest: str = ""
    cache_hits: int = 0     # event files read from the parse cache
    cache_misses: int = 0   # event files parsed
    # The template the runs' factors suggest, for logs without an experiment.json written
    # by others ("lab" when batch norm or the initializer varies, else "task"); None for ours.
    template_hint: str | None = None


def load_logs(logdir: Path, *, cache_dir: Path | None = None, verbose: bool = False,
              factors: str | None = None) -> Logs:
    """Read a grid's logs; `cache_dir` keeps parsed event files between calls. `verbose`:
    let TensorFlow print its start-up lines when a file needs parsing. `factors`: the
    --factors pattern or file for runs without a run.json or hparams (report.factors)."""
    from report.factors import FactorsError, parse_factors

    logdir = Path(logdir)
    if not logdir.is_dir():
        raise LogsError(f"no log folder {logdir} — {train_hint(logdir)}")
    try:
        factor_source = parse_factors(factors) if factors else None
    except FactorsError as exc:
        raise LogsError(str(exc)) from None
    experiment = read_json_dict(logdir / EXPERIMENT_MANIFEST) or {}
    problems: list[str] = []
    cache = ParseCache(cache_dir)
    run_dirs = sorted(p for p in logdir.iterdir() if p.is_dir() and not p.name.startswith("."))
    # Our trainer's runs: a run.json (written before anything else), or named in the grid.
    planned = set(experiment.get("runs") or [])
    ours = [d for d in run_dirs if (d / RUN_MANIFEST).exists() or d.name in planned]
    others = [d for d in run_dirs if d not in ours]
    if not ours and not experiment and is_run(logdir):
        others = [logdir]  # --logdir names one run written by others
    scalars, damaged = read_event_files(logdir, problems, cache, verbose=verbose, runs={d.name for d in ours})
    if not run_dirs:
        raise LogsError(f"no run folders under {logdir} — {train_hint(logdir)}")

    rows, manifests, specs, unfinished = [], {}, {}, {}
    hparams: dict[str, dict] | None = None  # parsed only if some run lacks run.json
    by_run = {run: group for run, group in scalars.groupby("run", observed=True, sort=False)}
    for run_dir in ours:
        run = run_dir.name
        manifest = read_json_dict(run_dir / RUN_MANIFEST)
        if manifest is None and (run_dir / RUN_MANIFEST).exists():
            problems.append(f"{run}: {RUN_MANIFEST} is not readable JSON")
        stored = (manifest or {}).get("spec")
        try:
            if stored and isinstance(stored, dict):
                spec = RunSpec.from_dict(stored)
            else:
                hparams = read_hparams(logdir) if hparams is None else hparams
                spec = RunSpec.from_hparams(hparams[run]) if hparams.get(run) else None
        except (SpecError, TypeError, ValueError) as exc:
            problems.append(f"{run}: its spec cannot be read ({exc}), run excluded")
            continue
        if spec is None:
            problems.append(f"{run}: no {RUN_MANIFEST} and no hparams — its factors are unknown, run excluded")
            continue
        status = (manifest or {}).get("status", "unknown")
        if status not in FINISHED and manifest is not None:
            unfinished[run] = status
            error = str(manifest.get("error") or "").strip().splitlines()
            why = f": {error[-1][:300]}" if error else ""
            problems.append(f"{run}: status {status!r} (not finished{why}), run excluded")
            continue
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
        manifests[run], specs[run] = manifest or {}, spec
        rows.append({"run": run, "status": status, **spec.row(),
                     "steps": (manifest or {}).get("steps"),
                     "wall_seconds": (manifest or {}).get("wall_seconds")})
    points, template_hint = len(scalars), None
    if others:
        from report.others import read_others

        theirs = read_others(logdir, others, cache, factor_source, problems, taken=set(specs.values()),
                             verbose=verbose)
        for run, (spec, frame, row) in theirs.items():
            manifests[run], specs[run] = ({"steps": row["steps"]} if row["steps"] else {}), spec
            rows.append({"run": run, **row})
        points += theirs.points
        if theirs:
            scalars = _concat(scalars, [frame.assign(run=run) for run, (_, frame, _) in theirs.items()])
    cache.prune()
    runs = pd.DataFrame(rows)
    if runs.empty:
        raise LogsError(f"no finished run with readable logs under {logdir}:\n  " + "\n  ".join(problems))
    if others and len(runs) > len(ours) and not (experiment.get("experiment") or {}).get("template"):
        varies = [f for f in ("batch_norm", "initializer") if runs[f].nunique() > 1]
        template_hint = TEMPLATES[0] if varies else TEMPLATES[1]
    usable = scalars[scalars["run"].isin(runs["run"])].reset_index(drop=True)
    expected = experiment.get("runs") or []
    for run in expected:
        if run not in manifests:
            problems.append(f"{run}: in the grid but missing from the logs")
            if run not in unfinished and not (logdir / run / RUN_MANIFEST).is_file():
                unfinished[run] = "missing"
    return Logs(logdir=logdir, experiment=experiment, runs=runs, specs=specs, scalars=usable,
                manifests=manifests, problems=problems, unfinished=unfinished, points_read=points,
                digest=digest(logdir), cache_hits=cache.hits, cache_misses=cache.misses, template_hint=template_hint)


def train_hint(logdir: Path) -> str:
    """How to make the logs a report of `logdir` needs: `make train` with the experiment
    (the folder's name, when a preset has it) and the log root it lives in."""
    root = logdir.parent
    where = "" if root == Path("logs") else f" LOGDIR={root}"
    presets = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
    if logdir.name in presets:
        return f"run `make train EXPERIMENT={logdir.name}{where}` first"
    return (f"{logdir.name!r} is no preset: train an experiment into {root} with `make train "
            f"EXPERIMENT=<name or path.toml>{where}` (presets: {', '.join(presets)}), then report "
            f"logs/<that experiment>")


def read_event_files(logdir: Path, problems: list[str], cache: ParseCache | None = None, *,
                     verbose: bool = False, runs: set[str] | None = None) -> tuple[pd.DataFrame, set[str]]:
    """Every scalar point under `logdir` as (run, split, tag, step, value), and the runs
    with an event file that is empty, truncated or corrupt (each named in `problems`).

    Each file is first checked record by record (length and CRC, TensorFlow's reader):
    tbparse, through TensorBoard's loader, stops quietly at a damaged record and returns
    what came before it, which would put a half-logged run in the tables as if whole.
    Then it is read with tbparse in long format. Both results are cached per file.
    """
    cache = cache or ParseCache(None)
    frames, damaged, tensorflow_loaded = [], set(), False
    for path in sorted(logdir.glob(f"*/*/{EVENT_FILE_GLOB}")):
        run, split = path.parent.parent.name, path.parent.name
        if run.startswith(".") or split not in SPLITS or (runs is not None and run not in runs):
            continue  # runs written by others are read by report.others
        relpath = str(path.relative_to(logdir))
        cached = cache.get(path, relpath)
        if cached is None:
            key = cache.key(path, relpath)
            if not tensorflow_loaded:  # at the first file to parse: TensorFlow's start-up lines dropped
                quietly(lambda: __import__("tbparse"), verbose=verbose)
                tensorflow_loaded = True
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
    if not frames:
        return pd.DataFrame(columns=SCALAR_COLUMNS), damaged
    return _concat(None, frames), damaged


def _concat(first: pd.DataFrame | None, frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Frames of (run, split, tag, step, value) as one, with the dtypes the report uses."""
    if first is not None and len(first):
        frames = [first.astype({c: object for c in ("run", "split", "tag")}), *frames]
    out = pd.concat(frames, ignore_index=True)[SCALAR_COLUMNS]
    out["value"] = out["value"].astype(float)
    out["step"] = out["step"].astype(int)
    # A few distinct names repeated 10^5 times: categoricals compare and group an order of
    # magnitude faster than pandas' string dtype.
    for column in ("run", "split", "tag"):
        out[column] = out[column].astype("category")
    return out


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
    if not df.empty and df["value"].dtype == object:  # text and graph tensors (Keras' model config): no scalars
        df = df[df["value"].map(lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool))]
    if not df.empty:  # TensorBoard's copies of the epoch metrics for its Custom Scalars charts
        df = df[~df["tag"].map(is_comparison_tag)]
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
    if status == COMPLETE:
        if not np.isfinite(scalars["value"].to_numpy()).all():
            return "non-finite values although run.json says complete"
        steps = manifest.get("steps")
        logged = steps_of[(split == TRAIN) & (tag == STEP_LOSS)]
        if isinstance(steps, int) and len(logged) and not _is_range(logged, 1, steps + 1):
            return f"logs hold {len(logged)} step losses, {RUN_MANIFEST} says {steps} steps"
        epochs = manifest.get("epochs_completed")
        for name in SPLITS:
            logged = steps_of[(split == name) & (tag == EPOCH_LOSS)]
            if isinstance(epochs, int) and not _is_range(logged, 0, epochs):
                return f"{name} logs hold {len(logged)} epochs, {RUN_MANIFEST} says {epochs}"
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

