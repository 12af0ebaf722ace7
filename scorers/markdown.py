"""Markdown tables of `score_generations` output, for the report stage (reads only the scores dict).

These tables describe; the verdicts are the pre-registered hypotheses' (docs/methods.md).
"""

from __future__ import annotations

from typing import Any

SELECTION_HEADER = (
    "capability|rows|MARS dominant|ABLATED dominant|delta|both|MARS only|ABLATED only|neither|"
    "prompts MARS/ABLATED better|p|verdict"
)
REGISTER_HEADER = "capability|arm|pairs|wins|losses|ties|reliability|mean gap|VADER gap|p|verdict"
CONFLICT_HEADER = ("capability|arm|rows|follows channel|follows text|rate|95% CI|p|"
                   "prompts|channel decides|pair rate|95% CI|pair p vs ABLATED|verdict")


def _num(value: float | None, digits: int, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _pct(rate: float | None) -> str:
    return "–" if rate is None else f"{100.0 * rate:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "–" if not ci else f"[{100.0 * ci[0]:.0f}, {100.0 * ci[1]:.0f}]%"


def _verdict(block: dict[str, Any], arm: str = "mars") -> str:
    if arm != "mars":
        return ""
    return "significant" if block.get("significant") else "n.s."


def _table(header: str, rows: list[list[Any]]) -> list[str]:
    names = header.split("|")
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _selection_row(cap: str, b: dict[str, Any]) -> list[Any]:
    t = b["mcnemar"]
    return [cap, b["n"], _pct(b["mars_dominant_rate"]), _pct(b["ablated_dominant_rate"]),
            _num(b["delta_pp"], 1, " pp"), t["both"], t["mars_only"], t["ablated_only"], t["neither"],
            f"{b.get('prompts_mars_better', '–')}/{b.get('prompts_ablated_better', '–')}", _p(b["p"]),
            _verdict(b)]  # fmt: skip


def _register_row(cap: str, arm: str, a: dict[str, Any], b: dict[str, Any]) -> list[Any]:
    return [cap, arm, a["pairs"], a["wins"], a["losses"], a["ties"], _num(a["reliability"], 1, "%"),
            _num(a["mean_gap"], 2), _num(a.get("vader_mean_gap"), 3), _p(a["p"]),
            _verdict(b, arm)]  # fmt: skip


def _conflict_row(cap: str, arm: str, a: dict[str, Any], b: dict[str, Any]) -> list[Any]:
    return [cap, arm, a["n"], a["follows_channel"], a["follows_text"], _pct(a["rate"]), _ci(a["ci95"]),
            _p(a["p"]), a.get("pairs", "–"), a.get("channel_decides", "–"), _pct(a.get("pair_rate")),
            _ci(a.get("pair_ci95")), _p(a.get("pair_p")), _verdict(b, arm)]  # fmt: skip


def format_markdown(scores: dict[str, Any]) -> str:
    """Selection, register and conflict tables (only the sections that have rows)."""
    blocks = {cap: b for cap, b in scores.items() if isinstance(b, dict)}
    sel = [_selection_row(cap, b) for cap, b in blocks.items() if b.get("kind") == "selection"]
    reg = [_register_row(cap, arm, a, b) for cap, b in blocks.items() if b.get("kind") == "register"
           for arm, a in b["arms"].items()]  # fmt: skip
    con = [_conflict_row(cap, arm, a, b["conflict"]) for cap, b in blocks.items() if "conflict" in b
           for arm, a in b["conflict"]["arms"].items()]  # fmt: skip
    alphas = [b["alpha"] for b in blocks.values() if "alpha" in b]
    note = f" (alpha = {alphas[0]})" if alphas else ""
    parts: list[str] = []
    for title, header, rows in (
        (f"Selection: dominant; rows paired MARS vs ABLATED, one-sided sign test on per-prompt differences{note}",
         SELECTION_HEADER, sel),
        (f"Register: directional per prompt, one-sided sign test on wins vs losses{note}", REGISTER_HEADER, reg),
        (f"Conflict: response follows the channel; rows: t-test of per-prompt rates vs 0.5 (t interval), "
         f"pairs: both rows of a prompt follow the channel, one-sided sign test over ABLATED on prompts{note}",
         CONFLICT_HEADER, con),
    ):
        if rows:
            parts += [f"### {title}", "", *_table(header, rows), ""]
    if not parts:
        return "_No generations were scored._\n"
    return "\n".join(parts).rstrip() + "\n"
