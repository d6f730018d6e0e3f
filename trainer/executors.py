"""Where runs execute: this process, N local worker processes, or tasks on a Ray cluster.

Every executor runs the same task, `train_one`: take the locks of a pack's runs (one run,
or several the fused engine trains together), skip those another trainer finished or
holds, train the rest, release the locks. So the log layout, the skip
and restart rules and the report are the same whatever runs the grid, and any mix of
executors and shards may share one log root. We do not schedule: a process pool or Ray
hands out the tasks, and yields each result as its run finishes.
"""
from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from contract.layout import EXPERIMENT_MANIFEST, FAILED
from contract.spec import RunSpec
from trainer import interrupt
from trainer.spec import Experiment

if TYPE_CHECKING:  # imported when training starts: they load TensorFlow
    from trainer.data import Dataset
    from trainer.packed_model import PackedMLP

EXECUTORS = ("local", "ray")
# A tf.compat.v1.Session gets thread pools of its own only with this set (else all share
# the process's): the compiled engine runs small steps in a one-thread session
# (trainer.compiled_model). TensorFlow reads it once, when it makes its first device, so
# it is set here, before the trainer loads TensorFlow; the process's own pools are unchanged.
os.environ.setdefault("TF_OVERRIDE_GLOBAL_THREADPOOL", "1")
# Errors that mean the disk, not the run, is at fault.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class ExecutorUnavailable(Exception):
    """The chosen executor cannot run here; the message names the fix."""


@dataclass(frozen=True)
class Task:
    """One pack of runs to train; small and picklable, so it can cross to a worker or a Ray node."""
    experiment: Experiment
    indices: tuple[int, ...]   # positions in the experiment's grid (Experiment.packs)
    exp_dir: str
    allow_download: bool = True
    verbose: int = 0


_data_cache: dict[tuple, object] = {}
_threads_set = False


def init_worker(threads: int | None) -> None:
    """Set up a worker process once: pin TensorFlow's thread pools (before its first op),
    and quiet the retracing warning that every new model triggers."""
    global _threads_set
    if _threads_set:
        return
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    _threads_set = True


def _data_key(experiment: Experiment) -> tuple:
    return experiment.dataset, experiment.validation, experiment.limit, experiment.data_path


def share_dataset(experiment: Experiment, data: "Dataset") -> None:
    """Runs trained in this process reuse `data` (the grid loaded it already)."""
    _data_cache[_data_key(experiment)] = data


def _dataset(experiment: Experiment, allow_download: bool) -> "Dataset":
    from trainer import data as datasets

    key = _data_key(experiment)
    if key not in _data_cache:  # each worker process loads the data once, not once per run
        _data_cache[key] = datasets.load(experiment.dataset, validation=experiment.validation,
                                         limit=experiment.limit, path=experiment.data_path,
                                         allow_download=allow_download)
    return _data_cache[key]


def train_one(task: Task, prepared: "PackedMLP | None" = None, out: TextIO | None = None,
              max_threads: int | None = None) -> list[dict]:
    """Train a task's runs under their locks; a summary per run (`status` "busy" or
    "skipped" when another trainer holds or finished it). `prepared`: see `prepare_task`.
    Progress lines go to `out` (the grid's stream; a worker process's own stdout).
    `max_threads`: a compiled-engine run's thread cap (`_run_here`)."""
    from trainer.lock import RunLock, describe_owner, try_lock
    from trainer.manifest import is_reusable, run_config

    out = out or sys.stdout

    experiment = task.experiment
    exp_dir = Path(task.exp_dir)
    if not (exp_dir / EXPERIMENT_MANIFEST).is_file():
        # On a cluster: the driver wrote it, so this node does not see the driver's log root.
        raise FileNotFoundError(f"{exp_dir}/{EXPERIMENT_MANIFEST} is not visible from this worker: the log "
                                "root must be a path every node shares (e.g. an NFS mount)")
    data = _dataset(experiment, task.allow_download)
    interrupt.check()
    results, todo, locks = [], [], []
    try:
        for index in task.indices:
            spec = experiment.runs[index]
            name = experiment.run_name(spec)
            label = f"run {index + 1}/{len(experiment.runs)} {name}"
            result = {"index": index, "name": name, "pid": os.getpid()}
            lock = try_lock(exp_dir, name)
            if not isinstance(lock, RunLock):
                results.append({**result, "status": "busy", "owner": describe_owner(lock)})
                continue
            locks.append(lock)
            done = is_reusable(exp_dir / name, run_config(experiment, spec, data))
            if done:
                results.append({**result, "status": "skipped", "finished_status": done["status"]})
                continue
            if lock.stale_owner:
                print(f"{label}: taking over from a dead trainer ({describe_owner(lock.stale_owner)})", file=out, flush=True)
            print(f"{label}: start", file=out, flush=True)
            todo.append(result)
        if todo:
            manifests = train_runs(experiment, [experiment.runs[r["index"]] for r in todo], data,
                                   [exp_dir / r["name"] for r in todo], task.verbose, prepared=prepared,
                                   max_threads=max_threads)
            keys = ("status", "wall_seconds", "final", "error", "disk_error")
            results += [{**r, **{k: m.get(k) for k in keys}} for r, m in zip(todo, manifests)]
    finally:
        for lock in locks:
            lock.release()
    return results


def train_runs(experiment: Experiment, specs: list[RunSpec], data: "Dataset", run_dirs: list[Path],
               verbose: int = 0, prepared: "PackedMLP | None" = None, max_threads: int | None = None) -> list[dict]:
    """Final manifests of `specs` trained into `run_dirs`: a pack on the fused engine, or
    one run on the compiled engine (trainer.compiled) or with `model.fit`."""
    try:
        engine = experiment.engine_of(specs[0])
        if engine == "fused":
            from trainer.packed import train_pack

            return train_pack(experiment, specs, data, run_dirs, prepared=prepared)
        (spec,), (run_dir,) = specs, run_dirs
        if engine == "compiled":
            from trainer.compiled import train_run as train_compiled

            return [train_compiled(experiment, spec, data, run_dir, max_threads=max_threads)]
        from trainer.fit import train_run

        return [train_run(experiment, spec, data, run_dir, verbose=verbose)]
    except OSError as exc:  # a manifest itself could not be written: the runs stay "running"
        if exc.errno not in DISK_ERRNOS:
            raise
        return [{"status": FAILED, "error": f"OSError: {exc.strerror}", "disk_error": True}] * len(specs)


def prepare_task(task: Task) -> "PackedMLP | None":
    """The fused engine's pack for `task`, built and compiled (None for a Keras run, or if
    preparing failed: training then builds it and reports any error as usual)."""
    experiment = task.experiment
    specs = [experiment.runs[i] for i in task.indices]
    if experiment.engine_of(specs[0]) != "fused":
        return None
    try:
        from trainer.packed import prepare

        return prepare(experiment, specs, _dataset(experiment, task.allow_download))
    except Exception:  # noqa: BLE001 - an optimization only; train_pack reports the error
        return None


def _program(task: Task) -> tuple | None:
    """The compiled program `task`'s pack trains with (`trainer.packed.program_of`); None
    for a Keras run."""
    experiment = task.experiment
    specs = [experiment.runs[i] for i in task.indices]
    if experiment.engine_of(specs[0]) != "fused":
        return None
    from trainer.packed import program_of

    return program_of(experiment, specs, _dataset(experiment, task.allow_download))


def _own_threads(task: Task) -> int | None:
    """The threads of the session of its own that `task`'s run trains in
    (`trainer.compiled_programs.own_threads`), or None: it trains alone, in the process's
    thread pools (a fused pack, XLA, `model.fit`; or telling failed, and training it
    reports the error)."""
    experiment = task.experiment
    spec = experiment.runs[task.indices[0]]
    if len(task.indices) != 1 or experiment.engine_of(spec) != "compiled":
        return None
    from trainer.compiled_programs import own_threads

    try:
        return own_threads(spec, _dataset(experiment, task.allow_download), experiment.precision)
    except Exception:  # noqa: BLE001 - an optimization only
        return None


def _run_here(tasks: list[Task], out: TextIO | None) -> Iterator[dict]:
    """Tasks in this process, in order, their results as they finish.

    Runs that train in a session of their own (a CNN on the compiled engine: one thread at
    small batches, all cores at large ones, `trainer.compiled_programs`) share the cores:
    each starts, in a thread of its own, as soon as a core is free, with at most the free
    cores' threads (document 000's grid, batch 8, 32 and 128 on 2 cores: 8 and 32 side
    by side, then 128 on the core 32 leaves, with one thread; so a run's thread count,
    recorded in run.json `compiled.threads`, can depend on what else trains). A shared
    run's error fails that run only, as in a worker process. Every other task has the machine to
    itself. Of those, a pack that needs another compiled program than the one training (a
    new batch size or structure) is prepared in a thread meanwhile: TensorFlow releases
    the GIL while it computes, and tracing and XLA compilation (1–3 s a pack) mostly use
    one core, so they overlap with training. A pack with the same program is not: it
    loads into the pack object just released, whose program is compiled already, instead
    of compiling it again in a second one (measured on the lab grid: 5 compilations
    instead of 10)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    if not tasks:
        return
    cores = usable_cores()
    preparing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
    sharing = ThreadPoolExecutor(max_workers=cores, thread_name_prefix="train")
    running: dict = {}  # future → (its task, the cores its run holds)

    def free() -> int:
        return cores - sum(c for _, c in running.values())

    def collect(future) -> list[dict]:
        task = running.pop(future)[0]
        try:
            return future.result()
        except Exception as exc:  # noqa: BLE001 - as a worker process's error: that task failed, the rest go on
            return _failed(task, f"{type(exc).__name__}: {exc}")

    def until_free(n: int) -> Iterator[dict]:  # the results of shared runs, until n cores are free
        for future in [f for f in running if f.done()]:  # finished: their cores are free already
            yield from collect(future)
        while running and free() < n:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield from collect(future)

    try:
        upcoming = None  # (index, future) of the pack prepared ahead
        for k, task in enumerate(tasks):
            threads = _own_threads(task)
            if threads is not None:
                yield from until_free(1)
                threads = min(threads, free())
                running[sharing.submit(train_one, task, None, out, threads)] = task, threads
                continue
            yield from until_free(cores)
            if upcoming is not None and upcoming[0] == k:
                prepared = upcoming[1].result()
            else:
                prepared = prepare_task(task) if k == 0 else None
            upcoming = None
            if k + 1 < len(tasks) and _ahead(task, tasks[k + 1]):
                upcoming = k + 1, preparing.submit(prepare_task, tasks[k + 1])
            yield from train_one(task, prepared, out)
        yield from until_free(cores)
    finally:
        # Ctrl-C: the shared runs still training stop at their next `interrupt.check()`;
        # another error here (the caller's): they finish. Either way their manifests are
        # written before this returns.
        sharing.shutdown(wait=True, cancel_futures=True)
        preparing.shutdown(wait=False, cancel_futures=True)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; `os.cpu_count()` counts the
    machine's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _ahead(task: Task, upcoming: Task) -> bool:
    """Whether to prepare `upcoming` while `task` trains: unless both train with the same
    compiled program (or a failure to tell, which training then reports)."""
    try:
        program = _program(upcoming)
        return program is not None and program != _program(task)
    except Exception:  # noqa: BLE001 - an optimization only
        return False


def run_local(tasks: list[Task], *, workers: int, threads: int | None,
              out: TextIO | None = None) -> Iterator[dict]:
    """Tasks in this process (workers=1) or in a pool of `workers` processes (which print
    to their own stdout, the terminal they share with this one)."""
    if workers <= 1:
        yield from _run_here(tasks, out)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the parent has TensorFlow loaded, and forking its threads is unsafe.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(threads,))
    try:
        futures = {pool.submit(train_one, task): task for task in tasks}
        for future in as_completed(futures):
            try:
                results = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. a worker killed: BrokenProcessPool
                results = _failed(futures[future], f"{type(exc).__name__}: {exc}")
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_ray(tasks: list[Task], *, address: str | None, cpus_per_run: float, gpus_per_run: float,
            retries: int = 3) -> Iterator[dict]:
    """Each run a Ray task with declared resources, retried (up to `retries`) if its worker dies."""
    # Show every worker's "start" line, not one per pattern ("[repeated 6x across cluster]").
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
    except ImportError:
        raise ExecutorUnavailable("the ray executor needs Ray: .venv/bin/pip install -e '.[ray]'") from None

    started_here = not ray.is_initialized()
    if started_here:
        # No address: a local Ray instance on this machine. "auto" or ray://…: a running cluster.
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}})
    threads = max(1, int(cpus_per_run))

    def train(task: Task) -> dict:
        init_worker(threads)
        return train_one(task)

    remote = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=retries)(train)
    try:
        pending = {remote.remote(task): task for task in tasks}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ready[0])
            try:
                results = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                results = _failed(task, f"Ray task failed (retried up to {retries} times): "
                                        f"{str(exc).strip().splitlines()[-1]}")
            yield from results
    finally:
        if started_here:
            ray.shutdown()


def _failed(task: Task, error: str) -> list[dict]:
    """The results of a task that never reported back (its run folders, if any, say running)."""
    return [{"index": i, "name": task.experiment.run_name(task.experiment.runs[i]), "status": FAILED,
             "error": error} for i in task.indices]
