"""The benchmark scripts run and count what they say (their timings are printed, not asserted)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_grid_flops_counts_every_dense_multiply_add():
    from bench.grid_speed import grid_flops
    from trainer.spec import load_experiment

    exp = load_experiment("smoke")  # MLP 784 → 32 → 10, one epoch, 8 runs
    forward = 2 * (784 * 32 + 32 * 10)
    assert grid_flops(exp, 1000, 100) == 8 * forward * (3 * 1000 + 100)


@pytest.mark.slow
def test_report_benchmark_prints_each_time_and_the_ratio(fixture_logs):
    result = subprocess.run([sys.executable, "-m", "bench.report_speed", "--logdir", str(fixture_logs)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("ours warm (cache):") for line in lines)
    assert re.fullmatch(r"warm parse speedup: \d+\.\dx", lines[-1])


@pytest.mark.slow
def test_noise_overhead_benchmark_trains_both_sides(synthetic_npz):
    result = subprocess.run([sys.executable, "-m", "bench.noise_overhead", "--experiment", "smoke", "--quick",
                             "--every-examples", "320", "--data", str(synthetic_npz)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    rows = {int(line.split()[0]): line.split() for line in lines if re.match(r"\s+\d+ ", line)}
    assert sorted(rows) == [64, 256]
    # The "on" side measured: at least at each of the 2 epoch ends of each of the 4 runs a row.
    assert all(int(row[-1]) >= 8 for row in rows.values())
    assert re.fullmatch(r"gradient noise overhead: -?\d+\.\d%", lines[-1])


@pytest.mark.slow
def test_make_bench_quick_runs_from_a_fresh_checkout(synthetic_npz):
    """`make bench QUICK=1` needs no trained grid (it trains both sides in temporary
    folders) and ends with the ratio; TensorFlow's start-up lines stay off the terminal."""
    result = subprocess.run(["make", "--no-print-directory", "bench", "QUICK=1", "EXPERIMENT=smoke",
                             f"DATA={synthetic_npz}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"speedup: \d+\.\d\dx", lines[-1])
    assert any(line.startswith("compute floor: ") for line in lines)
    assert "all runs complete with per-step losses: True" in lines
    assert "cuInit" not in result.stderr and "oneDNN custom operations" not in result.stderr
