"""A run's manifest (`run.json`) from start to end: the config that decides its numbers,
the "running" record written before training, and the final record after it."""
from __future__ import annotations

import hashlib
import math
import os
import platform
import shutil
import socket
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from contract import files
from contract.layout import COMPARISON_MANIFEST_KEY, DIVERGED, FAILED, FINISHED, INTERRUPTED, RUN_MANIFEST, RUNNING
from contract.spec import PER_EXAMPLE, PROBE, RunSpec
from trainer import events, faults
from trainer.data import Dataset
from trainer.spec import Experiment

# How a full disk, a quota, a file-size limit or a read-only mount show up, from Python
# (OSError) or from TensorFlow's C++ writers (a tf.errors message with the OS text).
DISK_ERRORS = ("No space left on device", "Disk quota exceeded", "File too large", "Read-only file system")


def write_json_atomic(path: Path, data: Any) -> None:
    """`contract.files.write_json_atomic` with the trainer's fault point `manifest`
    between the temporary file and the rename (the crash tests kill it there)."""
    files.write_json_atomic(path, data, before_replace=lambda: faults.point("manifest"))


def read_manifest(run_dir: Path) -> dict | None:
    """The run's manifest, or None when it is missing or unreadable."""
    return files.read_json_dict(run_dir / RUN_MANIFEST)


def one_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(exc)).strip()


def run_config(experiment: Experiment, spec: RunSpec, data: Dataset) -> dict:
    """What decides a run's numbers; a finished run is reused only if this matches."""
    config = {
        "spec": spec.to_dict(), "dataset": data.name, "validation": experiment.validation,
        "limit": experiment.limit, "train_examples": int(len(data.x_train)),
        "validation_examples": int(len(data.x_val)),
        "gradient_noise": noise_config(experiment, spec),
        "engine": experiment.engine_of(spec),
    }
    # Only when not float32, so that runs trained before the key existed stay reusable.
    if precision_of(experiment) != "float32":
        config["precision"] = precision_of(experiment)
    return config


def noise_config(experiment: Experiment, spec: RunSpec) -> dict:
    """[gradient_noise] as it decides the run's numbers: the estimator as resolved, named
    only where it is the per-example one, so that probe runs trained before the key
    existed (whose measurements are the same) stay reusable; likewise probe_seed only
    where it is not 0 and the run takes the probe (the per-example estimator draws no rows)."""
    noise = {k: v for k, v in experiment.gradient_noise.to_dict().items() if k not in ("estimator", "probe_seed")}
    if experiment.gradient_noise.probe_seed and experiment.noise_estimator(spec) == PROBE:
        noise["probe_seed"] = experiment.gradient_noise.probe_seed
    if experiment.gradient_noise.enabled and experiment.noise_estimator(spec) == PER_EXAMPLE:
        noise["estimator"] = PER_EXAMPLE
    return noise


def precision_of(experiment: Experiment) -> str:
    """`[execution] precision`: "float32", or "bfloat16" (mixed: bf16 matmuls, convolutions
    and activations; float32 weights, optimizer state and loss)."""
    return getattr(experiment, "precision", "float32")


def is_reusable(run_dir: Path, config: dict) -> dict | None:
    """The manifest of a finished run with the same config, else None."""
    manifest = read_manifest(run_dir)
    if manifest and manifest.get("status") in FINISHED and manifest.get("config") == config:
        return manifest
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pack_entry(members: list[str], index: int) -> dict:
    """run.json's "pack": the runs trained together as one program (a fused-engine pack;
    a run trained alone is a pack of one), whose wall_seconds are all the pack's.
    {"size": how many, "index": this run's place among them, "id": 12 hex digits the
    members share (a hash of their names in pack order, so the same for the same pack),
    "members": their run names in pack order}."""
    digest = hashlib.sha1("\n".join(members).encode("utf-8")).hexdigest()[:12]
    return {"size": len(members), "index": index, "id": digest, "members": list(members)}


def begin_run(experiment: Experiment, spec: RunSpec, data: Dataset, run_dir: Path, *,
              pack: dict | None = None) -> dict:
    """Empty `run_dir` and write its "running" manifest; returns the manifest.

    Any earlier attempt's files are removed first, so TensorBoard never sees two
    copies of a step. `pack`: from `pack_entry`, for a run trained in a pack; else the run
    is a pack of its own.
    """
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    manifest = {
        "experiment": experiment.name, "run": run_dir.name, "config": run_config(experiment, spec, data),
        "spec": spec.to_dict(), "seed": spec.seed, "status": RUNNING,
        "start_time": _now(), "end_time": None, "wall_seconds": None,
        "pack": pack or pack_entry([run_dir.name], 0), "steps": 0,
        "examples_seen": 0, "epochs_completed": 0, "final": {},
        "dataset": data.describe(), "engine": experiment.engine_of(spec), "precision": precision_of(experiment),
        "steps_per_execution": experiment.steps_per_execution, COMPARISON_MANIFEST_KEY: True,
        "versions": library_versions(), "hardware": hardware(),
        "worker": {"pid": os.getpid(), "host": socket.gethostname()},
    }
    write_json_atomic(run_dir / RUN_MANIFEST, manifest)
    return manifest


def finish_run(manifest: dict, *, run_dir: Path, writers: dict, status: str, start: float, steps: int,
               train_examples: int, batch_size: int, epochs_done: int, final: dict,
               noise_summary: dict | None = None, diverged_at: int | None = None) -> dict:
    """Close the run's writers, mark its end in TensorBoard and write the final manifest."""
    # A run whose event files could not be completely written is not finished, whatever
    # training did: marking it failed keeps a half-written log out of the report.
    log_errors = []
    for writer in writers.values():
        try:
            writer.flush()
            writer.close()
        except Exception as exc:  # noqa: BLE001 - recorded, and the run is marked failed
            log_errors.append(one_line(exc))
    steps_per_epoch = math.ceil(train_examples / batch_size)
    full, partial = divmod(steps, steps_per_epoch)
    # wall_seconds counts from `start`: for a run trained in a pack (the fused engine) that
    # is the pack's start, so every member records the whole pack's wall time, not its own
    # share; manifest["pack"] (pack_entry) says which runs shared it.
    manifest.update({
        "status": status, "end_time": _now(), "wall_seconds": round(time.perf_counter() - start, 3),
        "steps": steps, "examples_seen": full * train_examples + partial * batch_size,
        "epochs_completed": epochs_done,
        "final": {k: (v if np.isfinite(v) else None) for k, v in final.items()},
    })
    if noise_summary is not None:
        manifest["gradient_noise"] = noise_summary
    if status == DIVERGED:
        manifest["diverged_at_step"] = diverged_at
    detail = {DIVERGED: f"non-finite loss by step {diverged_at}",
              FAILED: manifest.get("error", "")}.get(status, "")
    try:
        events.write_run_status(run_dir, status, detail)
    except Exception as exc:  # noqa: BLE001 - as above
        log_errors.append(one_line(exc))
    if log_errors and status != INTERRUPTED:
        manifest["status"] = FAILED
        manifest.setdefault("error", "event files could not be written: " + log_errors[0])
    manifest["disk_error"] = any(e in manifest.get("error", "") for e in DISK_ERRORS)
    write_json_atomic(run_dir / RUN_MANIFEST, manifest)
    return manifest


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("tensorflow", "keras", "numpy", "tensorboard"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def hardware() -> dict[str, Any]:
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "gpus": gpus, "platform": platform.platform()}


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name, with its family and model numbers and its bfloat16 units
    (a virtual machine may say only "AMD EPYC", and speed ratios differ between hosts
    that all say so: this names which one a measurement ran on)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    detail = []
    if "cpu family" in fields and "model" in fields:
        detail.append(f"family {fields['cpu family']} model {fields['model']}")
    detail.append(f"bfloat16: {', '.join(bf16) if bf16 else 'none'}")
    return f"{name} ({'; '.join(detail)})"
