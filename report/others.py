"""Runs written by others, placed as our trainer's runs are: a `RunSpec` per run (from its
hparams, else `--factors`), its scalars in our tags (report.foreign) and a status.

Such logs record no status: a run whose event files hold per-epoch scalars is taken as
complete (diverged where one of its values is not finite), and says so in the problems.
Fields no source gives keep the `RunSpec` defaults, except `epochs` (the epochs logged).
Runs that share every factor and give no seed are numbered as seeds 0, 1, ... in name
order, so the report treats them as repeats; the problems say so.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from contract.layout import COMPLETE, DIVERGED, EPOCH_LOSS, RUN_MANIFEST, TRAIN, VALIDATION
from contract.spec import RunSpec, SpecError
from contract.stderr import quietly
from report import foreign
from report.cache import ParseCache
from report.factors import FactorSource, field_name, place

SHOWN = 6  # names listed in one problem line before "and N more"


class Placed(dict):
    """run → (spec, scalars frame of split/tag/step/value, row fields); `points` read."""
    points: int = 0


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def read_others(logdir: Path, folders: list[Path], cache: ParseCache, source: FactorSource | None,
                problems: list[str], *, taken: set[RunSpec], verbose: bool = False) -> Placed:
    notes: list[str] = []
    found = foreign.discover(logdir, folders, notes)
    problems += notes
    start = len(problems)
    placed, loaded, extra, unused, by_source = Placed(), [False], {}, {}, {"hparams": 0, "--factors": 0}
    candidates = []
    for run in found:
        frames, hparams = _read_files(logdir, run, cache, problems, loaded, verbose)
        if frames is None:
            continue
        read = foreign.to_our_tags(frames)
        read.steps = read.steps or foreign.keras_steps(frames)
        placed.points += len(read.scalars)
        why = _unusable(read)
        if why:
            problems.append(f"{run.name}: {why}, run excluded")
            continue
        fields, other, why = place(run.name, hparams, source)
        if fields is None:
            problems.append(f"{run.name}: {why}")
            continue
        by_source["hparams" if any(map(field_name, hparams)) else "--factors"] += 1
        for name in read.unused:
            unused.setdefault(name.split(" (same as")[0], []).append(run.name)
        for note in read.notes:
            problems.append(f"{run.name}: {note}")
        candidates.append((run.name, fields, read))
        extra[run.name] = other
    if source is not None and source.table is not None:
        stray = sorted(set(source.table) - source.used)
        if stray:
            problems.append(f"--factors {Path(source.text).name}: no run folder for {_listed(stray)}")
    _fill_epochs(candidates, problems)
    for name, spec, read in _specs(candidates, taken, problems):
        status = COMPLETE if np.isfinite(read.scalars["value"].to_numpy()).all() else DIVERGED
        placed[name] = (spec, read.scalars, {"status": status, **spec.row(), "steps": read.steps,
                                             "wall_seconds": None})
        for split in (TRAIN, VALIDATION):
            if not ((read.scalars["split"] == split) & (read.scalars["tag"] == EPOCH_LOSS)).any():
                problems.append(f"{name}: no per-epoch {split} loss in its logs; its {split} loss cells show —")
    if placed:
        problems.insert(start, _summary(placed, by_source))
        _varying_hparams(extra, placed, problems)
        if unused:
            problems.append("tags of runs written by others that the report does not use: " + "; ".join(
                f"{tag} ({len(runs)} run{'s' if len(runs) > 1 else ''})" for tag, runs in sorted(unused.items())))
    return placed


def _read_files(logdir: Path, run: foreign.Found, cache: ParseCache, problems: list[str], loaded: list[bool],
                verbose: bool) -> tuple[list | None, dict]:
    """(per folder split: frame of step/tag/value, hparams), or (None, {}) if a file is damaged."""
    frames, hparams = [], {}
    files = run.files + [(p, None) for p in run.hparams_files]
    for path, split in files:
        rel = path.relative_to(logdir) if path.is_relative_to(logdir) else Path(run.name) / path.name
        relpath = f"foreign:{rel.as_posix()}"
        cached = cache.get(path, relpath)
        if cached is None:
            key = cache.key(path, relpath)
            if not loaded[0]:  # at the first file to parse: TensorFlow's start-up lines dropped
                quietly(lambda: __import__("tensorflow"), verbose=verbose)
                loaded[0] = True
            df, header = foreign.read_file(path)
            cache.put(path, relpath, df, header, key)
        else:
            df, header = cached
        where = "root" if split is None else split
        if header["error"]:
            problems.append(f"{run.name}: {where} event file {path.name} is damaged ({header['error']}; "
                            f"{header['records']} good records before it), run excluded")
            return None, {}
        hparams.update(header.get("hparams") or {})
        if len(df) and path not in run.hparams_files:
            frames.append((split, df))
    return frames, hparams


def _unusable(read: foreign.Read) -> str:
    if read.epochs == 0:
        keras = f" ({foreign.KERAS_EPOCHS_DROPPED})" if read.has_batch_tags else ""
        return ("no per-epoch loss or accuracy in its event files, which the tables need: Keras' TensorBoard "
                "callback writes epoch_loss and epoch_accuracy; by hand, log e.g. loss/train and loss/validation "
                f"once an epoch{keras}")
    dup = read.scalars.duplicated(["split", "tag", "step"])
    if dup.any():
        first = read.scalars[dup].iloc[0]
        return (f"step {first['step']} of {first['split']}/{first['tag']} is logged "
                f"{1 + int(dup.sum())} times (two trainings in one folder? give each its own run folder)")
    return ""


def _fill_epochs(candidates: list, problems: list[str]) -> None:
    """`epochs` as logged when no source gives it: the longest run's count for all (runs
    with fewer, say stopped early, are named)."""
    free = [(name, fields, read) for name, fields, read in candidates if "epochs" not in fields]
    if not free:
        return
    most = max(read.epochs for _, _, read in free)
    short = [f"{name} ({read.epochs})" for name, _, read in free if read.epochs < most]
    for _, fields, _ in free:
        fields["epochs"] = most
    if short:
        problems.append(f"runs written by others logged up to {most} epochs; fewer in {_listed(short)} (stopped "
                        f"early?); all are taken as planned for {most} epochs")


def _specs(candidates: list, taken: set[RunSpec], problems: list[str]):
    """(name, RunSpec, read) per run; a spec another run has already gets the next free
    seed when the run gives none, and is excluded when it does."""
    used = set(taken)
    numbered: dict[str, list[str]] = {}
    for name, fields, read in sorted(candidates, key=lambda c: c[0]):
        try:
            spec = RunSpec.from_dict(fields)
        except (SpecError, TypeError, ValueError) as exc:
            problems.append(f"{name}: its factors do not make a run spec ({exc}), run excluded")
            continue
        if spec in used:
            if "seed" in fields:
                problems.append(f"{name}: the same factors and seed as another run (the same run logged twice?), "
                                "run excluded")
                continue
            while spec in used:
                spec = dataclasses.replace(spec, seed=spec.seed + 1)
            numbered.setdefault(_without_seed(spec), []).append(f"{name} (seed {spec.seed})")
        used.add(spec)
        yield name, spec, read
    for group in numbered.values():
        problems.append(f"runs with the same factors and no seed are numbered as seeds in name order: "
                        f"{_listed(group)}; paired comparisons pair runs by this number, so give the real seed "
                        "({seed} in --factors, or a seed column) if they had one")


def _without_seed(spec: RunSpec) -> tuple:
    return tuple((k, v) for k, v in spec.row().items() if k != "seed")


def _summary(placed: Placed, by_source: dict) -> str:
    sources = ", ".join(f"{n} from {s}" for s, n in by_source.items() if n)
    return (f"{len(placed)} run(s) written by others (no {RUN_MANIFEST}; factors: {sources}): such logs record no "
            "status, so a run with per-epoch scalars is taken as complete (diverged where a value is not "
            "finite); settings they do not give keep the run defaults")


def _varying_hparams(extra: dict[str, dict], placed: Placed, problems: list[str]) -> None:
    """Hparams that are no run field but differ between runs: runs that differ only in
    them would be compared as repeats."""
    names = sorted({k for run in placed for k in extra.get(run, {})})
    for name in names:
        values = {str(extra[run][name]) for run in placed if name in extra.get(run, {})}
        if len(values) > 1:
            shown = ", ".join(sorted(values)[:SHOWN])
            problems.append(f"hparam {name!r} differs between runs ({shown}) but is no run field the report knows "
                            "(" + ", ".join(f.name for f in dataclasses.fields(RunSpec)) + "): runs that differ "
                            "only in it are compared as repeats")
