"""The report from seeded fixture logs: exact numbers, numbering, PDF text, hostile input."""
import json
import re
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from report.cli import main
from report.figures import smooth
from report.load import load_logs
from tests import make_fixture_logs as fx


@pytest.fixture(scope="module")
def rendered(fixture_logs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["--logdir", str(fixture_logs), "--out", str(out)]) == 0
    return out


def pdf_text(path: Path) -> str:
    from pypdf import PdfReader

    return "\n".join(page.extract_text() for page in PdfReader(str(path)).pages)


def table_csv(out: Path, key_part: str) -> pd.DataFrame:
    matches = sorted((out / "tables").glob(f"*{key_part}*.csv"))
    assert matches, key_part
    return pd.read_csv(matches[0])


def test_loader_reads_long_format_and_factors_from_manifests(fixture_logs):
    logs = load_logs(fixture_logs)
    assert list(logs.scalars.columns) == ["run", "split", "tag", "step", "value"]
    assert len(logs.runs) == 12
    assert set(logs.runs["batch_size"]) == {64, 128}
    steps = logs.scalars[(logs.scalars["tag"] == "step_loss") & (logs.scalars["run"] == fx.run_name(64, False, 0))]
    assert steps["step"].tolist() == list(range(1, 3 * fx.N_TRAIN // 64 + 1))
    assert any(fx.MISSING_RUN in p for p in logs.problems)


def test_train_loss_table_is_mean_std_n_of_final_epochs(rendered):
    df = table_csv(rendered, "train_loss_all_bs64")
    for bn, label in ((False, "Without batch norm"), (True, "With batch norm")):
        values = fx.expected_final("train", 64, bn)
        row = df[df["setting"] == label].iloc[0]
        assert row["mean"] == pytest.approx(statistics.mean(values), rel=1e-6)
        assert row["std"] == pytest.approx(statistics.stdev(values), rel=1e-5)
        assert row["n"] == 3
        half = stats.t.ppf(0.975, 2) * statistics.stdev(values) / 3 ** 0.5
        assert row["ci_low"] == pytest.approx(statistics.mean(values) - half, rel=1e-6)
        assert row["ci_high"] == pytest.approx(statistics.mean(values) + half, rel=1e-6)


def test_diverged_seed_is_left_out_and_marked(rendered):
    df = table_csv(rendered, "train_loss_all_bs128")
    row = df[df["setting"] == "With batch norm"].iloc[0]
    assert row["n"] == 2 and row["diverged"] == 1
    assert row["mean"] == pytest.approx(statistics.mean(fx.expected_final("train", 128, True)), rel=1e-6)
    html = (rendered / "report.html").read_text()
    assert "[1 diverged]" in html
    assert "Data problems" in html and fx.run_name(*fx.DIVERGED) in html and fx.MISSING_RUN in html


def test_batch_size_comparison_table(rendered):
    df = table_csv(rendered, "val_loss_by_batch_size")
    # bs 256 was planned but has no logs: its cells are present and empty
    missing = df[df["batch_size"].astype(str) == "256"]
    assert len(missing) == 2 and (missing["n"] == 0).all() and missing["mean"].isna().all()
    html = (rendered / "report.html").read_text()
    assert re.search(r"<td>256</td><td class=\"num\">—</td><td class=\"num\">—</td>", html)
    row = df[(df["batch_size"].astype(str) == "128") & (df["batch_norm"].astype(str) == "False")].iloc[0]
    assert row["mean"] == pytest.approx(statistics.mean(fx.expected_final("validation", 128, False)), rel=1e-6)


def test_figures_and_tables_are_numbered_in_order_with_document_captions(rendered):
    html = (rendered / "report.html").read_text()
    figures = [int(n) for n in re.findall(r"<figcaption>Figure (\d+):", html)]
    tables = [int(n) for n in re.findall(r'<div class="caption">Table (\d+):', html)]
    assert figures == list(range(1, len(figures) + 1)) and len(figures) >= 6
    assert tables == list(range(1, len(tables) + 1))
    assert "Figure 1: Batch size 64 train loss" in html
    assert "Figure 2: Batch size 64 val loss" in html
    assert re.search(r"Table 3: Train Loss \(final epoch", html)
    assert re.search(r"Table 4: Val loss \(final epoch", html)
    # Findings (section 2) is filled last but its table is numbered first, and what it
    # names is the table that holds the number.
    assert re.search(r'<h2 id="sec-2">2 Findings</h2>.*?Table 1: Resolved effects', html, re.S)
    assert "⟦" not in html
    assert html.count("<th>Loss</th><th>Loss Value</th>") >= 4
    assert "Batch Size Comparison" in html
    # one CSV per table, named by its number
    assert len(list((rendered / "tables").glob("table*.csv"))) == len(tables)


def test_pdf_text_has_the_captions_and_the_same_numbers(rendered):
    text = pdf_text(rendered / "report.pdf")
    html = (rendered / "report.html").read_text()
    for caption in re.findall(r"<figcaption>(Figure \d+: [^<]+)</figcaption>", html)[:4]:
        assert caption.split(";")[0] in text.replace("\n", " ")
    mean = statistics.mean(fx.expected_final("train", 64, False))
    assert f"{mean:.4f}" in text
    assert "Fixture lab" in text and "A. Student" in text and "ID-1" in text


def test_sentences_are_computed_and_qualified(rendered):
    html = (rendered / "report.html").read_text()
    # BN lowers the loss by 0.05–0.058 in every fixture cell: resolved at batch 64 (3 pairs),
    # not at 128, where the diverged seed leaves 2 pairs and t(0.975, 1) = 12.7.
    assert "With batch norm, the final epoch train loss was lower than without it: −0.0540" in html
    assert "The final epoch validation loss difference, with batch norm − without it, was not resolved" in html
    assert ("Across 2 batch sizes, batch norm lowered the final epoch validation loss at 1 (64) and raised it "
            "at 0") in html


def test_summary_best_and_last_k_are_named_and_applied(fixture_logs, tmp_path):
    assert main(["--logdir", str(fixture_logs), "--out", str(tmp_path), "--summary", "last-2",
                 "--format", "html"]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "Train Loss (mean of the last 2 epochs;" in html
    df = table_csv(tmp_path, "train_loss_all_bs64")
    want = statistics.mean(
        statistics.mean([fx.train_loss(e, 64, False, s) for e in (1, 2)]) for s in fx.SEEDS)
    assert df[df["setting"] == "Without batch norm"]["mean"].item() == pytest.approx(want, rel=1e-6)
    assert not (tmp_path / "report.pdf").exists()


def test_task_template_has_the_five_sections(fixture_logs, tmp_path):
    assert main(["--logdir", str(fixture_logs), "--out", str(tmp_path), "--template", "task",
                 "--format", "html"]) == 0
    html = (tmp_path / "report.html").read_text()
    heads = re.findall(r"<h2[^>]*>\d+ ([^<]+)</h2>", html)
    assert heads[:6] == ["Objective", "Findings", "Code Used", "Results", "Short Analysis", "Key Takeaway"]
    assert "Fixture objective." in html and "batch_size = [64, 128]" in html
    assert "Per-epoch results, without batch norm, batch size 64" in html


def test_smoothing_is_tensorboards_debiased_ema():
    w = 0.6
    ys = [1.0, float("nan"), 3.0, 2.0]
    out = smooth(ys, w)
    # by hand: last=0.4 → 0.4/0.4; skip NaN; last=0.24+1.2=1.44 → /(1-0.36); last=0.864+0.8 → /(1-0.216)
    assert out[0] == pytest.approx(1.0)
    assert out[1] != out[1]
    assert out[2] == pytest.approx(1.44 / 0.64)
    assert out[3] == pytest.approx((1.44 * 0.6 + 0.8) / (1 - 0.6 ** 3))


def test_bad_options_name_the_valid_values(fixture_logs, capsys):
    assert main(["--logdir", str(fixture_logs), "--format", "docx", "--summary", "median",
                 "--template", "fancy"]) == 2
    err = capsys.readouterr().err
    assert "valid values: pdf, html" in err and "final, best, last-K" in err and "lab, task" in err


def test_missing_logdir_names_the_fix(tmp_path, capsys):
    assert main(["--logdir", str(tmp_path / "lab3-mnist")]) == 2
    assert f"make train EXPERIMENT=lab3-mnist LOGDIR={tmp_path}" in capsys.readouterr().err


def test_hostile_strings_are_inert(fixture_logs, tmp_path):
    logs = tmp_path / "hostile"
    shutil.copytree(fixture_logs, logs)
    exp = json.loads((logs / "experiment.json").read_text())
    exp["experiment"]["title"] = '<script>alert(1)</script><img src="file:///etc/passwd"> {{ 7*7 }}'
    exp["experiment"]["author"] = '<img src="http://127.0.0.1:9/x">'
    (logs / "experiment.json").write_text(json.dumps(exp))
    exp["experiment"]["id"] = "nul\x00esc\x1b[31m"
    exp["experiment"]["date"] = "x" * 100_000
    (logs / "experiment.json").write_text(json.dumps(exp))
    weird = logs / "<i>run<i>..%2e%2e\x07"
    shutil.copytree(logs / fx.run_name(64, False, 0), weird)
    manifest = json.loads((weird / "run.json").read_text())
    manifest["spec"]["initializer"] = "../../../tmp/<b>pwn</b>"
    (weird / "run.json").write_text(json.dumps(manifest))
    import tensorflow as tf

    with tf.summary.create_file_writer(str(weird / "train")).as_default():
        tf.summary.scalar("<script>x</script>/../../tag", 1.0, step=0)
    before = sorted(p for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    assert main(["--logdir", str(logs), "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "<script>" not in html and '<img src="file:' not in html and '<img src="http' not in html
    assert "<b>pwn" not in html and "&lt;b&gt;pwn" in html
    assert "&lt;script&gt;" in html and "{{ 7*7 }}" in html and "&lt;i&gt;run&lt;i&gt;..%2e%2e" in html
    assert "\x00" not in html and "\x1b" not in html and "\x07" not in html and "nul\ufffdesc" in html
    assert "x" * 300 not in html  # the 100,000-character date is cut
    assert sorted(p.name for p in out.iterdir()) == [".cache", "report.html", "report.pdf", "tables"]
    # Confined: the only new files are the report's own, none outside --out.
    after = sorted(p for p in tmp_path.rglob("*"))
    assert [p for p in after if p not in before and out not in p.parents and p != out] == []
    assert all(p.parent == out / "tables" for p in (out / "tables").rglob("*"))
    cache = out / ".cache"
    assert all((p.parent == cache and p.suffix == ".npz") or p == cache / "figures" or
               (p.parent == cache / "figures" and p.suffix == ".svg") for p in cache.rglob("*"))
    assert "root:" not in pdf_text(out / "report.pdf")


def test_pdf_renderer_fetches_no_file_and_no_url():
    from report.render import render_pdf

    html = ('<p>x</p><img src="file:///etc/passwd"><img src="http://127.0.0.1:9/a.png">'
            '<link rel="stylesheet" href="file:///etc/hostname">')
    pdf, refused = render_pdf(html)
    assert pdf.startswith(b"%PDF")
    assert set(refused) == {"file:///etc/passwd", "http://127.0.0.1:9/a.png", "file:///etc/hostname"}


@pytest.mark.slow
def test_real_smoke_experiment_end_to_end(smoke, tmp_path):
    from tbparse import SummaryReader

    code, exp_dir, exp = smoke
    assert code == 0
    out = tmp_path / "smoke"
    assert main(["--logdir", str(exp_dir), "--out", str(out)]) == 0
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")
    df = SummaryReader(str(exp_dir / exp.run_name(exp.runs[0]) / "validation")).tensors
    final = df[df["tag"] == "epoch_loss"].sort_values("step")["value"].iloc[-1]
    text = pdf_text(out / "report.pdf")
    assert f"{final:.4f}" in text
    assert "8 runs" in text


def rewrite_validation(run_dir: Path) -> None:
    """Replace a run's validation event file with one holding other values (9, 10, 11, ...)."""
    import tensorflow as tf

    (old,) = (run_dir / "validation").glob("events.out.tfevents.*")
    old.unlink()
    with tf.summary.create_file_writer(str(run_dir / "validation")).as_default():
        for epoch in range(fx.EPOCHS):
            tf.summary.scalar("epoch_loss", 9.0 + epoch, step=epoch)
            tf.summary.scalar("epoch_accuracy", 0.5, step=epoch)


def figure_sources(context: dict) -> list[str]:
    return [b["src"] for sec in context["sections"] for block in sec.blocks
            for b in (block["blocks"] if block["kind"] == "row" else [block]) if b["kind"] == "figure"]


def test_figure_cache_redraws_only_figures_whose_data_changed(fixture_logs, tmp_path):
    from report.build import build
    from report.figures import FigureCache

    logs, folder = tmp_path / "logs", tmp_path / "figures"
    shutil.copytree(fixture_logs, logs)
    first_cache = FigureCache(folder)
    first = build(load_logs(logs), template="lab", figure_cache=first_cache)
    n = first["n_figures"]
    assert n > 3 and (first_cache.hits, first_cache.misses) == (0, n)
    warm_cache = FigureCache(folder)
    warm = build(load_logs(logs), template="lab", figure_cache=warm_cache)
    assert (warm_cache.hits, warm_cache.misses) == (n, 0)
    # A cached figure is the very SVG a fresh drawing gives.
    assert figure_sources(warm) == figure_sources(build(load_logs(logs), template="lab")) == figure_sources(first)
    rewrite_validation(logs / fx.run_name(64, True, 0))
    changed_cache = FigureCache(folder)
    changed = build(load_logs(logs), template="lab", figure_cache=changed_cache)
    assert 0 < changed_cache.misses < n and changed_cache.hits + changed_cache.misses == n
    assert figure_sources(changed) == figure_sources(build(load_logs(logs), template="lab"))
    assert figure_sources(changed) != figure_sources(first)
    assert len(list(folder.glob("*.svg"))) == len(set(figure_sources(changed)))  # stale ones pruned


def test_parse_cache_reuses_unchanged_files_and_reparses_changed_ones(fixture_logs, tmp_path):
    import subprocess
    import sys

    logs, cache = tmp_path / "logs", tmp_path / "cache"
    shutil.copytree(fixture_logs, logs)
    cold = load_logs(logs, cache_dir=cache)
    n_files = len(list(logs.glob("*/*/events.out.tfevents.*")))
    assert (cold.cache_hits, cold.cache_misses) == (0, n_files)
    warm = load_logs(logs, cache_dir=cache)
    assert (warm.cache_hits, warm.cache_misses) == (n_files, 0)
    pd.testing.assert_frame_equal(warm.scalars, cold.scalars)
    assert warm.problems == cold.problems
    # Warm, in a fresh process: neither tbparse nor TensorFlow is imported at all.
    probe = ("import sys; from report.load import load_logs; "
             f"l = load_logs({str(logs)!r}, cache_dir={str(cache)!r}); "
             "print(l.cache_hits, 'tensorflow' in sys.modules, 'tbparse' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(n_files), "False", "False"]
    # Rewrite one run's validation file with other values: only that file is parsed again.
    run = fx.run_name(64, True, 0)
    rewrite_validation(logs / run)
    changed = load_logs(logs, cache_dir=cache)
    assert (changed.cache_hits, changed.cache_misses) == (n_files - 1, 1)
    s = changed.scalars
    assert s[(s["run"] == run) & (s["split"] == "validation") & (s["tag"] == "epoch_loss")]["value"].max() == 11.0
    assert len(list(cache.glob("*.npz"))) == n_files  # the replaced file's entry is pruned
    # A damaged file's verdict is cached too, and still reported.
    (victim,) = (logs / run / "train").glob("events.out.tfevents.*")
    victim.write_bytes(victim.read_bytes()[:-5])
    for _ in range(2):
        assert any(p.startswith(run + ": train event file") for p in load_logs(logs, cache_dir=cache).problems)


def test_title_block_follows_the_experiment_file_as_it_is_now(fixture_logs, tmp_path):
    """An author added to the TOML after training shows without retraining; the command
    line's options win over both."""
    logs = tmp_path / "logs"
    shutil.copytree(fixture_logs, logs)
    toml = tmp_path / "exp.toml"
    toml.write_text('[experiment]\ntitle = "Fixture lab"\nauthor = "Added Later"\nid = "S-7"\n')
    manifest = json.loads((logs / "experiment.json").read_text())
    manifest["experiment"]["source"] = str(toml)
    (logs / "experiment.json").write_text(json.dumps(manifest))
    assert main(["--logdir", str(logs), "--out", str(tmp_path / "a"), "--format", "html"]) == 0
    html = (tmp_path / "a" / "report.html").read_text()
    assert "<div>Added Later</div>" in html and "<div>S-7</div>" in html and "A. Student" not in html
    assert main(["--logdir", str(logs), "--out", str(tmp_path / "b"), "--format", "html",
                 "--author", "Ana Lima", "--date", "2026-01-02"]) == 0
    html = (tmp_path / "b" / "report.html").read_text()
    assert "<div>Ana Lima</div>" in html and "<div>2026-01-02</div>" in html and "<div>S-7</div>" in html


def test_each_preset_shape_follows_its_document(fixture_logs, tmp_path):
    """002 (`results`): one row per batch size with loss, accuracy, val_loss, val_accuracy.
    003 (a lab grid with no initializer axis): no heading for an axis that does not vary,
    and a "Batch Size · Validation Accuracy" table with and without batch norm."""
    assert main(["--logdir", str(fixture_logs), "--out", str(tmp_path / "r"), "--template", "results",
                 "--format", "html"]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert "<th>Setting</th><th>loss</th><th>accuracy</th><th>val_loss</th><th>val_accuracy</th>" in html
    assert "Per-epoch results" not in html  # no per-epoch tables (200 epochs would be 85 pages)
    df = table_csv(tmp_path / "r", "_results")
    row = df[(pd.to_numeric(df["batch_size"], errors="coerce") == 64) & (df["batch_norm"].astype(str) == "False")
             & (df["metric"] == "val_loss")].iloc[0]
    assert row["mean"] == pytest.approx(statistics.mean(fx.expected_final("validation", 64, False)), rel=1e-6)
    assert main(["--logdir", str(fixture_logs), "--out", str(tmp_path / "l"), "--format", "html"]) == 0
    html = (tmp_path / "l" / "report.html").read_text()
    heads = re.findall(r"<h2[^>]*>\d+ ([^<]+)</h2>", html)
    assert "Results" in heads and not any("weight initialization" in h for h in heads)
    assert re.search(r"Table \d+: Batch Size · Validation Accuracy", html)
    assert "<th>Batch size</th><th>Without batch norm</th><th>With batch norm</th>" in html
