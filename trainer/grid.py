"""Run every cell of an experiment's grid, skipping finished runs, with progress and ETA."""
from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from contract.layout import COMPARISON_MANIFEST_KEY, EXPERIMENT_MANIFEST, FAILED
from contract.spec import RunSpec
from trainer import data as datasets
from trainer.as_run import as_run_text
from trainer.events import write_hparams_config
from trainer.executors import EXECUTORS, Task, run_local, run_ray, share_dataset
from trainer.manifest import DISK_ERRORS, is_reusable, run_config, write_json_atomic
from trainer.noise_checks import noise_fix
from trainer.spec import Experiment, ExperimentError


class LogDirError(Exception):
    """The log root cannot be written (or has too little space); raised before training."""


# Measured on smoke logs: ≈ 4.4 kB per run of fixed files (run.json, hparams, status),
# 67 bytes per step_loss event, ≈ 100 bytes per epoch scalar; rounded up.
_BYTES_PER_RUN, _BYTES_PER_STEP, _BYTES_PER_EPOCH = 8_000, 100, 400


def estimate_bytes(specs: list[RunSpec], train_examples: int) -> int:
    """An upper estimate of the log bytes that training `specs` writes."""
    return sum(_BYTES_PER_RUN + s.epochs * (math.ceil(train_examples / s.batch_size) * _BYTES_PER_STEP
                                             + _BYTES_PER_EPOCH) for s in specs)


def check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < 2 * needed:
        raise LogDirError(f"the log folder {folder} has {free / 1e6:.1f} MB free; this grid writes "
                          f"about {needed / 1e6:.1f} MB of logs and needs twice that to be safe. "
                          "Free some space or choose another folder with --logdir (LOGDIR= with make)")


def _existing(folder: Path) -> Path:
    """`folder`, or the nearest folder above it that exists."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(folder: Path) -> None:
    """The log folder, or the nearest folder above it that exists, takes a new file; nothing
    is created (a grid refused later leaves no empty folder behind)."""
    existing = _existing(folder)
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a folder", str(existing))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise LogDirError(f"cannot write to the log folder {folder}: {exc.strerror or exc}; "
                          "choose another with --logdir (LOGDIR= with make)") from None


def check_fits(experiment: Experiment, train_examples: int, out: TextIO) -> None:
    """Refuse settings the data cannot serve (ExperimentError, before anything is written);
    warn about batch sizes that make every step a full pass over the data, and about a
    measurement interval the epoch never reaches."""
    noise = experiment.gradient_noise
    if noise.enabled:
        limit = f" (--limit {experiment.limit})" if experiment.limit else ""
        if experiment.uses_probe and noise.big_batch > train_examples:
            raise ExperimentError(noise_fix(noise, train_examples, f"the {train_examples} training examples "
                                                                   f"of the data{limit}"))
        if noise.every_examples >= train_examples:
            print(f"note: [gradient_noise] every_examples = {noise.every_examples} ≥ the {train_examples} "
                  "training examples: the noise scale is measured at epoch ends only", file=out, flush=True)
    full = sorted({s.batch_size for s in experiment.runs if s.batch_size >= train_examples})
    if full:
        print(f"warning: batch size {', '.join(map(str, full))} ≥ the {train_examples} training examples: each "
              "such run takes one full-batch step per epoch, so runs that differ only in these batch sizes "
              "give identical numbers. Raise --limit (LIMIT=) or drop those batch sizes", file=out, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _metrics(final: dict) -> str:
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    return " ".join(f"{k}={final[k]:.4f}" for k in keys if isinstance(final.get(k), float))


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" → (i, n): the (i+1)-th of n disjoint slices of the grid, 0 <= i < n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 3/10 for the 4th of 10 slices") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n (slices are numbered from 0, "
                         "as in a Slurm array --array=0-9 with $SLURM_ARRAY_TASK_ID)")
    return i, n


def shard_runs(total: int, shard: tuple[int, int] | None) -> list[int]:
    """The grid positions in a shard: position mod n. The grid's order comes from the
    experiment file alone, so every machine computes the same slices, and they differ
    in size by at most one run."""
    if shard is None:
        return list(range(total))
    i, n = shard
    return [k for k in range(total) if k % n == i]


def run_grid(experiment: Experiment, *, logdir: Path, verbose: int = 0,
             allow_download: bool = True, out: TextIO | None = None, executor: str = "local",
             workers: int = 1, threads: int | None = None, shard: tuple[int, int] | None = None,
             ray_address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0) -> int:
    """Train the grid (or one shard of it) into `logdir/<experiment>/`.

    0 when every run it took on finished (complete or diverged), 1 if any failed.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; valid executors: {', '.join(EXECUTORS)}")
    out = out or sys.stdout
    exp_dir = logdir / experiment.name
    check_writable(exp_dir)
    data = datasets.load(experiment.dataset, validation=experiment.validation,
                         limit=experiment.limit, path=experiment.data_path,
                         allow_download=allow_download)
    check_fits(experiment, len(data.x_train), out)
    share_dataset(experiment, data)
    d = data.describe()
    print(f"{experiment.name}: {len(experiment.runs)} runs on {d['name']} from {d['source']} "
          f"({d['train_examples']} train / {d['validation_examples']} validation, {d['validation']})",
          file=out, flush=True)
    names = [experiment.run_name(spec) for spec in experiment.runs]
    selected = shard_runs(len(names), shard)
    if shard:
        print(f"shard {shard[0]}/{shard[1]}: {len(selected)} of the {len(names)} runs", file=out, flush=True)
    # Decided once up front: which runs are already finished (the ETA counts the rest).
    finished = {i: is_reusable(exp_dir / names[i], run_config(experiment, experiment.runs[i], data))
                for i in selected}
    check_space(_existing(exp_dir), estimate_bytes([experiment.runs[i] for i in selected if not finished[i]],
                                        len(data.x_train)))
    exp_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(exp_dir / EXPERIMENT_MANIFEST, {
        "experiment": experiment.to_dict(), "dataset": d, "runs": names,
        "specs": [spec.to_dict() for spec in experiment.runs],
        # The file as the grid ran: the command-line overrides written into its text.
        "source_text": as_run_text(Path(experiment.source).read_text(encoding="utf-8"), experiment.overrides),
        "overrides": experiment.overrides,
    })
    write_hparams_config(exp_dir, experiment)
    stale = sorted(p.name for p in exp_dir.iterdir()
                   if p.is_dir() and p.name not in names and not p.name.startswith("."))
    if stale:
        print(f"note: {len(stale)} run folder(s) not in this grid are left as they are: "
              f"{', '.join(stale[:5])}{' …' if len(stale) > 5 else ''}", file=out, flush=True)

    counts: dict[str, int] = {}

    def count(status: str) -> None:
        counts[status] = counts.get(status, 0) + 1

    total = len(names)
    for i in selected:
        if finished[i]:
            count("skipped")
            print(f"run {i + 1}/{total} {names[i]}: already {finished[i]['status']}, skipped", file=out, flush=True)
    older = [names[i] for i in selected if finished[i] and not finished[i].get(COMPARISON_MANIFEST_KEY)]
    if older:
        print(f"note: {len(older)} skipped run(s) were logged before the compare/ tags TensorBoard's Custom "
              f"Scalars charts select by ({', '.join(older[:3])}{' …' if len(older) > 3 else ''}): those charts "
              f"leave them out (the report does not need the tags). To include them, retrain: make clean "
              f"EXPERIMENT={experiment.name}, then make train", file=out, flush=True)
    todo = [i for i in selected if not finished[i]]
    tasks = [Task(experiment, pack, str(exp_dir), allow_download, verbose) for pack in experiment.packs(todo)]
    if executor == "ray":
        results = run_ray(tasks, address=ray_address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run)
    else:
        results = run_local(tasks, workers=workers, threads=threads, out=out)
    t0, done = time.perf_counter(), 0
    for result in results:
        label = f"run {result['index'] + 1}/{total} {result['name']}"
        status = result["status"]
        if status == "busy":
            count("busy elsewhere")
            print(f"{label}: being trained by {result['owner']}, skipped", file=out, flush=True)
            continue
        if status == "skipped":
            count("skipped")
            print(f"{label}: finished by another trainer, skipped", file=out, flush=True)
            continue
        count(status)
        done += 1
        error = result.get("error") or ""
        if result.get("disk_error") or any(e in error for e in DISK_ERRORS):
            reason = next((e for e in DISK_ERRORS if e in error), error)
            raise LogDirError(f"run {result['name']} could not write its logs ({reason}); "
                              f"the grid stopped. That run is marked failed and is retrained, not reported. "
                              f"Free space in {exp_dir} and run the same command again")
        left = len(todo) - done
        eta = f", ETA {_duration((time.perf_counter() - t0) / done * left)}" if left else ""
        detail = error if status == FAILED else _metrics(result.get("final") or {})
        wall = result.get("wall_seconds")
        took = f" in {wall:.1f}s" if isinstance(wall, (int, float)) else ""
        print(f"{label}: {status}{took} {detail}{eta}", file=out, flush=True)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{experiment.name}: grid done ({summary}); logs in {exp_dir}", file=out, flush=True)
    return 1 if counts.get(FAILED) else 0
