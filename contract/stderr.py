"""TensorFlow's start-up lines kept off the terminal: shared by both stages' command lines.

TensorFlow's C++ side prints, while it loads and looks for a GPU, lines such as
"I0000 … oneDNN custom operations are on" and "E0000 … failed call to cuInit" straight to
file descriptor 2, before `TF_CPP_MIN_LOG_LEVEL` takes effect, so neither that variable
nor Python's logging silences them. `quietly` runs a function with descriptor 2 sent to a
temporary file, then writes back every line that is not such start-up noise.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:. ]+\d+ \S+\] .*"                      # absl INFO lines
    r"|[WE]\d{4} [\d:. ]+\d+ \S+\] .*(cuInit|CUDA|cuda|TensorRT|GPU).*"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)$")


def quietly(fn: Callable[[], T], *, verbose: bool = False) -> T:
    """`fn()` with TensorFlow's start-up noise on descriptor 2 dropped (kept if `verbose`)."""
    if verbose:
        return fn()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            return fn()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not NOISE.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)
