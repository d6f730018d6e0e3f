"""Executors and shards: the same grid through 2 local workers, 3 shards and a real Ray cluster."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.grid import parse_shard, shard_runs

ROOT = Path(__file__).resolve().parent.parent


def trainer_cmd(npz, logdir, *extra):
    return [sys.executable, "-m", "trainer", "--experiment", "smoke", "--data", str(npz),
            "--logdir", str(logdir), *extra]


def env():
    # RAY_AUTH_MODE: the test's cluster listens on loopback only, so it skips Ray's tokens.
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "RAY_AUTH_MODE": "disabled"}


def layout(exp_dir: Path) -> dict:
    """What the report reads, minus the numbers: run → status, and (split, tag, steps) per run."""
    from tbparse import SummaryReader

    out = {}
    for manifest in sorted(exp_dir.glob("*/run.json")):
        run_dir = manifest.parent
        tags = set()
        for split in ("train", "validation"):
            df = SummaryReader(str(run_dir / split)).tensors
            tags |= {(split, tag, len(g)) for tag, g in df.groupby("tag")}
        out[run_dir.name] = (json.loads(manifest.read_text())["status"], frozenset(tags))
    return out


def starts(output: str, run: str) -> int:
    return output.count(f" {run}: start")


def test_shards_are_disjoint_cover_the_grid_and_differ_by_at_most_one():
    for total in (1, 7, 8, 30, 180):
        for n in (1, 3, 10):
            slices = [shard_runs(total, (i, n)) for i in range(n)]
            assert sorted(k for s in slices for k in s) == list(range(total))
            assert max(map(len, slices)) - min(map(len, slices)) <= 1
            assert slices == [shard_runs(total, (i, n)) for i in range(n)]  # stable


@pytest.mark.parametrize("text, message", [("3", "expected i/n"), ("10/10", "0 <= i < n"),
                                           ("-1/3", "0 <= i < n"), ("a/b", "expected i/n")])
def test_bad_shard_names_the_form(text, message, capsys):
    from trainer.cli import main

    with pytest.raises(ValueError, match=message):
        parse_shard(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["--experiment", "smoke", f"--shard={text}"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_three_shards_in_three_processes_train_each_run_exactly_once(tmp_path, synthetic_npz, smoke):
    procs = [subprocess.Popen(trainer_cmd(synthetic_npz, tmp_path, "--shard", f"{i}/3"), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env())
             for i in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert ["shard 0/3: 3 of the 8 runs" in outputs[0], "shard 1/3: 3 of the 8 runs" in outputs[1],
            "shard 2/3: 2 of the 8 runs" in outputs[2]] == [True] * 3
    _, reference_dir, _ = smoke
    reference = layout(reference_dir)
    assert layout(tmp_path / "smoke") == reference
    for run in reference:
        assert [starts(o, run) for o in outputs].count(1) == 1 and sum(starts(o, run) for o in outputs) == 1
    # Re-submitting a shard is safe: everything is already complete, nothing is retrained.
    again = subprocess.run(trainer_cmd(synthetic_npz, tmp_path, "--shard", "1/3"), cwd=ROOT,
                           capture_output=True, text=True, env=env(), timeout=300)
    assert again.returncode == 0 and ": start" not in again.stdout and again.stdout.count("already complete, skipped") == 3


@pytest.mark.slow
def test_two_local_workers_give_the_same_logs(tmp_path, synthetic_npz, smoke, capsys):
    from trainer.cli import main

    assert main(trainer_cmd(synthetic_npz, tmp_path, "--workers", "2")[3:]) == 0
    out = capsys.readouterr().out
    assert "grid done (8 complete)" in out
    _, reference_dir, _ = smoke
    assert layout(tmp_path / "smoke") == layout(reference_dir)
    pids = {json.loads(p.read_text())["worker"]["pid"] for p in (tmp_path / "smoke").glob("*/run.json")}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes shared the runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    """A real Ray head node on loopback, stopped afterwards."""
    ray = Path(sys.executable).parent / "ray"
    port = _free_port()
    subprocess.run([str(ray), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env(), timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120)


@pytest.mark.slow
def test_ray_cluster_runs_the_grid_and_retries_a_killed_worker(tmp_path, synthetic_npz, smoke, ray_cluster):
    driver = subprocess.Popen(trainer_cmd(synthetic_npz, tmp_path, "--executor", "ray",
                                          "--ray-address", ray_cluster), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    # Kill the first worker that takes a run's lock, mid-run (the owner record names its pid).
    locks, victim, deadline = tmp_path / "smoke" / ".locks", None, time.time() + 180
    while victim is None and time.time() < deadline and driver.poll() is None:
        for owner in locks.glob("*.owner.json") if locks.is_dir() else []:
            try:
                victim = json.loads(owner.read_text())["pid"], owner.name.removesuffix(".owner.json")
            except (OSError, ValueError):
                continue
            break
        time.sleep(0.05)
    assert victim, "no Ray worker took a run"
    os.kill(victim[0], signal.SIGKILL)
    output = driver.communicate(timeout=300)[0]
    assert driver.returncode == 0, output
    assert "grid done (8 complete)" in output
    assert f"{victim[1]}: taking over from a dead trainer (pid {victim[0]}" in output
    _, reference_dir, _ = smoke
    assert layout(tmp_path / "smoke") == layout(reference_dir)


def test_runs_with_a_session_of_their_own_share_the_cores_and_the_rest_train_alone(monkeypatch):
    """`_run_here` on 2 cores: one-thread runs train side by side; a run that wants both
    cores starts on the one left free, with one thread; a run in the process's pools
    (None: a fused pack, XLA) waits for every shared run and has the machine to itself; a
    shared run that raises fails alone; a finished run's core counts as free at once."""
    import threading
    from types import SimpleNamespace

    from trainer import executors

    wants = {"a": 1, "b": 1, "c": 2, "alone": None, "d": 2, "e": 1, "f": 2}
    events = {name: threading.Event() for name in ("c started", "e finished")}
    active, threads, lock = set(), {}, threading.Lock()

    def own_threads(task):
        if task.exp_dir == "f":  # e has raised: its core is free, though nobody waited for it
            assert events["e finished"].wait(10)
            time.sleep(0.05)
        return wants[task.exp_dir]

    def train_one(task, prepared=None, out=None, max_threads=None):
        name = task.exp_dir
        with lock:
            assert name != "alone" or not active, f"{active} still training beside a run that needs the machine"
            active.add(name)
            threads[name] = max_threads
        try:
            if name == "c":
                events["c started"].set()
            if name == "a":  # still training when c starts: side by side
                assert events["c started"].wait(10)
            if name == "e":
                events["e finished"].set()
                raise RuntimeError("e broke")
            return [{"name": name, "status": "complete"}]
        finally:
            with lock:
                active.discard(name)

    monkeypatch.setattr(executors, "usable_cores", lambda: 2)
    monkeypatch.setattr(executors, "_own_threads", own_threads)
    monkeypatch.setattr(executors, "prepare_task", lambda task: None)
    monkeypatch.setattr(executors, "_ahead", lambda task, upcoming: False)
    monkeypatch.setattr(executors, "train_one", train_one)
    tasks = [executors.Task(SimpleNamespace(runs=[None], run_name=lambda spec, n=name: n), (0,), name)
             for name in wants]
    done = {r["name"]: r for r in executors._run_here(tasks, None)}
    assert sorted(done) == sorted(wants)
    assert done["e"]["status"] == "failed" and "RuntimeError: e broke" in done["e"]["error"]
    assert all(r["status"] == "complete" for name, r in done.items() if name != "e")
    assert threads == {"a": 1, "b": 1, "c": 1, "alone": None, "d": 2, "e": 1, "f": 2}


def test_runs_trained_side_by_side_equal_the_same_runs_trained_one_by_one(tmp_path, synthetic_npz, capsys):
    """Two CNN runs of one-thread sessions, trained by the grid side by side in threads
    that share the cores (`_run_here`), log the same step losses and final results as
    each trained by itself."""
    import textwrap

    import numpy as np
    from tbparse import SummaryReader

    from trainer.cli import main
    from trainer.compiled import train_run
    from trainer.data import load
    from trainer.executors import usable_cores
    from trainer.spec import load_experiment

    path = tmp_path / "pair.toml"
    path.write_text(textwrap.dedent("""
        [data]
        validation = 0.1
        limit = 600
        [run]
        architecture = "cnn"
        hidden = [16]
        epochs = 1
        [grid]
        batch_size = [8, 16]
    """))
    assert main(["--experiment", str(path), "--data", str(synthetic_npz), "--logdir", str(tmp_path / "grid")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run ")]
    if usable_cores() >= 2:
        assert [line.endswith(": start") for line in lines[:2]] == [True, True]  # both started before either ended
    experiment = load_experiment(str(path), data_path=str(synthetic_npz))
    data = load(experiment.dataset, validation=experiment.validation, limit=experiment.limit, path=str(synthetic_npz))
    for spec in experiment.runs:
        name = experiment.run_name(spec)
        together = json.loads((tmp_path / "grid" / "pair" / name / "run.json").read_text())
        assert together["compiled"]["threads"] == 1
        alone = train_run(experiment, spec, data, tmp_path / "alone" / name, max_threads=1)
        assert alone["final"] == together["final"]
        losses = [SummaryReader(str(root / name / "train")).tensors.query("tag == 'step_loss'")["value"].to_numpy()
                  for root in (tmp_path / "grid" / "pair", tmp_path / "alone")]
        np.testing.assert_array_equal(*losses)
