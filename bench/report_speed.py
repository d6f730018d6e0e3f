"""Benchmark: reading a grid's logs with tbparse's defaults vs our cached loader, and the report.

    python -m bench.report_speed --logdir logs/lab

Times, in one run on the same logs: tbparse's default read of the whole folder (long
format, and pivot=True), our loader cold (empty cache: integrity check + tbparse per
file) and warm (cache hit), then the whole `python -m report` as fresh processes, cold
and warm. The last line is `warm parse speedup: <ratio>x` against tbparse's defaults.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report_speed", description=__doc__.splitlines()[0])
    p.add_argument("--logdir", type=Path, default=Path("logs/lab"))
    args = p.parse_args(argv)
    if not args.logdir.is_dir():
        print(f"error: no logs at {args.logdir}; run `make train` first (or pass --logdir)", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import_s, _ = timed(lambda: __import__("tbparse"))
    from tbparse import SummaryReader

    from report.load import load_logs

    default_s, df = timed(lambda: SummaryReader(str(args.logdir)).tensors)
    pivot_s, _ = timed(lambda: SummaryReader(str(args.logdir), pivot=True).tensors)
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        cache = Path(tmp) / "cache"
        cold_s, logs = timed(lambda: load_logs(args.logdir, cache_dir=cache))
        warm_s, warm = timed(lambda: load_logs(args.logdir, cache_dir=cache))
        assert warm.cache_misses == 0 and warm.scalars.equals(logs.scalars)
        env = {**os.environ, "MPLBACKEND": "Agg"}
        cmd = [sys.executable, "-m", "report", "--logdir", str(args.logdir), "--out", str(Path(tmp) / "out")]
        report_cold_s, _ = timed(lambda: subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True))
        report_warm_s, _ = timed(lambda: subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True))
    files = len(list(args.logdir.glob("*/*/events.out.tfevents.*")))
    print(f"logs: {args.logdir}, {len(logs.runs)} runs, {files} event files, {len(df)} points (tbparse default read)")
    print(f"import tbparse (+TensorFlow):          {import_s:6.2f}s")
    print(f"tbparse default, long:                 {default_s:6.2f}s")
    print(f"tbparse default, pivot=True:           {pivot_s:6.2f}s")
    print(f"ours cold (check + parse + cache):     {cold_s:6.2f}s")
    print(f"ours warm (cache):                     {warm_s:6.2f}s")
    print(f"python -m report, cold cache:          {report_cold_s:6.2f}s")
    print(f"python -m report, warm cache:          {report_warm_s:6.2f}s")
    print(f"warm parse speedup: {default_s / warm_s:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
