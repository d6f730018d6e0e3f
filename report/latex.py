"""Context → report.tex (booktabs tables, figures as PDF files beside it), for pdflatex.

The same context as the HTML, so sections, figure and table numbers and captions are
the same; numbers are set explicitly rather than left to LaTeX's counters, so they can
never drift. Figures are our own SVGs turned into one-page PDFs by the PDF renderer
(weasyprint), so their text stays vector and nothing is drawn twice.
"""
from __future__ import annotations

import base64
import re
from pathlib import Path

from contract.files import write_atomic
from contract.layout import printable

TEX_NAME, FIGURES = "report.tex", "figures"
LONG_TABLE = 25  # rows above which a table may break across pages (longtable)

PREAMBLE = r"""\pdfminorversion=7
\documentclass[a4paper,10pt]{article}
\usepackage[utf8]{inputenc}
\usepackage[margin=20mm]{geometry}
\usepackage{booktabs,longtable,graphicx,float,xcolor,fancyhdr,array}
\usepackage[font=small]{caption}
\setlength{\parindent}{0pt}\setlength{\parskip}{0.5em}
\pagestyle{fancy}\fancyhf{}\renewcommand{\headrulewidth}{0pt}
\fancyfoot[C]{\small Page \thepage}%s
"""

# pdflatex (8-bit fonts) knows none of these; each gets its LaTeX spelling.
UNICODE = {
    "−": "$-$", "±": "$\\pm$", "×": "$\\times$", "Σ": "$\\Sigma$", "σ": "$\\sigma$", "≥": "$\\geq$",
    "≤": "$\\leq$", "≈": "$\\approx$", "→": "$\\to$", "·": "$\\cdot$", "√": "$\\surd$", "²": "$^2$",
    "…": "\\ldots{}", "—": "---", "–": "--", "“": "``", "”": "''", "‘": "`", "’": "'", "⁻": "$^-$",
    "¹": "$^1$", "β": "$\\beta$", "μ": "$\\mu$", "°": "$^\\circ$", "\u00a0": "~",
}
SPECIAL = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
           "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}",
           "<": "\\textless{}", ">": "\\textgreater{}", "|": "\\textbar{}"}


def escape(text) -> str:
    """Plain text as LaTeX: special characters escaped, known symbols spelled out, and any
    other character outside Latin-1 shown as '?' (pdflatex has no glyph for it)."""
    out = []
    for c in printable(str(text)):
        if c in SPECIAL:
            out.append(SPECIAL[c])
        elif c in UNICODE:
            out.append(UNICODE[c])
        elif ord(c) < 0x100 and (c.isprintable() or c in "\n\t"):
            out.append(c)
        else:
            out.append("?")
    return "".join(out)


def svg_to_pdf(svg: str) -> bytes:
    """One page exactly the size of the SVG (matplotlib writes its size in pt)."""
    from report.render import render_pdf

    m = re.search(r'<svg[^>]*\swidth="([\d.]+)pt"[^>]*\sheight="([\d.]+)pt"', svg)
    w, h = (float(m.group(1)), float(m.group(2))) if m else (432.0, 201.6)
    uri = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
    html = (f"<style>@page {{ size: {w}pt {h}pt; margin: 0 }} body {{ margin: 0 }}</style>"
            f'<img src="{uri}" style="width:{w}pt;height:{h}pt;display:block">')
    pdf, _ = render_pdf(html)
    return pdf


def _table(t) -> str:
    cols = "l" + "r" * (len(t.columns) - 1)
    first = "p{0.36\\linewidth}" + "r" * (len(t.columns) - 1)
    head = " & ".join(f"\\textbf{{{escape(c)}}}" for c in t.columns) + " \\\\"
    body = "\n".join(" & ".join(escape(v) for v in row) + " \\\\" for row in t.rows)
    caption = f"\\setcounter{{table}}{{{t.number - 1}}}\\caption{{{escape(t.caption)}}}"
    size = "\\footnotesize" if t.compact or len(t.columns) > 4 else "\\small"
    if len(t.rows) > LONG_TABLE:
        return (f"{{{size}\n\\begin{{longtable}}{{{first}}}\n\\toprule\n{head}\n\\midrule\n\\endhead\n{body}\n"
                f"\\bottomrule\n{caption}\n\\end{{longtable}}}}\n")
    # Shrunk to the text width when wider (\width is the box's natural width).
    return (f"\\begin{{table}}[H]\n\\centering{size}\n\\resizebox{{\\ifdim\\width>\\linewidth\\linewidth"
            f"\\else\\width\\fi}}{{!}}{{\\begin{{tabular}}{{{cols}}}\n\\toprule\n{head}\n"
            f"\\midrule\n{body}\n\\bottomrule\n\\end{{tabular}}}}\n{caption}\n\\end{{table}}\n")


def _figure(block: dict, path: str) -> str:
    return (f"\\begin{{figure}}[H]\n\\centering\n\\includegraphics[width=\\linewidth]{{{path}}}\n"
            f"\\setcounter{{figure}}{{{block['number'] - 1}}}\\caption{{{escape(block['caption'])}}}\n"
            "\\end{figure}\n")


def render_latex(context: dict, out: Path) -> list[Path]:
    """Write out/report.tex and out/figures/figureNN.pdf; returns every file written."""
    out = Path(out)
    written: list[Path] = []
    parts = []
    for sec in context["sections"]:
        command = {1: "section", 2: "subsection"}.get(sec.level, "subsubsection")
        parts.append(f"\\{command}*{{{escape(sec.number + ' ' + sec.title)}}}\n")
        for block in sec.blocks:
            for b in (block["blocks"] if block["kind"] == "row" else [block]):
                if b["kind"] == "paragraph":
                    parts.append(escape(b["text"]) + "\n")
                elif b["kind"] == "bullets":
                    parts.append("\\begin{itemize}\n" + "".join(f"\\item {escape(i)}\n" for i in b["items"])
                                 + "\\end{itemize}\n")
                elif b["kind"] == "code":
                    code = "".join(c if ord(c) < 0x80 else "?" for c in printable(b["text"]))
                    parts.append("{\\footnotesize\n\\begin{verbatim}\n" + code.replace("\\end{verbatim}", "")
                                 + "\n\\end{verbatim}}\n")
                elif b["kind"] == "figure":
                    name = f"{FIGURES}/figure{b['number']:02d}.pdf"
                    svg = base64.b64decode(b["src"].split(",", 1)[1]).decode()
                    write_atomic(out / name, svg_to_pdf(svg))
                    written.append(out / name)
                    parts.append(_figure(b, name))
                elif b["kind"] == "table":
                    parts.append(_table(b["table"]))
    draft = ""
    if context.get("draft"):
        draft = ("\n\\fancyfoot[L]{\\small\\textcolor{red}{\\textbf{DRAFT: grid not finished}}}")
    authors = " \\\\ ".join(escape(v) for v in (context.get("author"), context.get("id")) if v)
    title = [f"\\title{{{escape(context['title'])}}}", f"\\author{{{authors}}}",
             f"\\date{{{escape(context['date'])}}}"]
    body = ["\\begin{document}", "\\maketitle", "\\thispagestyle{fancy}"]
    if context.get("draft"):
        body.append(f"\\begin{{center}}\\fbox{{\\parbox{{0.9\\linewidth}}{{\\centering\\textcolor{{red}}"
                    f"{{\\textbf{{{escape(context['draft'])}}}}}}}}}\\end{{center}}")
    tex = (PREAMBLE % draft + "\n".join(title) + "\n" + "\n".join(body) + "\n" + "\n".join(parts)
           + f"\n\\small Generated from {context['runs_read']} runs and {context['points_read']} scalar points; "
           f"{context['n_figures']} figures, {len(context['tables'])} tables.\n\\end{{document}}\n")
    write_atomic(out / TEX_NAME, tex)
    written.append(out / TEX_NAME)
    return written
