"""Run every cell of an experiment's grid, skipping finished runs, with progress and ETA."""
from __future__ import annotations

import errno
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from trainer import data as datasets
from trainer.lock import RunLock, describe_owner, try_lock
from trainer.manifest import write_json_atomic
from trainer.run import DISK_ERRORS, is_reusable, run_config, train_run
from trainer.spec import Experiment, RunSpec
from trainer.tblog import write_hparams_config

EXPERIMENT_MANIFEST = "experiment.json"


class LogDirError(Exception):
    """The log root cannot be written (or has too little space); raised before training."""


# Errors that mean the disk, not the run, is at fault: the grid stops instead of failing
# every remaining run the same way.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}

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


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise LogDirError(f"cannot write to the log folder {folder}: {exc.strerror or exc}; "
                          "choose another with --logdir (LOGDIR= with make)") from None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _metrics(final: dict) -> str:
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    return " ".join(f"{k}={final[k]:.4f}" for k in keys if isinstance(final.get(k), float))


def run_grid(experiment: Experiment, *, logdir: Path, verbose: int = 0,
             allow_download: bool = True, out: TextIO | None = None) -> int:
    """Train the grid into `logdir/<experiment>/`; 0 when every run finished, 1 if any failed."""
    out = out or sys.stdout
    exp_dir = logdir / experiment.name
    check_writable(exp_dir)
    data = datasets.load(experiment.dataset, validation=experiment.validation,
                         limit=experiment.limit, path=experiment.data_path,
                         allow_download=allow_download)
    d = data.describe()
    print(f"{experiment.name}: {len(experiment.runs)} runs on {d['name']} from {d['source']} "
          f"({d['train_examples']} train / {d['validation_examples']} validation, {d['validation']})",
          file=out, flush=True)
    names = [experiment.run_name(spec) for spec in experiment.runs]
    # Decided once up front: which runs are already finished (the ETA counts the rest).
    finished = [is_reusable(exp_dir / n, run_config(experiment, s, data))
                for s, n in zip(experiment.runs, names)]
    check_space(exp_dir, estimate_bytes([s for s, f in zip(experiment.runs, finished) if not f],
                                        len(data.x_train)))
    write_json_atomic(exp_dir / EXPERIMENT_MANIFEST, {
        "experiment": experiment.to_dict(), "dataset": d, "runs": names,
        "specs": [spec.to_dict() for spec in experiment.runs],
        "source_text": Path(experiment.source).read_text(encoding="utf-8"),
    })
    write_hparams_config(exp_dir, experiment)
    stale = sorted(p.name for p in exp_dir.iterdir() if p.is_dir() and p.name not in names)
    if stale:
        print(f"note: {len(stale)} run folder(s) not in this grid are left as they are: "
              f"{', '.join(stale[:5])}{' …' if len(stale) > 5 else ''}", file=out, flush=True)

    total, counts, trained_seconds, trained = len(names), {}, 0.0, 0

    def count(status: str) -> None:
        counts[status] = counts.get(status, 0) + 1

    for i, (spec, name) in enumerate(zip(experiment.runs, names), start=1):
        run_dir = exp_dir / name
        done = finished[i - 1]
        if done:
            count("skipped")
            print(f"run {i}/{total} {name}: already {done['status']}, skipped", file=out, flush=True)
            continue
        lock = try_lock(exp_dir, name)
        if not isinstance(lock, RunLock):
            count("busy elsewhere")
            print(f"run {i}/{total} {name}: being trained by {describe_owner(lock)}, skipped",
                  file=out, flush=True)
            continue
        try:
            # Another trainer may have finished it between the first look and the lock.
            done = is_reusable(run_dir, run_config(experiment, spec, data))
            if done:
                count("skipped")
                print(f"run {i}/{total} {name}: finished by another trainer, skipped", file=out, flush=True)
                continue
            if lock.stale_owner:
                print(f"run {i}/{total} {name}: taking over from a dead trainer "
                      f"({describe_owner(lock.stale_owner)})", file=out, flush=True)
            print(f"run {i}/{total} {name}: start", file=out, flush=True)
            t0 = time.perf_counter()
            try:
                manifest = train_run(experiment, spec, data, run_dir, verbose=verbose)
            except OSError as exc:
                if exc.errno not in _DISK_ERRNOS:
                    raise
                raise LogDirError(f"run {name} could not be written ({exc.strerror}); the grid stopped. "
                                  f"That run is left unfinished and is retrained, not reported. "
                                  f"Free space in {exp_dir} and run the same command again") from None
        finally:
            lock.release()
        trained_seconds += time.perf_counter() - t0
        trained += 1
        status = manifest["status"]
        count(status)
        if manifest.get("disk_error"):
            reason = next(e for e in DISK_ERRORS if e in manifest["error"])
            raise LogDirError(f"run {name} could not write its logs ({reason}); "
                              f"the grid stopped. That run is marked failed and is retrained, not reported. "
                              f"Free space in {exp_dir} and run the same command again")
        left = sum(1 for f in finished[i:] if not f)
        eta = f", ETA {_duration(trained_seconds / trained * left)}" if left else ""
        detail = manifest.get("error", "") if status == "failed" else _metrics(manifest["final"])
        print(f"run {i}/{total} {name}: {status} in {manifest['wall_seconds']:.1f}s {detail}{eta}",
              file=out, flush=True)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{experiment.name}: grid done ({summary}); logs in {exp_dir}", file=out, flush=True)
    return 1 if counts.get("failed") else 0
