"""The pieces of a self-contained HTML report: the page, its style, tables and embedded images.

Shared by `analyze --report` (`report.html`) and `fit` (`fitting.report_page`), so that both pages
look alike and escape alike: every text goes through `html.escape`, and images are embedded as
base64 PNG, so a page can be mailed or attached to an issue as one file. Imports nothing heavy.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td.removed { background: #fdd; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0 1.5em; }
.note { color: #555; font-size: 0.9em; }
"""


def image(path: Path) -> str:
    """The PNG at `path` as an <img> whose source is the data itself."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def table(header: list[str], rows: list[list[str]], marked: Mapping[int, str] | None = None) -> str:
    """A table of plain-text cells (escaped here); the cells of row i carry the CSS class `marked[i]`."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{marked[index]}"' if marked and index in marked else ""
        body.append("<tr>" + "".join(f"<td{css}>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def document(title: str, body: list[str], style: str = "") -> str:
    """The whole page: `title` (escaped here), the shared style and `style` after it, then `body` (HTML, one part a line)."""
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                      f"<style>{STYLE}{style}</style></head><body>", *body, "</body></html>"])
