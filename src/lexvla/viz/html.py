"""A tiny static HTML page writer (no templates, no scripts): titled sections of pictures and tables.

Everything from outside (file names, words, texts) is escaped; pictures are referenced by relative
file name, so the page and its PNGs can be moved together.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #666; font-size: 0.9em; }
"""


@dataclass(frozen=True)
class HtmlSection:
    """One section: a heading, an optional picture (relative file name) and trusted body HTML."""

    title: str
    image: str | None = None
    body: str = ""  # already-escaped HTML, e.g. from words_table()


def words_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """An HTML table; floats are shown with 4 decimals and right-aligned, everything is escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{v:.4f}</td>' if isinstance(v, float)
                        else f"<td>{html.escape(str(v))}</td>" for v in row)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def paragraph(text: str, cls: str | None = None) -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{html.escape(text)}</p>"


def write_html_page(path: str | Path, title: str, sections: Sequence[HtmlSection], intro: str = "") -> Path:
    """Write a self-contained page (inline CSS) of ``sections`` to ``path``; returns the path."""
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(paragraph(intro, "note"))
    for s in sections:
        parts.append(f"<section><h2>{html.escape(s.title)}</h2>")
        if s.image:
            parts.append(f'<img src="{html.escape(s.image, quote=True)}" alt="{html.escape(s.title, quote=True)}">')
        parts.append(s.body)
        parts.append("</section>")
    parts.append("</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
