"""report.make_report: the call a notebook makes (and `python -m report` makes)."""
import pandas as pd
import pytest

from report import ReportError, make_report


def test_make_report_returns_files_tables_and_findings(fixture_logs, tmp_path):
    r = make_report(fixture_logs, tmp_path / "out", formats=("html", "latex"), author="Ana Lima")
    assert (tmp_path / "out" / "report.html") in r.files and (tmp_path / "out" / "report.tex") in r.files
    assert not (tmp_path / "out" / "report.pdf").exists()
    csvs = sorted((tmp_path / "out" / "tables").glob("*.csv"))
    assert [p.stem for p in csvs] == sorted(r.tables)
    for p in csvs:
        pd.testing.assert_frame_equal(pd.read_csv(p), pd.read_csv(pd.io.common.StringIO(
            r.tables[p.stem].to_csv(index=False))))
    assert r.findings and r.findings[0].startswith(("1 of", "2 of", "3 of", "4 of", "5 of"))
    assert r.context["author"] == "Ana Lima"
    assert any(m.startswith("draft: 1 run(s)") for m in r.messages)  # the fixture grid misses a run


def test_errors_are_raised_with_the_fix_and_the_exit_code(fixture_logs, tmp_path):
    with pytest.raises(ReportError) as exc:
        make_report(tmp_path / "nothing", tmp_path / "out")
    assert exc.value.exit_code == 2 and "make train" in str(exc.value)
    with pytest.raises(ReportError) as exc:
        make_report(fixture_logs, tmp_path / "final", final=True)
    assert exc.value.exit_code == 1 and "nothing was written" in str(exc.value)
    assert not (tmp_path / "final").exists()
    with pytest.raises(ReportError, match="valid values: pdf, html, latex"):
        make_report(fixture_logs, tmp_path / "x", formats=("docx",))
