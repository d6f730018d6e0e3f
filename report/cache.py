"""A parse cache: one entry per event file, keyed by its path, size and mtime.

A second `make report` on the same logs reparses only the files that changed, and when
nothing changed it never imports tbparse or TensorFlow at all (≈ 4 s by themselves).
Entries are .npz files of plain arrays (step, tag, value) plus a JSON header, loaded
with `allow_pickle=False`: a cache folder can't run code. Written atomically; an entry
that can't be read is treated as a miss.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from contract.files import write_atomic

VERSION = 3


class ParseCache:
    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder else None
        self.hits = self.misses = 0
        self._used: set[Path] = set()

    def _entry(self, relpath: str) -> Path:
        assert self.folder is not None
        return self.folder / (hashlib.sha256(relpath.encode()).hexdigest()[:24] + ".npz")

    @staticmethod
    def key(path: Path, relpath: str) -> dict:
        st = path.stat()
        return {"version": VERSION, "path": relpath, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def get(self, path: Path, relpath: str) -> tuple[pd.DataFrame, dict] | None:
        """(step/tag/value frame, header) if cached for this exact file version, else None."""
        if self.folder is None:
            self.misses += 1
            return None
        entry = self._entry(relpath)
        self._used.add(entry)
        try:
            with np.load(entry, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                if header.get("key") != self.key(path, relpath):
                    raise KeyError("stale")
                tags = pd.Categorical.from_codes(z["tag_codes"], categories=z["tag_names"])
                frame = pd.DataFrame({"step": z["step"], "tag": tags, "value": z["value"]})
        except (OSError, KeyError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return frame, header

    def put(self, path: Path, relpath: str, frame: pd.DataFrame, header: dict, key: dict) -> None:
        if self.folder is None:
            return
        buf = io.BytesIO()
        codes, names = pd.factorize(frame["tag"])  # a few tag names, stored once each
        np.savez(buf, header=np.array(json.dumps({**header, "key": key})),
                 step=frame["step"].to_numpy(dtype=np.int64), value=frame["value"].to_numpy(dtype=np.float64),
                 tag_codes=codes.astype(np.int32), tag_names=np.asarray(names, dtype=str))
        try:
            write_atomic(self._entry(relpath), buf.getvalue())
        except OSError:
            pass  # a cache that can't be written only costs time next run

    def prune(self) -> None:
        """Drop entries of event files that no longer exist."""
        if self.folder is None or not self.folder.is_dir():
            return
        for entry in self.folder.glob("*.npz"):
            if entry not in self._used:
                entry.unlink(missing_ok=True)
