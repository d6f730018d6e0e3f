"""Ctrl-C and SIGTERM as a stop request that cannot be lost.

Raising KeyboardInterrupt from a signal handler is not enough on its own: when the signal
lands while Python runs a weakref callback or a `__del__` (TensorFlow runs many), the
exception is printed as "Exception ignored in ..." and training carries on. So the handler
also records the request, and the trainer calls `check()` after every training batch, at
every epoch end, after `fit` returns and before each run starts.
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: str | None = None


def install() -> dict:
    """Handle SIGINT and SIGTERM; returns the previous handlers for `restore`.

    SIGINT is installed explicitly: a process started in the background by a non-interactive
    shell inherits SIGINT ignored, and `kill -INT` must still stop it cleanly.
    """
    global _requested
    _requested = None
    return {sig: signal.signal(sig, _handler) for sig in SIGNALS}


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def requested() -> str | None:
    """The name of the signal that asked to stop, or None."""
    return _requested


def check() -> None:
    if _requested is not None:
        raise KeyboardInterrupt(_requested)


def _handler(signum, frame):
    global _requested
    _requested = signal.Signals(signum).name
    raise KeyboardInterrupt(_requested)
