"""Fault injection: kills, interrupts, two trainers, a full disk. Real processes, real signals."""
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from trainer.lock import RunLock, try_lock
from contract.layout import FINISHED

ROOT = Path(__file__).resolve().parent.parent
KILL_KINDS = ("random", "manifest", "step", "flush")
KILLS = 3 * len(KILL_KINDS)


def trainer_cmd(npz: Path, logdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "--experiment", "smoke", "--data", str(npz),
            "--logdir", str(logdir), *extra]


def env_with(**extra) -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def start(cmd, **env) -> subprocess.Popen:
    """The trainer, its stderr kept in a file (`stderr_of`) so that a failure says why."""
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env_with(**env))
    proc.errfile = err
    return proc


def stderr_of(proc: subprocess.Popen) -> str:
    proc.errfile.seek(0)
    return proc.errfile.read().decode("utf-8", "replace")[-4000:]


def wait_for_line(proc: subprocess.Popen, needle: str) -> list[str]:
    """Read the trainer's output until a line contains `needle` (or the output ends)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            break
    return lines


def manifests(exp_dir: Path) -> dict[str, dict]:
    """Every run.json under the grid; each must parse, whatever moment the trainer died at."""
    out = {}
    for path in sorted(exp_dir.glob("*/run.json")):
        out[path.parent.name] = json.loads(path.read_text())
    return out


def smoke_packs() -> list[set[str]]:
    """The run names of each pack the fused engine trains together in the smoke grid."""
    from trainer.spec import load_experiment

    exp = load_experiment("smoke")
    return [{exp.run_name(exp.runs[i]) for i in pack} for pack in exp.packs(list(range(len(exp.runs))))]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def assert_steps_exact(run_dir: Path, manifest: dict) -> None:
    """One value per step, steps 1..N for step_loss and 0..E-1 for the epoch scalars."""
    from tbparse import SummaryReader

    for split in ("train", "validation"):
        df = SummaryReader(str(run_dir / split)).tensors
        if split == "train":
            steps = sorted(df.loc[df["tag"] == "step_loss", "step"])
            assert steps == list(range(1, manifest["steps"] + 1)), run_dir.name
        epochs = sorted(df.loc[df["tag"] == "epoch_loss", "step"])
        assert epochs == list(range(manifest["epochs_completed"])), (run_dir.name, split)


def report_structure(exp_dir: Path, out: Path) -> dict:
    """What a report is made of: its table files, their columns and row labels, and its figures."""
    from report.cli import main as report_main

    assert report_main(["--logdir", str(exp_dir), "--out", str(out)]) == 0
    tables = {}
    for csv in sorted((out / "tables").glob("*.csv")):
        df = pd.read_csv(csv)
        tables[csv.name] = (list(df.columns), list(df.iloc[:, 0].astype(str)))
    html = (out / "report.html").read_text()
    return {"tables": tables, "figures": html.count("<figure"), "problems": "Data problems" in html}


@pytest.mark.slow
def test_sigkill_at_any_moment_loses_nothing(tmp_path, synthetic_npz, smoke):
    """12 SIGKILLs, 3 of each kind: at random moments and at named points (mid-step,
    mid-flush, mid-manifest). Each trial starts a fresh trainer (TensorFlow's import and
    compile, ≈13 s), so the count is what keeps the suite under 15 minutes (20 had cost 325 s)."""
    rng = random.Random(6)
    code, reference_dir, _ = smoke
    assert code == 0
    reference = report_structure(reference_dir, tmp_path / "reference-report")
    kills, completions, takeovers, grid = 0, 0, 0, 0
    frozen: dict[str, dict[str, bytes]] = {}
    logdir = tmp_path / "grid0"
    while kills < KILLS:
        kind = KILL_KINDS[kills % len(KILL_KINDS)]
        fault = {} if kind == "random" else {"TRAINER_FAULT": f"{kind}:{rng.randint(1, 6)}"}
        proc = start(trainer_cmd(synthetic_npz, logdir), **fault)
        lines = []
        if kind == "random":
            lines = wait_for_line(proc, ": start")
            time.sleep(rng.uniform(0.0, 2.5))
            proc.kill()
        rest, _ = proc.communicate(timeout=300)
        output = "".join(lines) + rest
        takeovers += "taking over from a dead trainer" in output
        exp_dir = logdir / "smoke"
        found = manifests(exp_dir)
        for run, files in frozen.items():  # finished before this trial: not a byte changed
            assert snapshot(exp_dir / run) == files, f"finished run {run} was modified"
        for run, manifest in found.items():
            if manifest["status"] in FINISHED and run not in frozen:
                assert manifest["status"] == "complete"
                assert_steps_exact(exp_dir / run, manifest)
                frozen[run] = snapshot(exp_dir / run)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            continue
        # Not killed (the named point was never reached): this rerun must finish the grid.
        assert proc.returncode == 0, output + "\nstderr:\n" + stderr_of(proc)
        assert len(found) == 8 and all(m["status"] == "complete" for m in found.values())
        assert report_structure(exp_dir, tmp_path / f"report{grid}") == reference
        completions += 1
        grid += 1
        logdir, frozen = tmp_path / f"grid{grid}", {}
    assert takeovers >= 1  # at least one kill left a run mid-training and a lock behind
    # The last grid, left wherever the last kill stopped it, is finished by one more rerun.
    final = subprocess.run(trainer_cmd(synthetic_npz, logdir), cwd=ROOT, capture_output=True,
                           text=True, env=env_with(), timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    assert report_structure(logdir / "smoke", tmp_path / "report-final") == reference
    print(f"{kills} kills survived, {completions + 1} grids finished")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_marks_the_current_run_and_exits_130(tmp_path, synthetic_npz, sig):
    # Started as a non-interactive shell starts a background job: SIGINT inherited ignored.
    # 200 epochs: a pack trains for seconds, so the signal lands while one is training.
    proc = subprocess.Popen(trainer_cmd(synthetic_npz, tmp_path, "--epochs", "200"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_with(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for_line(proc, "run 2/8")
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    exp_dir = tmp_path / "smoke"
    found = manifests(exp_dir)
    # The pack in training when the signal came is interrupted whole; earlier packs complete.
    packs = smoke_packs()
    interrupted = {run for run, m in found.items() if m["status"] == "interrupted"}
    assert interrupted in packs
    assert {m["status"] for run, m in found.items() if run not in interrupted} <= {"complete"}
    for run in interrupted:
        lock = try_lock(exp_dir, run)  # released on the way out
        assert isinstance(lock, RunLock) and lock.stale_owner is None
        lock.release()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_request_swallowed_by_python_is_not_lost():
    """A signal landing in a `__del__` or weakref callback: Python prints "Exception ignored"
    and drops the KeyboardInterrupt; the recorded request still stops the trainer."""
    from trainer import interrupt

    class SignalsWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    previous = interrupt.install()
    try:
        interrupt.check()  # nothing requested yet
        SignalsWhileCollected()  # collected at once; the handler's exception is swallowed
        assert interrupt.requested() == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            interrupt.check()
    finally:
        interrupt.restore(previous)
    assert signal.getsignal(signal.SIGTERM) == previous[signal.SIGTERM]


@pytest.mark.slow
def test_two_trainers_on_one_log_root_never_train_the_same_run(tmp_path, synthetic_npz):
    procs = [start(trainer_cmd(synthetic_npz, tmp_path)) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    found = manifests(tmp_path / "smoke")
    assert len(found) == 8 and all(m["status"] == "complete" for m in found.values())
    for run in found:
        starts = sum(out.count(f" {run}: start") for out in outputs)
        assert starts == 1, (run, outputs)


def test_a_dead_holders_lock_is_recognised_as_stale(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from trainer.lock import try_lock; "
         "l = try_lock(__import__('pathlib').Path(sys.argv[1]), 'r'); print('locked', flush=True); "
         "time.sleep(60)", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    busy = try_lock(tmp_path, "r")
    assert not isinstance(busy, RunLock) and busy["pid"] == holder.pid
    holder.kill()
    holder.wait()
    lock = try_lock(tmp_path, "r")
    assert isinstance(lock, RunLock) and lock.stale_owner["pid"] == holder.pid
    lock.release()


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG, not death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_disk_full_mid_run_marks_it_failed_and_stops(tmp_path, synthetic_npz):
    """A real write failure: the kernel refuses to grow any file past 20 kB (RLIMIT_FSIZE)."""
    result = subprocess.run(trainer_cmd(synthetic_npz, tmp_path, "--epochs", "20"), cwd=ROOT,
                            capture_output=True, text=True, env=env_with(), timeout=300,
                            preexec_fn=_limit_file_size(20_000))
    assert result.returncode == 2
    assert "could not write its logs (File too large); the grid stopped" in result.stderr
    found = manifests(tmp_path / "smoke")
    assert {m["status"] for m in found.values()} == {"failed"}
    assert set(found) == smoke_packs()[0]  # the first pack, trained together, then the grid stops
    from report.cli import main as report_main
    from report.load import LogsError, load_logs

    with pytest.raises(LogsError, match="status 'failed'"):
        load_logs(tmp_path / "smoke")
    assert report_main(["--logdir", str(tmp_path / "smoke"), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "report.pdf").exists()


def test_grid_larger_than_the_free_space_is_refused_before_training(tmp_path, synthetic_npz, capsys):
    import shutil

    from trainer.cli import main
    from trainer.grid import estimate_bytes
    from trainer.spec import load_experiment

    epochs = 10**9
    needed = estimate_bytes(list(load_experiment("smoke", epochs=epochs).runs), 1200)
    assert needed > shutil.disk_usage(tmp_path).free
    assert main(trainer_cmd(synthetic_npz, tmp_path, "--epochs", str(epochs))[3:]) == 2
    err = capsys.readouterr().err
    assert "MB free; this grid writes about" in err and "--logdir" in err
    assert not list((tmp_path / "smoke").glob("*/run.json"))


def test_estimate_covers_what_a_grid_really_writes(smoke):
    from trainer.grid import estimate_bytes

    _, exp_dir, exp = smoke
    written = sum(p.stat().st_size for p in exp_dir.glob("*/**/*") if p.is_file())
    assert written <= estimate_bytes(list(exp.runs), 1200) <= 4 * written


# --- damaged logs: the report completes, names each damaged run, excludes just those --------

def _event_file(run_dir: Path, split: str) -> Path:
    (path,) = (run_dir / split).glob("events.out.tfevents.*")
    return path


def _damage(logs: Path) -> dict[str, str]:
    """Damage six runs of the fixture logs six ways; return run → words the report must use."""
    import tensorflow as tf

    from tests import make_fixture_logs as fx

    runs = {key: fx.run_name(*key) for key in
            [(64, False, 0), (64, False, 1), (64, True, 0), (64, True, 1), (128, False, 0), (128, False, 1)]}
    truncated = _event_file(logs / runs[64, False, 0], "train")
    truncated.write_bytes(truncated.read_bytes()[:-7])
    _event_file(logs / runs[64, False, 1], "validation").write_bytes(b"")
    _event_file(logs / runs[64, True, 0], "validation").write_bytes(random.Random(1).randbytes(3000))
    (logs / runs[64, True, 1] / "run.json").write_text('{"status": "complete", "spec": ')
    for split in ("train", "validation"):
        _event_file(logs / runs[128, False, 0], split).unlink()
    nan_run = logs / runs[128, False, 1]
    _event_file(nan_run, "validation").unlink()
    with tf.summary.create_file_writer(str(nan_run / "validation")).as_default():
        for epoch in range(fx.EPOCHS):
            tf.summary.scalar("epoch_loss", float("nan") if epoch == 2 else 0.5, step=epoch)
    return {runs[64, False, 0]: "train event file", runs[64, False, 1]: "empty file",
            runs[64, True, 0]: "validation event file", runs[64, True, 1]: "run.json is not readable JSON",
            runs[128, False, 0]: "no readable scalars", runs[128, False, 1]: "non-finite values"}


def test_damaged_logs_are_named_and_excluded_and_the_rest_reported(fixture_logs, tmp_path):
    import shutil

    from report.cli import main as report_main
    from report.load import load_logs
    from tests import make_fixture_logs as fx

    logs = tmp_path / "damaged"
    shutil.copytree(fixture_logs, logs)
    damaged = _damage(logs)
    loaded = load_logs(logs)
    kept = set(loaded.runs["run"])
    untouched = {fx.run_name(bs, bn, seed) for bs in fx.BATCH_SIZES for bn in (False, True)
                 for seed in fx.SEEDS} - set(damaged)
    assert kept == untouched and fx.run_name(*fx.DIVERGED) in kept  # (one of them diverged)
    for run, words in damaged.items():
        named = [p for p in loaded.problems if p.startswith(run + ":")]
        assert named and any(words in p for p in named), (run, loaded.problems)
        assert any("run excluded" in p for p in named)
    # The numbers of what is left are the fixture's, untouched by the damage elsewhere.
    final = loaded.scalars[(loaded.scalars["run"] == fx.run_name(128, True, 0)) &
                           (loaded.scalars["split"] == "train") & (loaded.scalars["tag"] == "epoch_loss")]
    assert final.sort_values("step")["value"].iloc[-1] == pytest.approx(fx.train_loss(2, 128, True, 0))
    out = tmp_path / "out"
    assert report_main(["--logdir", str(logs), "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "Data problems" in html
    for run in damaged:
        assert run in html


def test_truncation_at_a_record_boundary_is_caught_by_the_step_count(fixture_logs, tmp_path):
    import shutil

    import tensorflow as tf

    from report.load import load_logs
    from tests import make_fixture_logs as fx

    logs = tmp_path / "cut"
    shutil.copytree(fixture_logs, logs)
    run = fx.run_name(64, False, 0)
    path = _event_file(logs / run, "train")
    records = list(tf.compat.v1.io.tf_record_iterator(str(path)))
    with tf.io.TFRecordWriter(str(path)) as writer:  # a clean file that just stops early
        for record in records[:len(records) // 2]:
            writer.write(record)
    loaded = load_logs(logs)
    assert run not in set(loaded.runs["run"])
    assert any(p.startswith(run + ": logs hold") and "run.json says" in p for p in loaded.problems)
