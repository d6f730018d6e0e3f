"""Intervals, tests and the sentences computed from them (report/stats.py, report/analysis.py,
the Findings section), checked against scipy.stats and against grids whose effects are
known in advance; plus the report options that shape what a reader sees (smoothing in
captions, stale outputs, the title block, the experiment file as it ran)."""
from __future__ import annotations

import html as htmllib
import json
import math
import re
import shutil
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from report import stats
from report.cli import main
from tests import make_fixture_logs as fx

NUMBER = re.compile(r"[−+-]?\d+\.\d+")
DIRECTION_WORDS = re.compile(r"lower than|higher than|\brose\b|\bfell\b")


def T975(df: int) -> float:
    return float(sps.t.ppf(0.975, df))


def f32(x: float) -> float:
    """A value as it comes back from a TensorBoard scalar (stored as float32)."""
    return float(np.float32(x))


def signed(x: float) -> str:
    """The report's signed format, written out here independently of report.analysis."""
    return f"{x:+.4f}".replace("-", "\u2212")


# -- 1. every interval and p-value is scipy's --------------------------------------------


def test_estimate_half_width_is_the_t_interval_of_the_mean():
    values = [0.3, 0.35, 0.41, 0.28]
    e = stats.estimate(values + [float("nan"), float("inf")])  # non-finite values are left out
    s = float(np.std(values, ddof=1))
    assert e.n == 4
    assert e.mean == pytest.approx(float(np.mean(values)), abs=1e-12)
    assert e.std == pytest.approx(s, abs=1e-12)
    assert e.half == pytest.approx(T975(3) * s / math.sqrt(4), abs=1e-9)
    low, high = sps.t.interval(0.95, 3, loc=np.mean(values), scale=sps.sem(values))
    assert (e.low, e.high) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))
    for n in (2, 3, 7):
        vals = [0.1 * i + 0.013 * i * i for i in range(n)]
        assert stats.estimate(vals).half == pytest.approx(
            T975(n - 1) * float(np.std(vals, ddof=1)) / math.sqrt(n), abs=1e-9)
    one = stats.estimate([0.5])
    assert one.n == 1 and math.isnan(one.half) and math.isnan(one.low) and math.isnan(one.high)
    assert stats.estimate([]).n == 0


def test_cell_text_is_mean_plus_minus_half_width_with_n():
    from report.tables import Cell, cell_record

    values = [0.37, 0.36, 0.381]
    c = Cell(mean=float(np.mean(values)), std=float(np.std(values, ddof=1)), n=3)
    half = T975(2) * np.std(values, ddof=1) / math.sqrt(3)
    assert c.half == pytest.approx(half, abs=1e-12)
    assert c.text() == f"{np.mean(values):.4f} ± {half:.4f} (n=3)"
    rec = cell_record({"setting": "x"}, c)
    assert rec["ci_low"] == pytest.approx(np.mean(values) - half, abs=1e-12)
    assert rec["ci_high"] == pytest.approx(np.mean(values) + half, abs=1e-12)
    assert Cell(mean=0.5, n=1).text() == "0.5000"  # one seed: no ± at all


def test_paired_uses_shared_keys_only_and_matches_ttest_rel():
    a = {0: 1.00, 1: 2.00, 2: 3.50, 3: 9.00, 4: float("nan")}
    b = {0: 0.80, 1: 1.70, 2: 3.05, 4: 1.00, 7: 100.0}
    c = stats.paired(a, b, what="final epoch validation loss", label="x")
    keys = [0, 1, 2]  # 3 and 7 are in one side only; 4 is not finite in a
    x = np.array([a[k] for k in keys])
    y = np.array([b[k] for k in keys])
    d = y - x
    half = T975(2) * d.std(ddof=1) / math.sqrt(3)
    assert c.n == 3 and c.kind == "paired"
    assert c.diff == pytest.approx(d.mean(), abs=1e-9)
    assert c.low == pytest.approx(d.mean() - half, abs=1e-9)
    assert c.high == pytest.approx(d.mean() + half, abs=1e-9)
    assert c.p == pytest.approx(float(sps.ttest_rel(y, x).pvalue), abs=1e-9)
    assert c.baseline == pytest.approx(x.mean(), abs=1e-12)
    assert c.tested
    # Order of arguments: the difference is b − a.
    rev = stats.paired(b, a, what="w", label="x")
    assert rev.diff == pytest.approx(-c.diff, abs=1e-12) and rev.p == pytest.approx(c.p, abs=1e-12)
    # One shared key: a difference but no interval and no test; none shared: None.
    single = stats.paired({0: 1.0, 1: 2.0}, {1: 2.5, 9: 0.0}, what="w", label="x")
    assert single.n == 1 and single.diff == pytest.approx(0.5) and not single.tested
    assert math.isnan(single.low) and math.isnan(single.p)
    assert stats.paired({0: 1.0}, {1: 1.0}, what="w", label="x") is None


def test_slope_is_linregress_against_log2_batch_size():
    points = [(32, 0.50), (64, 0.55), (128, 0.62), (64, 0.53), (256, 0.70), (128, 0.60),
              (0, 5.0), (512, float("nan"))]  # batch size 0 and a NaN value are left out
    c = stats.slope(points, what="final epoch validation loss", label="batch size")
    kept = points[:6]
    xs = np.log2([x for x, _ in kept])
    ys = np.array([y for _, y in kept])
    fit = sps.linregress(xs, ys)
    half = T975(len(kept) - 2) * fit.stderr
    assert c.n == 6 and c.kind == "slope"
    assert c.diff == pytest.approx(fit.slope, abs=1e-9)
    assert c.low == pytest.approx(fit.slope - half, abs=1e-9)
    assert c.high == pytest.approx(fit.slope + half, abs=1e-9)
    assert c.p == pytest.approx(fit.pvalue, abs=1e-9)
    assert c.baseline == pytest.approx(ys.mean(), abs=1e-12)
    # Against log2, not the raw batch size: doubling every batch size shifts x by 1 only.
    doubled = stats.slope([(2 * x, y) for x, y in kept], what="w", label="x")
    assert doubled.diff == pytest.approx(c.diff, abs=1e-9)
    assert stats.slope([(32, 0.5), (64, 0.6)], what="w", label="x") is None
    assert stats.slope([(64, 0.5), (64, 0.6), (64, 0.7)], what="w", label="x") is None


def test_paired_identical_differences_up_to_float32_rounding_are_not_tested():
    """TensorBoard stores scalars as float32: a difference that is the same in every pair
    (the fixture's +0.02 accuracy of batch norm) comes back identical only up to float32
    rounding, and must still count as "identical differences" (no t-test, no direction)."""
    a = {s: f32(fx.accuracy(2, 64, False, s) - 0.01) for s in fx.SEEDS}
    b = {s: f32(fx.accuracy(2, 64, True, s) - 0.01) for s in fx.SEEDS}
    d = np.array([b[s] - a[s] for s in fx.SEEDS])
    assert np.ptp(d) < 1e-6  # the same difference, 0.02, up to float32 rounding
    c = stats.paired(a, b, what="final epoch validation accuracy", label="batch norm at batch size 64")
    assert c.diff == pytest.approx(0.02, abs=1e-6)
    assert not c.tested, (c.low, c.high, c.p)
    stats.holm([c])
    assert not c.resolved


def _cmp(p: float, n: int = 3, kind: str = "paired") -> stats.Comparison:
    return stats.Comparison("w", f"p={p}", kind, -0.1, -0.2, 0.0, n, p, 1.0)


@pytest.mark.parametrize("ps, want", [
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → kept at 0.06 (monotone)
    ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
    # sorted: 0.004·4 = 0.016, 0.012·3 = 0.036, 0.6·2 = 1.2 → capped at 1, 0.7·1 → kept at 1
    ([0.004, 0.6, 0.7, 0.012], [0.016, 1.0, 1.0, 0.036]),
])
def test_holm_by_hand_for_four_p_values(ps, want):
    family = [_cmp(p) for p in ps]
    untested = [_cmp(float("nan"), n=1), _cmp(0.001, n=2, kind="slope"), _cmp(0.002, n=1)]
    stats.holm(family[:2] + untested + family[2:])
    for c, w in zip(family, want):
        assert c.p_adj == pytest.approx(w, abs=1e-12), c.label
        assert c.family == 4
    # Monotone in the raw p-values, never above 1, never below the raw p.
    ordered = sorted(family, key=lambda c: c.p)
    assert all(x.p_adj <= y.p_adj for x, y in pairwise(ordered))
    assert all(c.p <= c.p_adj <= 1.0 for c in family)
    # Untested comparisons are left out of the family and get no adjusted p.
    for c in untested:
        assert not c.tested and math.isnan(c.p_adj) and c.family == 1 and not c.resolved
    assert [c.resolved for c in family] == [w < 0.05 for w in want]


# -- grids written for these tests ---------------------------------------------------------

GRID_BATCH_SIZES = (32, 64, 128)
GRID_EPOCHS = 2
GRID_TRAIN = 256
SEED_OFFSET = (0.0, 0.004, -0.003)
# Batch norm's effect on the final train loss, per batch size and seed: clearly lower at 32,
# noise at 64, clearly higher at 128.
BN_EFFECT = {32: (-0.120, -0.118, -0.1215), 64: (0.006, -0.009, 0.004), 128: (0.081, 0.078, 0.0805)}


# Not a straight line in log2(batch size): real grids never are.
WIGGLE = {32: 0.0, 64: 0.004, 128: -0.001}


def grid_train_loss(bs: int, bn: bool, seed: int) -> float:
    return round(0.5 + 0.02 * math.log2(bs / 32) + WIGGLE[bs] + SEED_OFFSET[seed]
                 + (BN_EFFECT[bs][seed] if bn else 0.0), 6)


def grid_val_loss(bs: int, bn: bool, seed: int) -> float:
    return round(grid_train_loss(bs, bn, seed) + 0.03 - 0.004 * seed, 6)


def grid_accuracy(bs: int, bn: bool, seed: int) -> float:
    return round(0.8 - 0.01 * math.log2(bs / 32) - WIGGLE[bs] / 2 + 0.002 * seed
                 - (BN_EFFECT[bs][seed] / 2 if bn else 0.0), 6)


def grid_val_accuracy(bs: int, bn: bool, seed: int) -> float:
    return round(grid_accuracy(bs, bn, seed) - 0.01, 6)


GRID_FINAL = {"train loss": grid_train_loss, "val loss": grid_val_loss, "val accuracy": grid_val_accuracy}


def write_grid(out: Path, seeds, batch_sizes=GRID_BATCH_SIZES) -> Path:
    """Logs in the trainer's layout (as tests/make_fixture_logs.write writes them) whose
    final-epoch values are the grid_* functions; earlier epochs are worse by a fixed step."""
    import tensorflow as tf

    out.mkdir(parents=True, exist_ok=True)
    dataset = {"name": "fashion_mnist", "source": "test grid", "validation": "test set",
               "train_examples": GRID_TRAIN, "validation_examples": 64, "image_shape": [28, 28], "classes": 10}
    names, specs = [], []
    for bs in batch_sizes:
        for bn in (False, True):
            for seed in seeds:
                name = f"init=glorot_normal,bs={bs},bn={'on' if bn else 'off'},seed={seed}"
                spec = {**fx.spec(bs, bn, seed), "epochs": GRID_EPOCHS}
                names.append(name)
                specs.append(spec)
                run_dir = out / name
                writers = {s: tf.summary.create_file_writer(str(run_dir / s)) for s in ("train", "validation")}
                step = 0
                for epoch in range(GRID_EPOCHS):
                    back = GRID_EPOCHS - 1 - epoch
                    with writers["train"].as_default():
                        for _ in range(GRID_TRAIN // bs):
                            step += 1
                            tf.summary.scalar("step_loss", 2.0 / (1 + 0.1 * step) + 0.01 * ((step * 7 + seed) % 5),
                                              step=step)
                        tf.summary.scalar("epoch_loss", grid_train_loss(bs, bn, seed) + 0.1 * back, step=epoch)
                        tf.summary.scalar("epoch_accuracy", grid_accuracy(bs, bn, seed) - 0.05 * back, step=epoch)
                    with writers["validation"].as_default():
                        tf.summary.scalar("epoch_loss", grid_val_loss(bs, bn, seed) + 0.1 * back, step=epoch)
                        tf.summary.scalar("epoch_accuracy", grid_val_accuracy(bs, bn, seed) - 0.05 * back,
                                          step=epoch)
                for w in writers.values():
                    w.close()
                manifest = {"experiment": "grid", "run": name, "spec": spec, "seed": seed, "status": "complete",
                            "steps": step, "wall_seconds": 1.0, "dataset": dataset,
                            "versions": {"python": "3.11", "tensorflow": "grid"},
                            "hardware": {"cpu": "grid cpu", "cpu_count": 2, "gpus": []}}
                (run_dir / "run.json").write_text(json.dumps(manifest))
    experiment = {"experiment": {"name": "grid", "title": "Grid", "author": "A. Student", "id": "ID-1",
                                 "date": "2025-02-02", "template": "lab", "objective": "Grid objective."},
                  "dataset": dataset, "runs": names, "specs": specs,
                  "source_text": "[grid]\nbatch_size = [32, 64, 128]\n"}
    (out / "experiment.json").write_text(json.dumps(experiment))
    return out


def report_html(logdir: Path, out: Path, *extra: str) -> str:
    assert main(["--logdir", str(logdir), "--out", str(out), "--format", "html", *extra]) == 0
    return (out / "report.html").read_text()


@pytest.fixture(scope="module")
def signs_grid(tmp_path_factory):
    """Three seeds × batch sizes 32, 64, 128: BN lowers the losses at 32, raises them at 128,
    noise at 64. (logdir, report.html text)."""
    root = tmp_path_factory.mktemp("signs")
    logdir = write_grid(root / "signs", seeds=(0, 1, 2))
    return logdir, report_html(logdir, root / "out")


@pytest.fixture(scope="module")
def one_seed_grid(tmp_path_factory):
    """The same grid with seed 0 only (the shape of the batch-noise-* presets)."""
    root = tmp_path_factory.mktemp("oneseed")
    logdir = write_grid(root / "oneseed", seeds=(0,))
    return logdir, report_html(logdir, root / "out")


@pytest.fixture(scope="module")
def fixture_report(fixture_logs, tmp_path_factory):
    """The fixture's lab report with default options (PDF and HTML, smoothing 0.6)."""
    out = tmp_path_factory.mktemp("fixture_report")
    assert main(["--logdir", str(fixture_logs), "--out", str(out)]) == 0
    return out


# -- reading a rendered report -------------------------------------------------------------


def plain(fragment: str) -> str:
    return htmllib.unescape(re.sub(r"<[^>]+>", "", fragment)).strip()


def sections(html: str) -> list[dict]:
    """Each heading's section of the HTML: number, title, paragraphs, bullets, tables
    (number → list of cell texts), figure captions."""
    parts = re.split(r'<h[234] id="sec-([\d.]+)">([^<]*)</h[234]>', html)
    out = []
    for i in range(1, len(parts), 3):
        number, heading, body = parts[i], parts[i + 1], parts[i + 2]
        tables = {int(n): [plain(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", t, re.DOTALL)]
                  for n, t in re.findall(r'id="table-(\d+)">\s*<table>(.*?)</table>', body, re.DOTALL)}
        out.append({"number": number, "title": plain(heading).removeprefix(number).strip(),
                    "paragraphs": [plain(p) for p in re.findall(r"<p>(.*?)</p>", body, re.DOTALL)],
                    "bullets": [plain(li) for li in re.findall(r"<li>(.*?)</li>", body, re.DOTALL)],
                    "tables": tables,
                    "captions": [plain(c) for c in re.findall(r"<figcaption>(.*?)</figcaption>", body, re.DOTALL)]})
    return out


def section(html: str, title: str) -> dict:
    (sec,) = [s for s in sections(html) if s["title"] == title]
    return sec


def all_tables(html: str) -> dict[int, list[str]]:
    return {n: cells for s in sections(html) for n, cells in s["tables"].items()}


def numbers(text: str) -> set[str]:
    """The decimal numbers of a text, as absolute values (U+2212 counts as a minus)."""
    return {m.replace("\u2212", "").lstrip("+-") for m in NUMBER.findall(text.replace("\u2212", "-"))}


def sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+(?=[A-Z])", paragraph) if s]


def missing_numbers(text: str, cells: list[str]) -> set[str]:
    shown = set().union(*(numbers(c) for c in cells)) if cells else set()
    return numbers(text) - shown


# -- 2. the CSVs carry scipy's numbers -----------------------------------------------------


def csv_table(out: Path, key: str) -> pd.DataFrame:
    (path,) = [p for p in (out / "tables").glob("table*.csv") if re.fullmatch(rf"table\d+_{key}\.csv", p.name)]
    return pd.read_csv(path)


def check_record(row, values: list[float]) -> None:
    v = np.array([f32(x) for x in values])
    n = len(v)
    assert row["n"] == n
    assert row["mean"] == pytest.approx(v.mean(), abs=1e-9)
    assert row["std"] == pytest.approx(v.std(ddof=1), abs=1e-9)
    low, high = sps.t.interval(0.95, n - 1, loc=v.mean(), scale=sps.sem(v))
    assert row["ci_low"] == pytest.approx(low, abs=1e-9)
    assert row["ci_high"] == pytest.approx(high, abs=1e-9)


def test_csv_cells_are_scipy_intervals_of_the_fixture_values(fixture_report):
    for split, short in (("train", "train_loss"), ("validation", "val_loss")):
        for bs in fx.BATCH_SIZES:
            df = csv_table(fixture_report, f"{short}_all_bs{bs}")
            for bn, label in ((False, "Without batch norm"), (True, "With batch norm")):
                check_record(df[df["setting"] == label].iloc[0], fx.expected_final(split, bs, bn))
        by_bs = csv_table(fixture_report, f"{short}_by_batch_size_all")
        for bs in fx.BATCH_SIZES:
            for bn in (False, True):
                row = by_bs[(by_bs["batch_size"].astype(str) == str(bs))
                            & (by_bs["batch_norm"].astype(str) == str(bn))].iloc[0]
                check_record(row, fx.expected_final(split, bs, bn))
    # The paired row of Table "train loss, bs 64": b − a over the seeds, ttest_rel's p.
    df = csv_table(fixture_report, "train_loss_all_bs64")
    row = df[df["setting"] == "with - without"].iloc[0]
    a = np.array([f32(fx.train_loss(fx.EPOCHS - 1, 64, False, s)) for s in fx.SEEDS])
    b = np.array([f32(fx.train_loss(fx.EPOCHS - 1, 64, True, s)) for s in fx.SEEDS])
    d = b - a
    half = T975(2) * d.std(ddof=1) / math.sqrt(3)
    assert row["difference"] == pytest.approx(d.mean(), abs=1e-9)
    assert row["ci_low"] == pytest.approx(d.mean() - half, abs=1e-9)
    assert row["ci_high"] == pytest.approx(d.mean() + half, abs=1e-9)
    assert row["p"] == pytest.approx(sps.ttest_rel(b, a).pvalue, abs=1e-9)
    assert row["n"] == 3


# -- 3. the count sentence: each batch size in its own direction ----------------------------


def grid_values(metric: str, bs: int, bn: bool, seeds=(0, 1, 2)) -> np.ndarray:
    return np.array([f32(GRID_FINAL[metric](bs, bn, s)) for s in seeds])


def test_tally_names_each_batch_size_in_its_own_direction(signs_grid):
    _, html = signs_grid
    comparison = section(html, "Batch Size Comparison")
    tallies = [b for b in comparison["bullets"] if b.startswith("Across ")]
    want = {
        "final epoch train loss": (32, 128), "final epoch validation loss": (32, 128),
        "final epoch validation accuracy": (128, 32),  # BN raised accuracy where it lowered loss
    }
    assert len(tallies) == len(want), tallies
    for what, (lowered, raised) in want.items():
        expected = (f"Across 3 batch sizes, batch norm lowered the {what} at 1 ({lowered}) and raised it at 1 "
                    f"({raised}), resolved after the Holm adjustment; at the other 1 the difference was not "
                    "resolved.")
        assert expected in tallies, (what, tallies)
    # The old count ("lowered … at k of n batch sizes", "k of these differences exceed the seed
    # spread") counted every pair, including the batch size where batch norm raised the loss.
    assert "exceed the seed spread" not in html and "of 3 batch sizes" not in html
    assert not re.search(r"lowered the final epoch (train|validation) loss at [23]\b", html)
    # The per-batch-size sentences agree: lower at 32, higher (worse) at 128.
    bs32 = section(html, "Batch Size 32")["bullets"]
    bs128 = section(html, "Batch Size 128")["bullets"]
    assert any(b.startswith("With batch norm, the final epoch validation loss was lower than without it: ")
               for b in bs32), bs32
    assert any(b.startswith("With batch norm, the final epoch validation loss was higher than without it "
                            "(worse): ") for b in bs128), bs128
    assert not any("lower than" in b for b in bs128)


def test_noise_batch_size_is_not_resolved_and_gives_its_interval(signs_grid):
    _, html = signs_grid
    bullets = section(html, "Batch Size 64")["bullets"]
    for metric, what in (("train loss", "train loss"), ("val loss", "validation loss")):
        a, b = grid_values(metric, 64, False), grid_values(metric, 64, True)
        d = b - a
        half = T975(2) * d.std(ddof=1) / math.sqrt(3)
        assert sps.ttest_rel(b, a).pvalue > 0.05  # the grid is built so
        expected = (f"The final epoch {what} difference, with batch norm − without it, was not resolved: "
                    f"{signed(d.mean())} (95% CI {signed(d.mean() - half)} to {signed(d.mean() + half)}, "
                    "3 paired seeds; Holm-adjusted p = ")
        assert any(x.startswith(expected) for x in bullets), (expected, bullets)
    assert not any(DIRECTION_WORDS.search(x) for x in bullets), bullets


# -- 4. every number of a sentence is in the table it names ---------------------------------


def check_numbers_in_named_tables(html: str) -> int:
    """Findings sentences and rows that name "Table N" and the bullets of each batch-size
    subsection: their decimal numbers are all in the named (or the subsection's) tables."""
    tables = all_tables(html)
    checked = 0
    findings = section(html, "Findings")
    texts = [s for p in findings["paragraphs"] for s in sentences(p)] + findings["bullets"]
    for text in texts:
        for n in map(int, re.findall(r"Table (\d+)", text)):
            assert n in tables, (text, n)
            assert not missing_numbers(text, tables[n]), (text, f"Table {n}", missing_numbers(text, tables[n]))
            checked += bool(numbers(text))
    for n, cells in findings["tables"].items():  # the findings table: one effect per row
        width = 6
        for i in range(0, len(cells), width):
            row = cells[i:i + width]
            (where,) = re.findall(r"Table (\d+)", row[-1])
            text = " ".join(row[1:4])
            assert not missing_numbers(text, tables[int(where)]), (row, missing_numbers(text, tables[int(where)]))
            checked += 1
    for sec in sections(html):
        if re.fullmatch(r"Batch Size \d+|Batch Size Comparison", sec["title"]):
            cells = [c for t in sec["tables"].values() for c in t]
            for bullet in sec["bullets"]:
                assert not missing_numbers(bullet, cells), (sec["title"], bullet, missing_numbers(bullet, cells))
                checked += bool(numbers(bullet))
    return checked


def test_numbers_in_sentences_are_in_the_tables_they_name_fixture(fixture_report):
    html = (fixture_report / "report.html").read_text()
    assert check_numbers_in_named_tables(html) >= 8


def test_numbers_in_sentences_are_in_the_tables_they_name_three_seed_grid(signs_grid):
    _, html = signs_grid
    assert check_numbers_in_named_tables(html) >= 15


def test_findings_numbers_come_from_the_context_tables(fixture_logs):
    """The same check on report.build.build's context, table by table (no HTML in between)."""
    from report.build import build
    from report.load import load_logs

    ctx = build(load_logs(fixture_logs), template="lab")
    by_number = {t.number: [v for row in t.rows for v in row] for t in ctx["tables"]}
    assert sorted(by_number) == list(range(1, len(by_number) + 1))
    (findings,) = [s for s in ctx["sections"] if s.title == "Findings"]
    texts = [x for b in findings.blocks if b["kind"] == "paragraph" for x in sentences(b["text"])]
    texts += [x for b in findings.blocks if b["kind"] == "bullets" for x in b["items"]]
    texts += [" ".join(row[1:]) for b in findings.blocks if b["kind"] == "table" for row in b["table"].rows]
    checked = 0
    for text in texts:
        for n in map(int, re.findall(r"Table (\d+)", text)):
            assert n in by_number, (text, n)
            cells = by_number[n]
            assert not missing_numbers(text.split("Table ")[0], cells), (text, missing_numbers(text, cells))
            checked += 1
    assert checked >= 4
    assert not any("\u27e6" in x for x in texts)  # no unresolved table reference left


# -- 5. one seed: nothing resolved; three seeds: resolved effects, largest first ------------


def test_one_seed_grid_claims_nothing_and_says_how_to_add_seeds(one_seed_grid):
    _, html = one_seed_grid
    findings = section(html, "Findings")
    text = " ".join(findings["paragraphs"] + findings["bullets"])
    problems = []  # every way the report claims more than one seed can show, listed at once
    if "Nothing can be resolved" not in text:
        problems.append(f"Findings does not say nothing can be resolved: {text}")
    if "seed = [0, 1, 2]" not in text:
        problems.append(f"Findings does not say how to add seeds: {text}")
    if findings["tables"]:
        problems.append(f"Findings has a table of effects: {findings['tables']}")
    for sec in sections(html):
        for sentence in sec["paragraphs"] + sec["bullets"]:
            if DIRECTION_WORDS.search(sentence):
                problems.append(f"{sec['title']}: claims a direction: {sentence}")
        for n, cells in sec["tables"].items():
            if any("±" in c for c in cells):
                problems.append(f"{sec['title']}: Table {n} shows ±: {[c for c in cells if '±' in c]}")
    assert not problems, "\n".join(problems)


def relative_effect(label: str) -> float:
    """|effect| / baseline of a Findings row, from the grid's known values."""
    m = re.fullmatch(r"Batch norm, (train loss|val loss|val accuracy), batch (\d+)", label)
    if m:
        metric, bs = m.group(1), int(m.group(2))
        a, b = grid_values(metric, bs, False), grid_values(metric, bs, True)
        return abs((b - a).mean()) / abs(a.mean())
    m = re.fullmatch(r"Batch size \(slope\), (train loss|val loss|val accuracy), (with|without) batch norm", label)
    assert m, label
    metric, bn = m.group(1), m.group(2) == "with"
    xs = [math.log2(bs) for bs in GRID_BATCH_SIZES for _ in range(3)]
    ys = np.concatenate([grid_values(metric, bs, bn) for bs in GRID_BATCH_SIZES])
    return abs(sps.linregress(xs, ys).slope) / abs(ys.mean())


def test_three_seed_grid_lists_resolved_effects_largest_first(signs_grid):
    _, html = signs_grid
    findings = section(html, "Findings")
    tables = all_tables(html)
    ((number, cells),) = findings["tables"].items()
    rows = [cells[i:i + 6] for i in range(0, len(cells), 6)]
    labels = [r[0] for r in rows]
    for metric in ("train loss", "val loss", "val accuracy"):
        for bs in (32, 128):
            assert f"Batch norm, {metric}, batch {bs}" in labels, labels
        assert f"Batch norm, {metric}, batch 64" not in labels, labels
    for row in rows:
        assert re.fullmatch(r"Table \d+", row[-1]) and int(row[-1].split()[1]) in tables, row
        assert row[-1] != f"Table {number}"
    relative = [relative_effect(label) for label in labels]
    assert relative == sorted(relative, reverse=True), list(zip(labels, relative))
    first = findings["paragraphs"][0]
    assert re.match(rf"{len(rows)} of \d+ tested effects were resolved", first), first
    assert f"The largest, relative to its baseline mean: {labels[0]}: " in first, first
    assert re.search(r"\), Table \d+\.$", first), first


# -- 6. the smoothing weight in captions ---------------------------------------------------


def per_step_captions(html: str) -> list[str]:
    return [c for s in sections(html) for c in s["captions"] if re.search(r"Batch size \d+ train loss", c)]


def test_smoothing_weight_is_named_in_per_step_captions(fixture_logs, fixture_report, tmp_path):
    default = (fixture_report / "report.html").read_text()
    captions = per_step_captions(default)
    assert captions and all("weight 0.6" in c for c in captions), captions
    others = [c for s in sections(default) for c in s["captions"] if c not in captions]
    assert others and not [c for c in others if "smooth" in c.lower()], others
    raw = report_html(fixture_logs, tmp_path / "raw", "--smoothing", "0")
    all_captions = [c for s in sections(raw) for c in s["captions"]]
    assert per_step_captions(raw) and not [c for c in all_captions if "smooth" in c.lower()], all_captions
    strong = report_html(fixture_logs, tmp_path / "strong", "--smoothing", "0.9")
    captions = per_step_captions(strong)
    assert captions and all("weight 0.9" in c and "weight 0.6" not in c for c in captions), captions


# -- 7. stale outputs removed, the user's files kept ----------------------------------------

TABLE_CSV = re.compile(r"table\d{2,}_[A-Za-z0-9._-]+\.csv")


def test_stale_outputs_are_removed_and_the_users_files_kept(fixture_logs, tmp_path, capsys):
    from report.build import build
    from report.load import load_logs

    out = tmp_path / "out"
    assert main(["--logdir", str(fixture_logs), "--out", str(out)]) == 0
    assert (out / "report.pdf").is_file() and (out / "report.html").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "tables" / "mine.csv").write_text("a,b\n1,2\n")
    capsys.readouterr()
    assert main(["--logdir", str(fixture_logs), "--out", str(out), "--format", "html"]) == 0
    assert not (out / "report.pdf").exists() and (out / "report.html").is_file()
    assert "report.pdf" in capsys.readouterr().err
    lab_csvs = {p.name for p in (out / "tables").iterdir() if TABLE_CSV.fullmatch(p.name)}
    task_csvs = {f"table{t.number:02d}_{t.key}.csv"
                 for t in build(load_logs(fixture_logs), template="task")["tables"]}
    assert lab_csvs - task_csvs  # the lab run left tables the task run does not write
    assert main(["--logdir", str(fixture_logs), "--out", str(out), "--template", "task", "--format", "html"]) == 0
    printed = int(re.search(r"(\d+) tables;", capsys.readouterr().out).group(1))
    left = {p.name for p in (out / "tables").iterdir() if TABLE_CSV.fullmatch(p.name)}
    assert left == task_csvs and len(left) == printed
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "tables" / "mine.csv").read_text() == "a,b\n1,2\n"
    assert (out / "report.html").is_file() and not (out / "report.pdf").exists()


# -- 8. the title block -------------------------------------------------------------------


def title_block(html: str) -> str:
    return html.split('<div class="titleblock">', 1)[1].split("<h2", 1)[0]


def copy_logs(fixture_logs: Path, dest: Path, **experiment) -> Path:
    shutil.copytree(fixture_logs, dest)
    exp = json.loads((dest / "experiment.json").read_text())
    top = {k: experiment.pop(k) for k in ("source_text", "overrides") if k in experiment}
    exp["experiment"].update(experiment)
    exp.update(top)
    (dest / "experiment.json").write_text(json.dumps(exp))
    return dest


def test_title_block_options_override_the_experiment_file(fixture_logs, tmp_path):
    html = report_html(fixture_logs, tmp_path / "out", "--author", "Ana Lima", "--student-id", "S-42",
                       "--date", "2026-01-02")
    block = title_block(html)
    assert "Ana Lima" in block and "S-42" in block and "2026-01-02" in block, block
    assert "A. Student" not in block and "ID-1" not in block and "2025-02-02" not in block, block
    kept = title_block(report_html(fixture_logs, tmp_path / "kept"))
    assert "A. Student" in kept and "ID-1" in kept and "2025-02-02" in kept, kept


def test_empty_title_block_warns_for_lab_only(fixture_logs, tmp_path, capsys):
    logs = copy_logs(fixture_logs, tmp_path / "anon", author="", id="")
    capsys.readouterr()
    report_html(logs, tmp_path / "lab")
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "AUTHOR" in warning and "STUDENT_ID" in warning, warning
    assert "author" in warning and "ID" in warning, warning
    report_html(logs, tmp_path / "task", "--template", "task")
    assert "warning" not in capsys.readouterr().err
    report_html(logs, tmp_path / "given", "--author", "Ana Lima", "--student-id", "S-42")
    assert "warning" not in capsys.readouterr().err


# -- 9. Code Used shows the experiment as it ran -------------------------------------------

AS_RUN = "epochs = 1  # from the command line (the file says 10)"


def test_code_used_shows_the_file_as_run_and_the_override(fixture_logs, tmp_path):
    logs = copy_logs(fixture_logs, tmp_path / "asrun", template="task",
                     source_text=f"[run]\n{AS_RUN}\n\n[grid]\nbatch_size = [64, 128]\n",
                     overrides={"epochs": 1})
    html = report_html(logs, tmp_path / "out")
    code = html.split("Code Used</h2>", 1)[1].split("<h2", 1)[0]
    (pre,) = re.findall(r"<pre>(.*?)</pre>", code, re.DOTALL)
    assert AS_RUN in htmllib.unescape(pre).splitlines(), pre
    paragraphs = [plain(p) for p in re.findall(r"<p>(.*?)</p>", code, re.DOTALL)]
    assert any("command line" in p and "epochs = 1" in p for p in paragraphs), paragraphs
