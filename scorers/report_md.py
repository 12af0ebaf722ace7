"""The evaluation part of the report, in Markdown, from `score_all` output alone.

The report stage embeds this text verbatim and `tinymars score` prints it, so an offline re-score
can be compared with the report line by line.
"""

from __future__ import annotations

from typing import Any

from scorers.markdown import format_markdown

VERDICT_MARK = {"supported": "**supported**", "not supported": "not supported", "inconclusive": "_inconclusive_"}


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
    """The effect on its test's scale with its 95% interval: shares and rates in %, d_z as a number."""
    if m["effect"] is None:
        return "–"
    pct = m["scale"] != "dz"
    return (_pct(m["effect"]) if pct else f"{m['effect']:+.3f}") + _interval(m["ci95"], pct)


def _threshold(m: dict[str, Any]) -> str:
    return _pct(m["threshold"]) if m["scale"] != "dz" else f"{m['threshold']:+.2f}"


def _units(m: dict[str, Any]) -> str:
    if m["n_informative"] == m["n"]:
        return f"{m['n']} {m['unit']}s"
    return f"{m['n_informative']} of {m['n']} prompts decided"


def hypotheses_section(hypotheses: list[dict[str, Any]]) -> list[str]:
    if not hypotheses:
        return ["## Hypotheses (pre-registered)", "", "_No hypotheses were pre-registered in this profile._", ""]
    summary = [[h["id"], _claim(h), h["family_size"], VERDICT_MARK[h["verdict"]]] for h in hypotheses]
    rows = [[h["id"], m["capability"], m["test"], _units(m), f"{_effect(m)} ({m['effect_label']})",
             f"{_threshold(m)} (null {_pct(m['null']) if m['scale'] != 'dz' else '0'})", _p(m["p"]), _p(m["p_holm"]),
             "–" if m["n_needed"] is None else m["n_needed"], f"{VERDICT_MARK[m['verdict']]}: {m['reason']}"]
            for h in hypotheses for m in h["members"]]
    return ["## Hypotheses (pre-registered)", "",
            "Each claim, its minimal effect of interest and its alpha were fixed in the profile before the run; "
            "docs/methods.md gives each test's unit, null and reason. The prompt is the unit (rows of one prompt "
            "are aggregated first); every test is one-sided in the claimed direction; a family over several "
            "capabilities is Holm-corrected. *n for 80% power* is fixed by the design: the units the test needs "
            "to detect the minimal effect at alpha / family size, never computed from the observed effect. "
            "Supported: Holm p < alpha. Not supported: the 95% interval lies below the minimal effect, or the "
            "test had the units it needed and was not significant. Inconclusive: neither.", "",
            *_table(["id", "claim", "capabilities", "verdict"], summary), "",
            *_table(["id", "capability", "test", "units", "effect [95% CI]", "minimal effect", "p", "p (Holm)",
                     "n for 80% power", "verdict"], rows), ""]


def _delta(d: dict[str, Any]) -> str:
    """A mean per-prompt difference: +x pp [95% CI] and the two-sided sign test p (when there were prompts)."""
    value = "–" if d.get("delta") is None else f"{100 * d['delta']:+.1f} pp"
    return value + _interval(d.get("ci95"), True) + ("" if d.get("p") is None else f" p {_p(d['p'])}")


_STEER_NOTE = (" STEER carries only the directional concepts (affect, time, ethics): it has no selection rows, "
               "so its selection cells are empty.")


def channel_vs_text_section(rows: list[dict[str, Any]], arms: list[str]) -> list[str]:
    if not rows:
        return []
    pairs = list(rows[0]["deltas"])
    header = ["capability", "kind", "metric", *[f"{a} rate [95% CI]" for a in arms],
              *[f"{p} [95% CI] sign-test p" for p in pairs], *[f"{a} prompt tok" for a in arms]]
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
            "Each arm's mean per-prompt value on the same prompts (selection: dominant rate; register: net "
            "direction = (wins - losses) / prompts, so a tie is not a loss; conflict: rate of rows following the "
            "channel), with a 95% bootstrap interval over prompts; the mean per-prompt difference of each arm pair "
            "with its bootstrap 95% CI and the two-sided sign test on the prompts where the two arms differ; and "
            "the prompt tokens each arm spends." + _STEER_NOTE * ("steer" in arms), "",
            *_table(header, body), ""]


def steer_section(scores: dict[str, Any]) -> list[str]:
    """STEER next to the other arms on the directional concepts: how it was injected, then per capability
    every arm's value (with its own test's p), and the paired sign tests of STEER vs ABLATED and MARS vs STEER."""
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
        rows.append([r["capability"], r["kind"], r["arms"]["steer"]["prompts"], *cells,
                     *[_delta(r["deltas"].get(k, {})) for k in ("steer-ablated", "mars-steer")]])
    return ["## STEER arm (activation addition)", "",
            "The native model with channels zeroed and the plain prompt (as ABLATED), the row's state added to the "
            "residual stream at every position: multiplier x concept coefficient (the row's place between the "
            f"concept's poles, in [-1, 1]) x mean residual norm x unit direction. Injected at {how}. STEER carries "
            "only the directional concepts (affect, time, ethics); memory / identity / continuity rows get no "
            "STEER generation. Value = net direction (register) or the rate of rows following the channel "
            "(conflict); p in brackets is the per-arm sign test (register) or the t-test of per-prompt rates vs "
            "0.5 (conflict); the last two columns are mean per-prompt differences [95% CI] with the two-sided "
            "sign test p.", "",
            *_table(["capability", "kind", "prompts", *[f"{a} value" for a in arms], "steer - ablated", "mars - steer"],
                    rows), ""]


def _value(metric: str, x: float | None) -> str:
    """A per-prompt mean: a rate in %, or for `directional` the net direction in [-1, 1]."""
    if x is None:
        return "–"
    return f"{x:+.2f}" if metric == "directional" else _pct(x)


def persistence_section(p: dict[str, Any]) -> list[str]:
    if not p["segments"]:
        return []
    n = p["n_segments"]
    seg = [[r["capability"], r["metric"], r["arm"], r["n"][0], *[_value(r["metric"], x) for x in r["rates"]]]
           for r in p["segments"]]
    out = ["## Persistence", "",
           f"Primary metric on each of {n} equal word spans of the response (turn 0), per prompt (dominant / "
           "follows-the-channel rates in %, register as net direction): an effect that holds stays level from "
           "the first span to the last.", "",
           *_table(["capability", "metric", "arm", "prompts", *[f"span {i + 1}" for i in range(n)]], seg), ""]
    if p["by_turn"]:
        turns = [[r["capability"], r["metric"], r["arm"], r["n"][0], *[_value(r["metric"], x) for x in r["rates"]]]
                 for r in p["by_turn"]]
        out += ["Across follow-up turns (the conversation so far is in the prompt; `mars_cut` answers MARS's own "
                "turn-0 conversation with the channel zeroed from turn 1 on):", "",
                *_table(["capability", "metric", "arm", "prompts", *[f"turn {t}" for t in p["turns"]]], turns), ""]
    if p.get("carry"):
        carry = [[r["capability"], r["metric"], r["turn"], r["n"], _value(r["metric"], r["mars"]),
                  _value(r["metric"], r["mars_cut"]), f"{r['delta']:+.3f}" + _interval(r["ci95"], False)
                  if r["delta"] is not None else "–", f"{r['wins']}/{r['losses']}", _p(r["p"])]
                 for r in p["carry"]]
        out += ["Carry-over: the same conversation with the channel kept (MARS) or cut (MARS_CUT) at that turn. "
                "The difference is what the channel still adds, not what copying the conversation carries: "
                "mean per-prompt difference [bootstrap 95% CI], prompts favouring MARS / MARS_CUT, one-sided "
                "sign test.", "",
                *_table(["capability", "metric", "turn", "prompts", "mars", "mars_cut", "mars - mars_cut",
                         "prompts +/-", "p"], carry), ""]
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
