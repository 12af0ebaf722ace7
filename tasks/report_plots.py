"""The report's figures as PNG bytes (matplotlib, Agg, no pyplot state): pure functions of the data.

PNGs are written without a timestamp or software tag, so the same data gives the same bytes and the
report artifact stays content-addressed. Each function returns None when it has nothing to draw.
"""

from __future__ import annotations

import io
import math
from typing import Any

ARM_COLORS = {"mars": "#1f77b4", "ablated": "#7f7f7f", "text": "#ff7f0e", "steer": "#2ca02c"}
MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
                "#ff7f0e", "#7f7f7f")


def _figure(width: float = 7.5, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def loss_curves(curves: dict[str, list[dict[str, Any]]]) -> bytes | None:
    """Train loss (solid) and held-out loss (dashed, dots) per model against the step."""
    if not any(curves.values()):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(sorted(curves.items())):
        color = MODEL_COLORS[i % len(MODEL_COLORS)]
        train = [(p["step"], p["loss"]) for p in points if p.get("loss") is not None]
        held = [(p["step"], p["heldout_loss"]) for p in points if p.get("heldout_loss") is not None]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, label=f"{name} train")
        if held:
            ax.plot(*zip(*held, strict=True), color=color, linestyle="--", marker="o", label=f"{name} held-out")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def alpha_curves(curves: dict[str, list[dict[str, Any]]], channel_names: list[str] | dict[str, list[str]]
                 ) -> bytes | None:
    """alpha_l2 (all gates) and each channel's gate norm over layers, per channel model, against the step.

    `channel_names`: the channels every model reads, or per model (a model may read a subset)."""
    models = {n: [p for p in pts if p.get("gates")] for n, pts in sorted(curves.items())}
    models = {n: pts for n, pts in models.items() if pts and any(p["gates"] and p["gates"][0] for p in pts)}
    if not models:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for name, pts in models.items():
        steps = [p["step"] for p in pts]
        ax.plot(steps, [p["alpha_l2"] for p in pts], color="black", linewidth=2.2, label=f"{name} alpha_l2")
        names = channel_names.get(name, []) if isinstance(channel_names, dict) else channel_names
        for c, channel in enumerate(names):
            norms = [math.sqrt(sum(layer[c] ** 2 for layer in p["gates"])) for p in pts]
            label = channel if len(models) == 1 else f"{name}: {channel}"
            ax.plot(steps, norms, linewidth=1.2, label=label, color=MODEL_COLORS[c % len(MODEL_COLORS)])
    ax.set(xlabel="step", ylabel="gate L2 norm", title="ReZero gates over training (alpha_l2 and per channel)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def _grouped_bars(ax, labels: list[str], arms: list[str], rate_ci: dict[str, list[tuple[float | None, Any]]]) -> None:
    width = 0.8 / max(1, len(arms))
    for j, arm in enumerate(arms):
        xs, ys, lo, hi = [], [], [], []
        for i, (rate, ci) in enumerate(rate_ci[arm]):
            if rate is None:
                continue
            xs.append(i + (j - (len(arms) - 1) / 2) * width)
            ys.append(rate)
            lo.append(rate - ci[0] if ci else 0.0)
            hi.append(ci[1] - rate if ci else 0.0)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=arm, color=ARM_COLORS.get(arm, "#17becf"))
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def capability_rates(rows: list[dict[str, Any]], arms: list[str]) -> bytes | None:
    """Success rate per capability (primary metric) for each arm, with Clopper-Pearson 95% CIs."""
    rows = [r for r in rows if r["kind"] != "conflict"]
    if not rows:
        return None
    fig = _figure(8.0, 3.8)
    ax = fig.add_subplot()
    labels = [f"{r['capability']}\n{r['metric']}" for r in rows]
    _grouped_bars(ax, labels, arms, {a: [(r["arms"][a]["rate"], r["arms"][a]["ci95"]) for r in rows] for a in arms})
    ax.set(ylabel="success rate", title="Per-capability success rate by arm (95% CI)")
    return _png(fig)


def conflict_rates(rows: list[dict[str, Any]], arms: list[str]) -> bytes | None:
    """How often the response follows the channel when the prompt text asserts the opposite pole."""
    rows = [r for r in rows if r["kind"] == "conflict"]
    if not rows:
        return None
    fig = _figure(7.0, 3.4)
    ax = fig.add_subplot()
    _grouped_bars(ax, [r["capability"] for r in rows], arms,
                  {a: [(r["arms"][a]["rate"], r["arms"][a]["ci95"]) for r in rows] for a in arms})
    ax.axhline(0.5, color="red", linestyle=":", linewidth=1, label="chance (0.5)")
    ax.set(ylabel="follows the channel", title="Conflict rows: response follows the channel (95% CI)")
    return _png(fig)


def relief_bars(relief: dict[str, Any]) -> bytes | None:
    """Held-out nats/token and bits/byte per model, channels zeroed and (channel models) on."""
    models = relief.get("models") or {}
    if not models:
        return None
    fig = _figure(8.0, 3.4)
    names = list(models)
    for k, (metric, label) in enumerate((("nats_per_token", "nats / token"), ("bits_per_byte", "bits / byte"))):
        ax = fig.add_subplot(1, 2, k + 1)
        zeroed = [models[n]["channels_zeroed"].get(metric) or 0.0 for n in names]
        on = [(models[n].get("channels_on") or {}).get(metric) for n in names]
        ax.bar([i - 0.2 for i in range(len(names))], zeroed, 0.4, label="channels zeroed", color="#7f7f7f")
        ax.bar([i + 0.2 for i, v in enumerate(on) if v is not None], [v for v in on if v is not None], 0.4,
               label="channels on", color="#1f77b4")
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set(ylabel=label, title=f"Relief valve: held-out {label}")
        ax.set_ylim(0, 1.25 * max([*zeroed, *[v for v in on if v is not None], 1e-9]))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    return _png(fig)


def persistence_lines(persistence: dict[str, Any]) -> bytes | None:
    """MARS minus ABLATED success rate on each response span (and turn): does the effect hold?"""
    series = []
    for key, unit in (("segments", "span"), ("by_turn", "turn")):
        rows = {(r["capability"], r["kind"], r["arm"]): r["rates"] for r in persistence.get(key) or []}
        for (cap, kind, arm), rates in rows.items():
            base = rows.get((cap, kind, "ablated"))
            if arm == "mars" and base:
                delta = [None if a is None or b is None else a - b for a, b in zip(rates, base, strict=True)]
                series.append((unit, f"{cap} ({kind})", delta))
    if not series:
        return None
    units = [u for u in ("span", "turn") if any(s[0] == u for s in series)]
    fig = _figure(9.0, 3.6)
    for k, unit in enumerate(units):
        ax = fig.add_subplot(1, len(units), k + 1)
        xs: set[int] = set()
        for i, (_, label, delta) in enumerate(s for s in series if s[0] == unit):
            pts = [(x + 1 if unit == "span" else x, d) for x, d in enumerate(delta) if d is not None]
            xs.update(x for x, _ in pts)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label, color=MODEL_COLORS[i % len(MODEL_COLORS)])
        ax.set_xticks(sorted(xs))
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set(xlabel=unit, ylabel="MARS - ABLATED rate", title=f"Persistence by {unit}")
        ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # one legend, outside the lines
    return _png(fig)


def gate_heatmap(gates: dict[str, Any]) -> bytes | None:
    """Final ReZero gate per layer and channel (blue negative, red positive)."""
    if not gates or not gates.get("per_layer") or not gates["per_layer"][0]:
        return None
    values = gates["per_layer"]
    bound = max(1e-6, max(abs(x) for layer in values for x in layer))
    fig = _figure(6.5, 0.6 + 0.5 * len(values) + 1.2)
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="coolwarm", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(gates["channel_names"])), gates["channel_names"], fontsize=8)
    ax.set_yticks(range(len(values)), [f"layer {i}" for i in range(len(values))], fontsize=8)
    for i, layer in enumerate(values):
        for j, x in enumerate(layer):
            ax.text(j, i, f"{x:+.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"Gates per layer and channel (alpha_l2 = {gates['alpha_l2']:.3f})")
    return _png(fig)


def crosstalk_heatmap(matrix: dict[str, Any] | None) -> bytes | None:
    """The crosstalk matrix: mean per-prompt change of Y's metric when X moves (rows X, columns Y); a frame
    marks cells significant after Holm (the diagonal: the intended effect, unadjusted)."""
    if not matrix or not matrix.get("cells"):
        return None
    chans = matrix["channels"]
    at = {(c["x"], c["y"]): c for c in matrix["cells"]}
    values = [[at[(x, y)]["mean_diff"] if at[(x, y)]["mean_diff"] is not None else 0.0 for y in chans]
              for x in chans]
    bound = max(1e-6, max(abs(v) for row in values for v in row))
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="coolwarm", vmin=-bound, vmax=bound)
    ax.set_xticks(range(len(chans)), chans, fontsize=8)
    ax.set_yticks(range(len(chans)), chans, fontsize=8)
    ax.set_xlabel("capability measured (Y)")
    ax.set_ylabel("channel moved (X)")
    for i, x in enumerate(chans):
        for j, y in enumerate(chans):
            c = at[(x, y)]
            ax.text(j, i, f"{values[i][j]:+.2f}" + ("*" if c["significant"] else ""), ha="center", va="center",
                    fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"Crosstalk (* significant at alpha {matrix['alpha']}, off-diagonal Holm)")
    return _png(fig)
