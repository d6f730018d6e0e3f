"""Context → HTML (jinja2, autoescaped) → PDF (weasyprint, fetching nothing from outside)."""
from __future__ import annotations

from pathlib import Path

import jinja2
from markupsafe import Markup

from contract.layout import printable as clean

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"


def printable(value):
    """Every value a template prints, with control characters made visible as U+FFFD.

    Logs copied from elsewhere can carry NUL or escape characters in titles, run names
    or tags; cleaning at the single output point covers them all. Markup (our own SVG)
    stays Markup so autoescaping does not escape it a second time.
    """
    if isinstance(value, Markup):
        return Markup(clean(str(value)))
    return clean(value) if isinstance(value, str) else value


def render_html(context: dict) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR), finalize=printable,
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    return env.get_template(f"{context['template']}.html.j2").render(**context)


def render_pdf(html: str) -> tuple[bytes, list[str]]:
    """The PDF bytes and the URLs the renderer asked for and was refused.

    Figures are inline data: URIs and the CSS is inline, so nothing else is needed:
    anything else (file:, http:, …) in the document is refused, not fetched.
    """
    from weasyprint import HTML
    from weasyprint.urls import URLFetcher

    refused: list[str] = []

    class OwnAssetsOnly(URLFetcher):
        def fetch(self, url, headers=None):
            if not url.startswith("data:"):
                refused.append(url)
                raise ValueError(f"refused to fetch {url[:80]}: reports use only their own inline assets")
            return super().fetch(url, headers)

    fetcher = OwnAssetsOnly(allowed_protocols=("data",))
    pdf = HTML(string=html, base_url="about:blank", url_fetcher=fetcher).write_pdf()
    return pdf, refused


def missing_glyphs(text: str, *, limit: int = 200) -> list[str]:
    """The characters of `text` that no installed font covers (so the PDF would show empty
    boxes), asked of fontconfig, which the PDF renderer itself uses; [] when fontconfig's
    `fc-list` is not there to ask."""
    import shutil
    import subprocess

    if shutil.which("fc-list") is None:
        return []
    # Latin, Greek and Cyrillic are in the DejaVu fonts weasyprint needs; ask about the rest.
    chars = sorted({c for c in text if ord(c) > 0x04FF and c.isprintable() and not c.isspace()})[:limit]
    missing = []
    for c in chars:
        found = subprocess.run(["fc-list", f":charset={ord(c):x}", "family"], capture_output=True, text=True)
        if found.returncode == 0 and not found.stdout.strip():
            missing.append(c)
    return missing
