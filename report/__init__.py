"""TensorBoard logs → a numbered lab report (PDF, HTML, LaTeX, CSV): `make_report`."""
from report.api import Report, ReportError, make_report

__all__ = ["Report", "ReportError", "make_report"]
