"""Files of the log layout and the report: written atomically, read defensively."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere it can only be read by setting it, then back
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes | str, *, before_replace: Callable[[], None] | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`, so a
    reader (or the next run) never sees half a file. The file gets the permissions any
    new file gets under the user's umask (mkstemp alone would make it 0600, unreadable
    to a lab mate on a shared log root). `before_replace` runs between the temporary
    file and the rename (the trainer's fault tests kill the process there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any, *, before_replace: Callable[[], None] | None = None) -> None:
    write_atomic(path, json.dumps(data, indent=2, allow_nan=False, default=str) + "\n",
                 before_replace=before_replace)


def read_json_dict(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
