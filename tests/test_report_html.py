"""report.md -> report.html: the report's Markdown subset, escaping, and figures under their headings."""

from __future__ import annotations

import base64

from tasks import report_plots
from tasks.report_html import markdown_to_html, render_html

MD = """# Title: `tiny`

Plain <b>text</b> with **bold**, _italic_ and alpha_l2 kept as is.

## Models

| model | loss |
|---|---|
| native | 1.5 < 2 |

<details><summary>stats</summary>

```json
{"a": "<x>"}
```
</details>

## Relief valve (held-out)

done
"""


def test_markdown_subset_and_escaping() -> None:
    body = markdown_to_html(MD)
    assert "<h1>Title: <code>tiny</code></h1>" in body
    assert "Plain &lt;b&gt;text&lt;/b&gt; with <strong>bold</strong>, <em>italic</em> and alpha_l2 kept" in body
    assert "<tr><th>model</th><th>loss</th></tr>" in body and "<td>1.5 &lt; 2</td>" in body
    assert "<details><summary>stats</summary>" in body and '{"a": "&lt;x&gt;"}' in body
    assert body.count("<table>") == 1


def test_figures_sit_under_their_heading_as_data_uris() -> None:
    png = b"\x89PNG fake"
    page = render_html("t", MD, {"Relief valve": [("relief bars", png)], "Nowhere": [("x", png)]})
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert page.count(uri) == 1  # a prefix that matches no heading places nothing
    assert page.index("<h2>Relief valve (held-out)</h2>") < page.index(uri) < page.index("<p>done</p>")
    assert page.startswith("<!DOCTYPE html>") and "<figcaption>relief bars</figcaption>" in page


def test_plots_are_deterministic_pngs_and_skip_when_empty() -> None:
    curves = {"native": [{"step": s, "loss": 5.0 / s, "heldout_loss": 6.0 / s if s % 2 == 0 else None,
                          "alpha_l2": 0.1 * s, "gates": [[0.01 * s, -0.02 * s]]} for s in range(1, 6)]}
    a, b = report_plots.loss_curves(curves), report_plots.loss_curves(curves)
    assert a == b and a.startswith(b"\x89PNG")
    assert report_plots.alpha_curves(curves, ["memory", "affect"]).startswith(b"\x89PNG")
    assert report_plots.loss_curves({"native": []}) is None
    assert report_plots.gate_heatmap({}) is None and report_plots.relief_bars({"models": {}}) is None
    assert report_plots.persistence_lines({"segments": [], "by_turn": []}) is None
