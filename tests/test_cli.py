"""The command lines a careful user can trust: nothing destroyed that was not asked for,
nothing stale presented as final, every misuse answered with its fix (exit 2)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contract.layout import EXPERIMENT_MANIFEST, RUN_MANIFEST
from trainer.clean import main as clean

ROOT = Path(__file__).resolve().parent.parent


def experiment_logs(root: Path, name: str, runs=("a", "b")) -> Path:
    folder = root / name
    for run in runs:
        (folder / run / "train").mkdir(parents=True)
        (folder / run / RUN_MANIFEST).write_text("{}")
    (folder / EXPERIMENT_MANIFEST).write_text(json.dumps({"runs": list(runs)}))
    return folder


def report_folder(root: Path, name: str) -> Path:
    (root / name / "tables").mkdir(parents=True)
    (root / name / "report.html").write_text("<p>")
    return root / name


def test_clean_removes_one_experiment_and_says_so(tmp_path, capsys):
    logs, reports = tmp_path / "logs", tmp_path / "reports"
    lab, smoke = experiment_logs(logs, "lab"), experiment_logs(logs, "smoke")
    report_folder(reports, "lab")
    assert clean(["--logdir", str(logs), "--reports", str(reports), "--experiment", "lab"]) == 0
    assert not lab.exists() and smoke.is_dir() and not (reports / "lab").exists() and logs.is_dir()
    out = capsys.readouterr().out
    assert f"removed {lab}" in out and f"removed {reports / 'lab'}" in out


def test_clean_all_removes_only_what_the_project_made(tmp_path, capsys):
    logs, reports = tmp_path / "logs", tmp_path / "reports"
    experiment_logs(logs, "lab"), experiment_logs(logs, "smoke")
    (logs / "notes").mkdir()
    (logs / "notes" / "mine.txt").write_text("keep")
    report_folder(reports, "lab")
    assert clean(["--logdir", str(logs), "--reports", str(reports), "--all"]) == 0
    assert sorted(p.name for p in logs.iterdir()) == ["notes"] and list(reports.iterdir()) == []
    assert f"left alone {logs / 'notes'}" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["project", "parent", "root"])
def test_clean_refuses_the_project_its_parents_and_root(where, capsys):
    logdir = {"project": ROOT, "parent": ROOT.parent, "root": Path("/")}[where]
    before = sorted(p.name for p in ROOT.iterdir())
    assert clean(["--logdir", str(logdir), "--reports", "reports", "--all"]) == 2
    assert clean(["--logdir", str(logdir), "--reports", "reports", "--experiment", "trainer"]) == 2
    assert "refused" in capsys.readouterr().err and sorted(p.name for p in ROOT.iterdir()) == before


def test_clean_refuses_a_folder_the_trainer_did_not_make(tmp_path, capsys):
    (tmp_path / "lab" / "data").mkdir(parents=True)
    assert clean(["--logdir", str(tmp_path), "--reports", str(tmp_path / "r"), "--experiment", "lab"]) == 2
    assert "no readable experiment.json" in capsys.readouterr().err and (tmp_path / "lab" / "data").is_dir()
    lab = experiment_logs(tmp_path / "logs", "lab")
    (lab / "thesis.tex").write_text("mine")
    assert clean(["--logdir", str(tmp_path / "logs"), "--reports", str(tmp_path / "r"), "--experiment", "lab"]) == 2
    assert "thesis.tex" in capsys.readouterr().err and (lab / "thesis.tex").is_file()
    assert clean(["--logdir", str(tmp_path / "logs"), "--reports", str(tmp_path), "--experiment", "../x"]) == 2


def test_make_clean_with_logdir_dot_deletes_nothing(tmp_path):
    """The report of issue 18: `make clean LOGDIR=.` used to delete the source folders."""
    copy = tmp_path / "project"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in files + ["trainer/clean.py", "contract/layout.py", "contract/files.py", "contract/__init__.py"]:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    result = subprocess.run(["make", "clean", "LOGDIR=.", f"PYTHON={sys.executable}", "VENV=none"],
                            cwd=copy, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "refused" in result.stderr
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before
    experiment_logs(copy / "logs", "lab")
    result = subprocess.run(["make", "clean", f"PYTHON={sys.executable}", "VENV=none"], cwd=copy,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not (copy / "logs" / "lab").exists() and (copy / "trainer").is_dir()


def test_make_help_lists_every_target_and_variable_without_stray_lines():
    out = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True).stdout
    for target in ("train", "report", "test", "bench", "bench-report", "bench-noise", "tensorboard", "clean"):
        assert f"make {target} " in out
    for var in ("SUMMARY", "SMOOTHING", "TEMPLATE", "TARGET_LOSS", "REPORTS", "CONFIRM", "PORT", "HOST",
                "STRICT", "ALL", "WORKERS", "SHARD"):
        assert var in out, var
    assert all(not line.startswith("  make  ") for line in out.splitlines())
    dry = subprocess.run(["make", "-n", "-o", ".venv/.installed-stamp", "report", "tensorboard", "PORT=7007"],
                         cwd=ROOT, capture_output=True, text=True).stdout
    assert "--port 7007" in dry and all(line.strip() != "\\" for line in dry.splitlines())


def _report(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "report", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_an_unfinished_grid_makes_a_draft_and_final_refuses_it(fixture_logs, tmp_path):
    # The fixture's grid lists a run that has no logs.
    result = _report("--logdir", str(fixture_logs), "--out", str(tmp_path / "draft"), "--format", "html")
    assert result.returncode == 0
    assert "draft: 1 run(s) of the grid are not finished: init=glorot_normal,bs=256,bn=off,seed=0 (missing)" \
        in result.stderr
    html = (tmp_path / "draft" / "report.html").read_text()
    assert "DRAFT: 1 of 13 runs of the grid are not finished (1 missing)" in html
    assert '@bottom-left { content: "DRAFT: grid not finished"' in html
    final = _report("--logdir", str(fixture_logs), "--out", str(tmp_path / "final"), "--final")
    assert final.returncode == 1 and "nothing was written" in final.stderr
    assert not (tmp_path / "final").exists()


def test_a_finished_grid_is_no_draft(smoke, tmp_path):
    code, logdir, _ = smoke
    result = _report("--logdir", str(logdir), "--out", str(tmp_path / "out"), "--format", "html", "--final")
    assert code == 0 and result.returncode == 0, result.stderr
    assert "DRAFT" not in (tmp_path / "out" / "report.html").read_text()
    # TensorFlow's start-up lines stay off the terminal.
    assert "I0000" not in result.stderr and "cuInit" not in result.stderr and "absl" not in result.stderr


def test_out_naming_a_file_is_refused(fixture_logs, tmp_path):
    (tmp_path / "taken").write_text("mine")
    result = _report("--logdir", str(fixture_logs), "--out", str(tmp_path / "taken"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is a file, not a folder" in result.stderr and (tmp_path / "taken").read_text() == "mine"


def test_report_hints_name_the_log_root_and_only_real_presets(tmp_path):
    missing = _report("--logdir", str(tmp_path / "runs" / "lab"))
    assert missing.returncode == 2 and f"make train EXPERIMENT=lab LOGDIR={tmp_path / 'runs'}" in missing.stderr
    (tmp_path / "mystudy").mkdir()
    empty = _report("--logdir", str(tmp_path / "mystudy"))
    assert empty.returncode == 2 and "'mystudy' is no preset" in empty.stderr and "presets: " in empty.stderr


def test_a_failed_run_is_reported_with_its_recorded_error(fixture_logs, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(fixture_logs, logs)
    run = next(p for p in sorted(logs.iterdir()) if p.is_dir())
    manifest = json.loads((run / RUN_MANIFEST).read_text())
    manifest.update(status="failed", error="OSError: [Errno 28] No space left on device")
    (run / RUN_MANIFEST).write_text(json.dumps(manifest))
    result = _report("--logdir", str(logs), "--out", str(tmp_path / "out"), "--format", "html")
    assert result.returncode == 0
    assert f"{run.name} (failed)" in result.stderr
    assert "not finished: OSError: [Errno 28] No space left on device" in (tmp_path / "out" / "report.html").read_text()


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_a_limit_too_small_for_the_noise_probe_is_refused_before_anything_is_written(synthetic_npz, tmp_path):
    result = _train("-e", "smoke", "--data", str(synthetic_npz), "--limit", "500", "--logdir", str(tmp_path / "l"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    from contract.spec import NoiseSettings

    d = NoiseSettings()  # 512 examples: over the limit
    assert "needs" not in result.stdout
    assert f"batches × small_batch = {d.batches} × {d.small_batch} = 512" in result.stderr
    assert "Raise the limit to at least 512" in result.stderr and not (tmp_path / "l").exists()
    assert "I0000" not in result.stderr and "cuInit" not in result.stderr


def test_a_batch_as_large_as_the_data_is_warned_about(synthetic_npz, tmp_path):
    exp = tmp_path / "big.toml"
    exp.write_text('[run]\nepochs = 1\n[grid]\nbatch_size = [64, 2000]\n[gradient_noise]\nenabled = false\n')
    result = _train("-e", str(exp), "--data", str(synthetic_npz), "--logdir", str(tmp_path / "l"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: batch size 2000 ≥ the 1080 training examples" in result.stdout


def test_an_offline_mnist_preset_names_fashion_mnist_as_the_way_out(tmp_path):
    result = _train("-e", "smoke", "--dataset", "mnist", "--no-download", "--logdir", str(tmp_path / "l"))
    assert result.returncode == 2 and "--dataset fashion_mnist (make DATASET=fashion_mnist)" in result.stderr
    assert not (tmp_path / "l").exists()


def test_characters_no_font_covers_are_named_before_the_pdf_shows_boxes(fixture_logs, tmp_path):
    from report.render import missing_glyphs

    logs = tmp_path / "logs"
    shutil.copytree(fixture_logs, logs)
    exp = json.loads((logs / EXPERIMENT_MANIFEST).read_text())
    exp["experiment"]["author"] = "李华 😀 Zoë"
    (logs / EXPERIMENT_MANIFEST).write_text(json.dumps(exp))
    expected = missing_glyphs("李华😀Zoë")
    assert "Z" not in expected and "ë" not in expected  # DejaVu covers Latin
    result = _report("--logdir", str(logs), "--out", str(tmp_path / "out"), "--format", "pdf")
    assert result.returncode == 0
    if shutil.which("fc-list") and expected:
        assert f"no installed font has {len(expected)} character(s)" in result.stderr
        assert all(c in result.stderr for c in expected) and "fonts-noto-cjk" in result.stderr
    else:
        assert "no installed font" not in result.stderr
