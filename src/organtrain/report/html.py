"""Small HTML builders for a self-contained static page.

Every piece of text goes through html.escape: organ, diagnosis and file names come from
users' folders, and error messages from anywhere. Images are inlined as data: URIs and
the CSS sits in the page, so the one file works opened from disk, mailed, or served from
an S3 link; its Content-Security-Policy forbids loading anything else and running scripts.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Iterable, Sequence
from html import escape

# Nothing but inline styles and data: images, even if text slipped through unescaped.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d2329; margin: 0 auto; max-width: 1500px; padding: 0 24px 48px; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 40px; border-bottom: 2px solid #d8dee4; }
h3 { margin: 24px 0 8px; }
.meta, .note { color: #57606a; } .note { font-size: 13px; }
nav a { margin-right: 14px; }
/* A table wider than the page scrolls inside its own box: the page itself never scrolls
   sideways, whatever the window's width. */
.scroll { overflow-x: auto; max-width: 100%; margin: 8px 0 16px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d8dee4; padding: 4px 8px; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }
.meta code, nav, p { overflow-wrap: anywhere; }
th { background: #f3f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.failed td { background: #fff0f0; }
.ci { color: #57606a; font-size: 12px; white-space: nowrap; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre.error { background: #fff0f0; border: 1px solid #f0b4b4; padding: 10px;
            white-space: pre-wrap; overflow-wrap: anywhere; }
.state { font-weight: 600; } .state-failed { color: #b42318; } .state-done { color: #1a7f37; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
figure { margin: 0; } figure.plot { min-width: 0; max-width: 100%; }
figure.plot img { max-width: 100%; height: auto; max-height: 720px; }
/* A confusion matrix is drawn at the size its labels need (plots.confusion_matrix_figure);
   only the page's width may scale it down. */
figure.plot.matrix img { max-height: none; }
table.counts td.diagonal { font-weight: 700; }
details { margin: 4px 0 12px; } summary { cursor: pointer; color: #57606a; }
.settings { display: inline-block; max-width: 320px; } code.kv { white-space: nowrap; }
figcaption { font-size: 12px; color: #57606a; }
.thumbs { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
figure.thumb { border: 1px solid #d8dee4; padding: 6px; background: #fafbfc; }
figure.thumb img { width: 128px; height: 128px; object-fit: contain; display: block;
                   margin: 0 auto 4px; background: #fff; }
figure.thumb figcaption { overflow-wrap: anywhere; }
.warning { background: #fff8e5; border: 1px solid #e3b341; border-left-width: 5px;
           padding: 6px 10px; }
.pass { color: #1a7f37; font-weight: 600; }
td.warn { background: #fff8e5; color: #9a6700; font-weight: 600; }
table.pairs img { width: 128px; height: 128px; object-fit: contain; display: block;
                  background: #fff; }
table.pairs .note { display: block; max-width: 180px; overflow-wrap: anywhere; }
"""


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def text(value: object) -> str:
    return escape(str(value))


def anchor(name: str) -> str:
    """An id that is safe in an attribute and a URL fragment."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def image(data: bytes, alt: str, *, mime: str = "image/png", css_class: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    klass = f' class="{css_class}"' if css_class else ""
    return f'<img{klass} src="data:{mime};base64,{encoded}" alt="{escape(alt)}">'


def figure(data: bytes, caption: str, *, css_class: str = "") -> str:
    caption_html = f"<figcaption>{text(caption)}</figcaption>"
    klass = f"plot {css_class}".strip()
    return f'<figure class="{klass}">{image(data, caption)}{caption_html}</figure>'


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, row_classes=None, css_class=""
) -> str:
    """A table whose cells are already HTML (build them with text(), number(), ...)."""
    head = "".join(f"<th>{text(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        klass = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{klass}>" + "".join(_cell(c) for c in row) + "</tr>")
    attributes = f' class="{css_class}"' if css_class else ""
    return (
        f'<div class="scroll"><table{attributes}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _cell(html: str) -> str:
    return html if html.startswith("<td") else f"<td>{html}</td>"


def number(value: float | int | None, digits: int = 3) -> str:
    """A right-aligned numeric cell; "—" for missing or undefined (NaN) values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td class="num">—</td>'
    shown = f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"
    return f'<td class="num">{shown}</td>'


def with_interval(value: float | None, low: float | None, high: float | None) -> str:
    """A value and its 95 % interval beneath it, in one numeric cell."""
    if value is None or math.isnan(value):
        return number(None)
    ci = (
        ""
        if low is None or math.isnan(low)
        else f'<br><span class="ci">{low:.3f}–{high:.3f}</span>'
    )
    return f'<td class="num">{value:.3f}{ci}</td>'


def duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "—"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def settings_text(settings: dict | None) -> str:
    """A config dict as compact `key=value` items that wrap between items, not inside."""
    if not settings:
        return "—"
    items = (f'<code class="kv">{text(k)}={text(rounded(v))}</code>' for k, v in settings.items())
    return f'<span class="settings">{" ".join(items)}</span>'


SIGNIFICANT_DIGITS = 4


def rounded(value: object, digits: int = SIGNIFICANT_DIGITS) -> object:
    """A setting as people read it: floats (also inside lists and dicts) to `digits`
    significant digits, so a sampled learning rate shows as 0.001234, not with the 17
    digits Python keeps. Only for display: the stored tables keep every digit."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    return value
