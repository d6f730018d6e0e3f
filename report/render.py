"""Context → HTML (jinja2, autoescaped) → PDF (weasyprint, fetching nothing from outside)."""
from __future__ import annotations

from pathlib import Path

import jinja2

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
TEMPLATES = ("lab", "task")


def render_html(context: dict) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
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
