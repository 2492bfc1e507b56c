"""HTML building blocks of the report: escaping, number formatting, tables, figures, the page shell.

The page is one file that opens offline: CSS and JS are inline, plots are inline SVG, and a
Content-Security-Policy forbids every network fetch, so a stray external reference shows up as
a console error (the browser test fails on it) instead of a silent request.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:12px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cfd8dc;font-size:12px}
nav{position:sticky;top:0;background:#eceff1;padding:6px 24px;border-bottom:1px solid #cfd8dc;z-index:2}
nav a{margin-right:14px;color:#37474f;text-decoration:none;font-weight:600}
main{padding:8px 24px 48px;max-width:1300px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px 18px 14px;margin:16px 0}
h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #e0e0e0;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f5f5f5}td.t,th.t{text-align:left}
figure.plot{display:inline-block;margin:6px 12px 6px 0;vertical-align:top}
figure.plot svg{max-width:100%;height:auto}figcaption{font-size:12px;color:#555;max-width:640px}
p.note{color:#6d4c41;background:#fff8e1;border-left:3px solid #ffb300;padding:4px 10px}
.muted{color:#777}.ok{color:#2e7d32}.bad{color:#c62828}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 10px;width:380px;font-size:12.5px;background:#fcfcfc}
.card h4{margin:0 0 4px;font-size:13.5px}.ctx{font-family:ui-monospace,Menlo,monospace;white-space:pre-wrap;
margin:2px 0;padding:2px 4px;background:#f4f4f4;border-radius:3px}
mark{background:#ffcc80;padding:0 1px;border-radius:2px}
details>summary{cursor:pointer;color:#1565c0;font-weight:600;margin:6px 0}
input.filter{margin:4px 0;padding:3px 6px;width:320px}
.verdict{font-weight:700;padding:1px 6px;border-radius:3px}
.v-shared{background:#c8e6c9}.v-partly_shared{background:#fff9c4}.v-distinct{background:#ffcdd2}
"""

JS = """
function openDetails(id){var d=document.getElementById(id);if(d){d.open=true;d.scrollIntoView();}return false;}
document.addEventListener('input',function(e){
  var t=e.target;if(!t.classList||!t.classList.contains('filter'))return;
  var q=t.value.toLowerCase(),rows=document.querySelectorAll('#'+t.dataset.table+' tbody tr');
  rows.forEach(function(r){r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});
});
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(x: Any, digits: int = 3) -> str:
    """A number as the report shows it (3 significant digits); None/NaN as an em dash."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        if x != 0 and (abs(x) >= 1e7 or abs(x) < 1e-3):
            return f"{x:.{digits - 1}e}"
        if abs(x) >= 10**digits:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return esc(x)


def pct(x: Any) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.1f}%"


def table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], *, table_id: str | None = None, text_cols: int = 1
) -> str:
    """A table; cells are escaped unless they are `Raw`; the first `text_cols` columns align left."""

    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="t"' if i < text_cols else ""
        return f"<{tag}{cls}>{v.html if isinstance(v, Raw) else fmt(v)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    tid = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Raw:
    """HTML that a table cell takes as is (already escaped)."""

    def __init__(self, html_text: str) -> None:
        self.html = html_text

    def __str__(self) -> str:
        return self.html


def figure(name: str, svg: str, caption: str) -> str:
    return f'<figure class="plot" data-plot="{esc(name)}">{svg}<figcaption>{esc(caption)}</figcaption></figure>'


def note(text: str) -> str:
    """A short note in place of a section or plot whose data the run does not have."""
    return f'<p class="note">{esc(text)}</p>'


def verdict(v: str) -> str:
    return f'<span class="verdict v-{esc(v)}">{esc(v)}</span>'


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document: sections are (id, title, body html)."""
    nav = "".join(f'<a href="#{esc(sid)}">{esc(t)}</a>' for sid, t, _ in sections)
    body = "".join(section(sid, t, b) for sid, t, b in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<link rel="icon" href="data:,"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header><nav>{nav}</nav><main>{body}</main>"
        f"<script>{JS}</script></body></html>\n"
    )
