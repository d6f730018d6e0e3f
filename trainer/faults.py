"""Fault injection for the crash tests: SIGKILL this process at a named point.

`TRAINER_FAULT=manifest:3` kills the trainer the 3rd time it reaches the point named
`manifest` (between writing a manifest's temporary file and renaming it). Points:
`manifest`, `step` (after a training batch), `flush` (between the epoch scalars being
written and flushed). Random-time kills from outside reach the other moments; these
make the narrow windows certain. Unset (the normal case) it costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

POINTS = ("manifest", "step", "flush")
_ENV = "TRAINER_FAULT"
_seen: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(_ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target not in POINTS:
        raise ValueError(f"{_ENV}={spec!r}: unknown point; valid points: {', '.join(POINTS)}")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
