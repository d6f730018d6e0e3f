"""The contract between the stages (contract/): defined once, imported by both, heavier
than nothing but numpy, and never bypassed."""
import ast
import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from contract import layout
from contract.files import read_json_dict, write_atomic, write_json_atomic
from contract.noise import NoiseSchedule, check_examples
from contract.spec import NoiseSettings, RunSpec, SpecError

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("contract", "trainer", "report", "bench")
MAX_LINES = 450


def modules(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).glob("*.py"))


def imported(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_report_never_imports_the_trainer():
    offenders = {p.name: imported(p) & {"trainer"} for p in modules("report")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_contract_imports_only_the_standard_library_and_numpy():
    allowed = set(sys.stdlib_module_names) | {"numpy", "contract", "__future__"}
    assert {p.name: imported(p) - allowed for p in modules("contract") if imported(p) - allowed} == {}


def test_no_module_is_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in modules("contract", "trainer", "report")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_every_tag_file_name_and_status_is_spelled_only_in_the_contract():
    spelled_once = {
        *layout.SCALAR_TAGS, *layout.NOISE_STEP_TAGS, *layout.NOISE_EPOCH_TAGS, layout.NOISE_PREFIX,
        layout.RUN_STATUS_TAG, layout.EXPERIMENT_MANIFEST, layout.RUN_MANIFEST, layout.LOCK_DIR,
        layout.EVENT_FILE_GLOB, *layout.STATUSES,
    }
    found = [f"{p.relative_to(ROOT)}:{line}: {text!r}" for p in modules(*STAGES[1:])
             for line, text in _string_constants(p) if text in spelled_once]
    assert found == []


def test_the_contract_tuples_are_not_written_out_again():
    tuples = {layout.SPLITS, layout.TEMPLATES, layout.FINISHED, layout.EPOCH_METRICS}
    found = []
    for path in modules(*STAGES[1:]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List)) and node.elts and all(
                    isinstance(e, ast.Constant) for e in node.elts):
                if tuple(e.value for e in node.elts) in tuples:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_a_spec_reads_back_from_its_manifest_and_its_hparams():
    spec = RunSpec(hidden=(128, 64), initializer="he_normal", batch_norm=True, learning_rate=0.01,
                   batch_size=256, seed=3)
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    # TensorBoard stores hparams numbers as floats and hidden as text.
    logged = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
              for k, v in spec.hparams().items()}
    assert logged["batch_size"] == 256.0 and logged["hidden"] == "128x64"
    assert RunSpec.from_hparams(logged) == spec
    assert RunSpec.from_hparams({**spec.hparams(), "hidden": "none"}).hidden == ()
    with pytest.raises(SpecError, match="unknown spec field.*colour"):
        RunSpec.from_dict({**spec.to_dict(), "colour": "red"})
    assert spec.row()["hidden"] == (128, 64) and hash(tuple(spec.row().values()))


def test_one_schedule_measures_every_n_examples_and_each_epoch_end_once():
    settings = NoiseSettings(every_examples=40, small_batch=4, batches=3, beta=0.5)
    schedule = NoiseSchedule(settings, examples=100, batch_size=8, seed=0, members=2)
    # 13 steps an epoch; due where the epoch has seen 40 and 80 examples, and at its end.
    assert schedule.due_in_epoch == (5, 10, 13) and schedule.steps_to_due(0) == 5
    assert schedule.plan(4) is None
    rows, one = schedule.plan(5)
    assert rows.shape == (3, 4) and len(set(rows.ravel())) == 12
    assert one.shape == (0,)  # the cosine's batch of the run's size: at epoch ends only
    values = schedule.record(5, [2.0, 3.0], [1.0, 1.0], [0.5, 0.25], alive=[True, False])
    assert values[1] == {} and schedule.measurements == [1, 0] and schedule.epoch_values(1, 0.1) == {}
    g2, trace = (12 * 1.0 - 4 * 2.0) / 8, (2.0 - 1.0) / (1 / 4 - 1 / 12)
    assert values[0][layout.noise_tag(layout.NOISE_G2)] == pytest.approx(g2)
    assert values[0][layout.noise_tag(layout.NOISE_B_SIMPLE)] == pytest.approx(trace / g2)
    assert values[0][layout.noise_tag(layout.NOISE_AT_BATCH)] == pytest.approx(trace / 8)
    assert schedule.plan(5, epoch_end=True) is None  # measured at this step already
    assert schedule.steps_to_due(5) == 5 and schedule.plan(9) is None
    assert schedule.plan(12) is not None  # asked late (an execution of several steps): measured then
    schedule.record(12, [2.0, 3.0], [1.0, 1.0], [0.5, 0.25])
    assert schedule.next_due == 13 and schedule.plan(13)[1].shape == (8,)
    schedule.record(13, [2.0, 3.0], [1.0, 1.0], [0.5, 0.25])
    assert schedule.next_due == 13 + 5  # the next epoch's first
    epoch = schedule.epoch_values(0, 0.125)
    assert epoch[layout.noise_tag(layout.NOISE_ROUGHNESS)] == 0.125
    assert epoch[layout.noise_tag(layout.NOISE_EPOCH_COSINE)] == 0.5
    summary = schedule.summary(0)
    assert summary["measurements"] == 3 and summary["tags"] == list(layout.NOISE_TAGS)
    assert summary["every_examples"] == 40 and summary["measurements_per_epoch"] == 3
    # The same seed draws the same rows, whichever engine asks.
    again = NoiseSchedule(settings, examples=100, batch_size=8, seed=0)
    np.testing.assert_array_equal(again.plan(5)[0], rows)
    # Another probe_seed: other rows, the same ones again with the same probe_seed.
    other = [NoiseSchedule(dataclasses.replace(settings, probe_seed=1), examples=100, batch_size=8, seed=0).plan(5)[0]
             for _ in range(2)]
    np.testing.assert_array_equal(other[0], other[1])
    assert not np.array_equal(other[0], rows)
    assert schedule.summary(0)["probe_seed"] == 0
    with pytest.raises(ValueError, match="needs batches × small_batch = 12 training examples, the data has 11"):
        check_examples(settings, 11)


def test_the_step_gradient_count_covers_only_the_measurements_averaged():
    settings = NoiseSettings(every_examples=40, small_batch=4, batches=3, beta=0.5)
    schedule = NoiseSchedule(settings, examples=100, batch_size=8, seed=0, members=3)
    # Member 1 has diverged, member 2's step gave no finite cross term: only member 0 took it.
    probe = ([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], None, [1.5, 1.5, float("nan")], 8)
    values = schedule.measure(5, alive=[True, False, True], probe=probe)
    assert values[1] == {} and values[0] and values[2]
    assert schedule.measurements == [1, 0, 1] and schedule.crossed == [1, 0, 0]
    assert [schedule.summary(j)["with_step_gradient"] for j in range(3)] == [1, 0, 0]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "report.html", "<p>x</p>")
        write_json_atomic(tmp_path / "run.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("report.html", "run.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode
    assert read_json_dict(tmp_path / "run.json") == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "run.json"]  # no temporary left


def test_json_reads_are_defensive(tmp_path):
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "cut.json").write_text('{"a": ')
    assert [read_json_dict(tmp_path / n) for n in ("list.json", "cut.json", "none.json")] == [None] * 3


def _report(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "report", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}, timeout=600)


def test_the_trainers_fault_points_never_kill_the_report(fixture_logs, tmp_path):
    result = _report(["--logdir", str(fixture_logs), "--out", str(tmp_path / "out"), "--format", "html"],
                     env={"TRAINER_FAULT": "manifest:1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "report.html").is_file()


def test_an_unknown_template_in_experiment_json_exits_2_naming_the_valid_ones(fixture_logs, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(fixture_logs, logs)
    exp = json.loads((logs / layout.EXPERIMENT_MANIFEST).read_text())
    exp["experiment"]["template"] = "poster"
    (logs / layout.EXPERIMENT_MANIFEST).write_text(json.dumps(exp))
    result = _report(["--logdir", str(logs), "--out", str(tmp_path / "out")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'poster'" in result.stderr and "valid templates: lab, task" in result.stderr
    assert not (tmp_path / "out" / "report.pdf").exists()
