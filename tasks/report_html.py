"""report.md -> one self-contained report.html: the same text and tables, plus the figures inline.

Only the Markdown the report writes is understood (headings, pipe tables, paragraphs, fenced code,
raw `<details>` lines, `code`, **bold**, _italic_); everything else is escaped text. Figures are PNGs
embedded as data URIs and placed right under the heading they belong to, so the page needs no
network, no script and no file beside it.
"""

from __future__ import annotations

import base64
import html
import re

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #1f77b4; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .15em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f2f5f9; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: .8em 0 1.4em; }
figure img { max-width: 100%; border: 1px solid #e5e5e5; }
figcaption { font-size: 12px; color: #555; }
pre { background: #f6f8fa; padding: .6em; overflow-x: auto; font-size: 12px; }
code { background: #f6f8fa; padding: 0 3px; }
"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])[_*]([^_*]+)[_*](?![\w*])", r"<em>\1</em>", out)
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    head, body = _cells(lines[0]), [_cells(x) for x in lines[2:]]
    rows = ["<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
    rows += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body]
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def figure_html(caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(caption)
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"><figcaption>{alt}</figcaption></figure>'


def markdown_to_html(text: str, figures: dict[str, list[tuple[str, bytes]]] | None = None) -> str:
    """Body HTML; `figures` maps a heading's text prefix (e.g. "Relief valve") to (caption, PNG) pairs."""
    figures = figures or {}
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j]), quote=False) + "</code></pre>")
            i = j + 1
            continue
        if m := re.match(r"^(#{1,4}) (.*)$", line):
            level, title = len(m.group(1)), m.group(2)
            out.append(f"<h{level}>{_inline(title)}</h{level}>")
            plain = re.sub(r"[`*_]", "", title)
            for prefix, figs in figures.items():
                if plain.startswith(prefix):
                    out += [figure_html(caption, png) for caption, png in figs]
            i += 1
            continue
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            i = j
            continue
        if line.startswith("<"):  # the report's own raw HTML (<details>, <summary>)
            out.append(line)
        elif line.strip():
            para = [line]
            while i + 1 < len(lines) and lines[i + 1].strip() and not re.match(r"^(#|\||<|```)", lines[i + 1]):
                i += 1
                para.append(lines[i])
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
        i += 1
    return "\n".join(out)


def render_html(title: str, markdown: str, figures: dict[str, list[tuple[str, bytes]]] | None = None) -> str:
    """A whole page: inline CSS, the report body, the figures as data URIs."""
    body = markdown_to_html(markdown, figures)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
