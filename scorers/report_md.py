"""The evaluation part of the report, in Markdown, from `score_all` output alone.

The report stage embeds this text verbatim and `tinymars score` prints it, so an offline re-score
can be compared with the report line by line.
"""

from __future__ import annotations

from typing import Any

from scorers.markdown import format_markdown

VERDICT_MARK = {"supported": "**supported**", "not supported": "not supported", "underpowered": "_underpowered_"}


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _pct(rate: float | None) -> str:
    return "–" if rate is None else f"{100.0 * rate:.1f}%"


def _interval(ci: list[float] | None, pct: bool) -> str:
    if not ci:
        return ""
    lo, hi = ci
    return f" [{100 * lo:.0f}, {100 * hi:.0f}]" if pct else f" [{lo:.2f}, {hi:.2f}]"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _claim(h: dict[str, Any]) -> str:
    cap = "every capability" if h["capability"] == "all" else h["capability"]
    return f"{h['arm']} beats {h['beats']} on {h['metric']} ({cap}, alpha {h['alpha']})"


def _effect(m: dict[str, Any]) -> str:
    if m["effect"] is None:
        return "–"
    rate_like = m["effect_label"].startswith(("rate", "wins"))
    value = f"{100 * m['effect']:+.1f} pp" if m["effect_label"].startswith("rate ") else \
        (_pct(m["effect"]) if rate_like else f"{m['effect']:+.3f}")
    return value + _interval(m["ci95"], rate_like)


def hypotheses_section(hypotheses: list[dict[str, Any]]) -> list[str]:
    if not hypotheses:
        return ["## Hypotheses (pre-registered)", "", "_No hypotheses were pre-registered in this profile._", ""]
    summary = [[h["id"], _claim(h), h["family_size"], VERDICT_MARK[h["verdict"]]] for h in hypotheses]
    rows = [[h["id"], m["capability"], m["test"], m["n"], f"{_effect(m)} ({m['effect_label']})", _p(m["p"]),
             _p(m["p_holm"]), "–" if m["n_needed"] is None else m["n_needed"], VERDICT_MARK[m["verdict"]]]
            for h in hypotheses for m in h["members"]]
    return ["## Hypotheses (pre-registered)", "",
            "Each claim was fixed in the profile before the run. A family over several capabilities is "
            "Holm-corrected; *n for 80% power* is the number of units an exact test needs at the observed "
            "effect (at alpha / family size).", "",
            *_table(["id", "claim", "capabilities", "verdict"], summary), "",
            *_table(["id", "capability", "test", "n", "effect [95% CI]", "p", "p (Holm)", "n for 80% power",
                     "verdict"], rows), ""]


def _delta(d: dict[str, Any]) -> str:
    """A paired difference of rates: +x pp [95% CI] and the exact McNemar p (when there were units)."""
    value = "–" if d.get("delta") is None else f"{100 * d['delta']:+.1f} pp"
    return value + _interval(d.get("ci95"), True) + ("" if d.get("p") is None else f" p {_p(d['p'])}")


_STEER_NOTE = (" STEER carries only the directional concepts (affect, time, ethics): it has no selection rows, "
               "so its selection cells are empty.")


def channel_vs_text_section(rows: list[dict[str, Any]], arms: list[str]) -> list[str]:
    if not rows:
        return []
    pairs = list(rows[0]["deltas"])
    header = ["capability", "kind", "metric", *[f"{a} rate [95% CI]" for a in arms],
              *[f"{p} [95% CI] McNemar p" for p in pairs], *[f"{a} prompt tok" for a in arms]]
    if "text" in arms:
        header.append("text: extra prompt tok")
    body = []
    for r in rows:
        line = [r["capability"], r["kind"], r["metric"]]
        line += [_pct(r["arms"][a]["rate"]) + _interval(r["arms"][a]["ci95"], True) for a in arms]
        line += [_delta(d) for d in r["deltas"].values()]
        line += [_num(r["tokens"][a]["mean_prompt_tokens"], 1) for a in arms]
        if "text" in arms:
            line.append(_num(r["tokens"]["text_extra_prompt_tokens"], 1))
        body.append(line)
    title = "## Channel vs text" if "text" in arms else "## Arms side by side"
    return [title, "",
            "Success rate of each arm on the same rows (primary metric: dominant / directional / follows the "
            "channel), paired differences with a seeded paired-bootstrap 95% CI and the exact McNemar p on the "
            "discordant units, and the prompt tokens each arm spends." + _STEER_NOTE * ("steer" in arms), "",
            *_table(header, body), ""]


def steer_section(scores: dict[str, Any]) -> list[str]:
    """STEER next to the other arms on the directional concepts: how it was injected, then per capability
    the directional rate (sign test p) of every arm, and the paired McNemar p of STEER vs ABLATED and MARS vs STEER."""
    if "steer" not in scores["arms"]:
        return []
    cfg = scores.get("steer") or {}
    how = (f"layer {cfg['layer']} ({cfg.get('layer_rule', '')}), multiplier {cfg['multiplier']}, method "
           f"`{cfg.get('method')}`, mean residual norm at that layer {_num(cfg.get('layer_norm'), 2)}") if cfg else \
        "injection settings not recorded"
    arms = scores["arms"]
    rows = []
    for r in scores["channel_vs_text"]:
        if r["kind"] == "selection":
            continue
        block = scores["capabilities"].get(r["capability"], {})
        tests = block.get("arms", {}) if r["kind"] == "register" else block.get("conflict", {}).get("arms", {})
        cells = [_pct(r["arms"][a]["rate"]) + ("" if a not in tests else f" (p {_p(tests[a]['p'])})") for a in arms]
        rows.append([r["capability"], r["kind"], r["arms"]["steer"]["n"], *cells,
                     *[_delta(r["deltas"].get(k, {})) for k in ("steer-ablated", "mars-steer")]])
    return ["## STEER arm (activation addition)", "",
            "The native model with channels zeroed and the plain prompt (as ABLATED), the row's state added to the "
            "residual stream at every position: multiplier x concept coefficient (the row's place between the "
            f"concept's poles, in [-1, 1]) x mean residual norm x unit direction. Injected at {how}. STEER carries "
            "only the directional concepts (affect, time, ethics); memory / identity / continuity rows get no "
            "STEER generation. Rate = directional (register) or follows the channel (conflict); p in brackets is "
            "the per-arm sign test (register) or binomial vs 0.5 (conflict); the last two columns are paired "
            "differences [95% CI] with the exact McNemar p.", "",
            *_table(["capability", "kind", "n", *[f"{a} rate" for a in arms], "steer - ablated", "mars - steer"],
                    rows), ""]


def persistence_section(p: dict[str, Any]) -> list[str]:
    if not p["segments"]:
        return []
    n = p["n_segments"]
    seg = [[r["capability"], r["metric"], r["arm"], r["n"][0], *[_pct(x) for x in r["rates"]]] for r in p["segments"]]
    out = ["## Persistence", "",
           f"Primary metric on each of {n} equal word spans of the response (turn 0): an effect that "
           "holds stays level from the first span to the last.", "",
           *_table(["capability", "metric", "arm", "n", *[f"span {i + 1}" for i in range(n)]], seg), ""]
    if p["by_turn"]:
        turns = [[r["capability"], r["metric"], r["arm"], r["n"][0], *[_pct(x) for x in r["rates"]]]
                 for r in p["by_turn"]]
        out += ["Across follow-up turns (the arm's channel stays set; the conversation so far is in the prompt):",
                "", *_table(["capability", "metric", "arm", "n", *[f"turn {t}" for t in p["turns"]]], turns), ""]
    return out


def similarity_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    body = [[r["capability"], r["pair"], r["n"], _num(r["mean"]), _num(r["median"]), _pct(r["identical"])]
            for r in rows]
    return ["## Response distance between arms", "",
            "Lexical cosine distance (1 - cosine of word-count vectors) between two arms' responses to the "
            "same row: 0 = the same words, 1 = none shared. A channel that changes nothing gives 0.", "",
            *_table(["capability", "arms", "n", "mean distance", "median", "identical"], body), ""]


def relief_section(relief: dict[str, Any]) -> list[str]:
    rows = []
    for name, r in relief["models"].items():
        z, on = r["channels_zeroed"], r.get("channels_on")
        rows.append([name, _num(z["nats_per_token"], 4), _num(z.get("bits_per_byte"), 4),
                     _num(on["nats_per_token"], 4) if on else "–", _num(on.get("bits_per_byte"), 4) if on else "–",
                     z["tokens"]])
    out = ["## Relief valve (held-out target loss, nats/token and bits/byte)", "",
           *_table(["model", "nats/token (channels zeroed)", "bits/byte (zeroed)", "nats/token (channels on)",
                    "bits/byte (on)", "tokens"], rows), ""]
    if relief["versus"]:
        vs = [[relief["target"], v["baseline"], f"{v['delta_nats']:+.4f}",
               "–" if v["delta_bpb"] is None else f"{v['delta_bpb']:+.4f}"] for v in relief["versus"]]
        out += [f"Native `{relief['target']}` with channels zeroed minus each channel-less baseline (positive: "
                "the native leans on its channels). Channel benefit (zeroed minus on): "
                f"{_num(relief.get('channel_benefit_nats'), 4)} nats/token.", "",
                *_table(["native", "baseline", "delta nats/token", "delta bits/byte"], vs), ""]
    return out


def gates_section(g: dict[str, Any]) -> list[str]:
    if not g:
        return []
    names = g["channel_names"]
    rows = [[i, *[f"{x:+.4f}" for x in layer]] for i, layer in enumerate(g["per_layer"])]
    rows.append(["L2 over layers", *[f"{g['per_channel_l2'][n]:.4f}" for n in names]])
    return [f"## Gates (alpha_l2 = {g['alpha_l2']:.4f})", "", *_table(["layer", *names], rows), ""]


def format_evaluation(scores: dict[str, Any]) -> str:
    """Hypotheses, per-capability tables, channel vs text, the STEER arm, persistence, distances, relief, gates."""
    parts = hypotheses_section(scores["hypotheses"])
    model = f" (model `{scores['model']}`)" if scores["model"] else ""
    parts += [f"## Evaluation: MARS vs ABLATED{model}", "",
              format_markdown(scores["capabilities"]).rstrip(), ""]
    parts += channel_vs_text_section(scores["channel_vs_text"], scores["arms"])
    parts += steer_section(scores)
    parts += persistence_section(scores["persistence"])
    parts += similarity_section(scores["similarity"])
    parts += relief_section(scores["relief"])
    parts += gates_section(scores["gates"])
    return "\n".join(parts).rstrip() + "\n"
