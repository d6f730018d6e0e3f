"""One lock per run, so two trainers on the same log root never train the same run.

The lock is an OS file lock (`filelock.FileLock`, i.e. `flock` on Unix): the kernel
releases it when the holding process dies, however it dies, so a lock left behind by
a killed trainer is stale by construction and the next trainer simply takes it. An
owner record beside the lock says who holds it, for messages, and lets a new owner
say whose stale lock it took over.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from contract.files import read_json_dict
from contract.layout import LOCK_DIR
from trainer.manifest import write_json_atomic


@dataclass
class RunLock:
    """A held lock; `stale_owner` is the dead holder a previous lock file named, if any."""
    lock: FileLock
    owner_path: Path
    stale_owner: dict | None

    def release(self) -> None:
        self.owner_path.unlink(missing_ok=True)
        self.lock.release()


def owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def read_owner(path: Path) -> dict | None:
    return read_json_dict(path)


def try_lock(exp_dir: Path, run: str) -> RunLock | dict:
    """Take the run's lock without waiting: a `RunLock`, or the holder's owner record."""
    folder = exp_dir / LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    owner_path = folder / f"{run}.owner.json"
    lock = FileLock(folder / f"{run}.lock", blocking=False)
    try:
        lock.acquire()
    except Timeout:
        return read_owner(owner_path) or {"pid": "?", "host": "?", "since": "?"}
    stale = read_owner(owner_path)
    write_json_atomic(owner_path, owner_record())
    return RunLock(lock, owner_path, stale)


def describe_owner(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"
