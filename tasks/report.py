"""Report stage: report.md (every table of the iteration), report.html (the same, with plots),
metrics.json (the iteration's numbers and verdicts), and Prefect artifacts (markdown + tables).

Every figure it shows is read from files inside its inputs' content hashes (corpus.jsonl and stats.json,
pack.json, each model's model.json and metrics.jsonl, the score artifact's scores.json, the steer
artifact's quality.json), never from manifest metadata or lineage rows: the report's key is those hashes,
so two inputs with the same hash can never be shown with different numbers.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from tasks.common import artifact_of, logger, run_stage
from tinymars.profile import Profile

WALL_CLOCK = ("tok_per_s", "sec_per_step")  # never inside an artifact (same inputs, same bytes)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def corpus_figures(corpus_dir: Path) -> dict[str, Any]:
    """The corpus numbers the report shows, from the corpus artifact's hashed files (not its manifest meta)."""
    from corpus.rows import read_rows
    from tasks.corpus import corpus_summary

    rows = read_rows(corpus_dir / "corpus.jsonl")
    stats = json.loads((corpus_dir / "stats.json").read_text())
    rejected = stats.get("rejected")
    splits = Counter(r["split"] for r in rows)
    return {"metrics": {"rows": len(rows), "rows_train": splits["train"], "rows_heldout": splits["heldout"],
                        "rejected": sum(rejected.values()) if isinstance(rejected, dict) else 0},
            "stats": {**stats, "summary": corpus_summary(rows, stats)}}


def model_figures(model_dir: Path) -> dict[str, Any]:
    """A trained model's arch and numbers from its hashed model.json (wall-clock figures live only in lineage)."""
    info = json.loads((model_dir / "model.json").read_text())
    numbers = {k: v for k, v in sorted(info.items()) if isinstance(v, int | float) and not isinstance(v, bool)}
    return {"arch": info["arch"], "metrics": numbers}


def render_report(profile: Profile, corpus: dict, pack_meta: dict, models: dict[str, dict], scores: dict,
                  quality: dict | None = None, organ: list[dict] | None = None) -> str:
    """report.md; `corpus` / `models` as corpus_figures / model_figures return them, `quality` the steer
    artifact's quality.json (when the steer stage ran), `organ` the single-vs-integrated rows (scorers.organ)."""
    from scorers.crosstalk import crosstalk_markdown
    from scorers.organ import organ_markdown
    from scorers.report_md import format_evaluation

    t = profile.report.title
    parts = [f"# {t}: `{profile.name}`", "", profile.description.strip(), ""]
    stats = corpus.get("stats", {})
    parts += ["## Corpus", "", f"Teacher: `{profile.corpus.teacher.kind}`, seed {profile.corpus.seed}.", ""]
    m = corpus.get("metrics", {})
    parts += [_table(["rows", "train", "held-out", "rejected by pre-flight"],
                     [[m.get("rows"), m.get("rows_train"), m.get("rows_heldout"), m.get("rejected")]]), ""]
    if stats:
        parts += ["<details><summary>corpus stats</summary>", "", "```json", json.dumps(stats, indent=1),
                  "```", "</details>", ""]
    parts += ["## Packed data", "",
              _table(["seq_len", "vocab", "channels", "train rows", "train tokens", "held-out rows", "truncated"],
                     [[pack_meta["seq_len"], pack_meta["vocab_size"], ", ".join(pack_meta["channel_names"]),
                       pack_meta["rows"]["train"], pack_meta["tokens"]["train"], pack_meta["rows"]["heldout"],
                       pack_meta["truncated_rows"]]]), ""]
    parts += ["## Models", ""]
    rows = []
    for name, info in sorted(models.items()):
        mm = info["metrics"]
        rows.append([name, info["arch"], f"{int(mm.get('num_params', 0)):,}", _fmt(mm.get("final_loss")),
                     _fmt(mm.get("final_heldout_loss")), _fmt(mm.get("alpha_l2"))])
    # no tok/s column: wall clock would make the same inputs give different bytes (`tinymars runs` has it)
    parts += [_table(["model", "arch", "params", "final train loss", "held-out loss", "alpha_l2"], rows), ""]
    parts += [f"Weights evaluated (`eval.weights: {profile.eval.weights}`): " + "; ".join(
        f"{name}: {evaluated_weights(info['metrics'], profile.eval.weights, profile.train.steps)}"
        for name, info in sorted(models.items())) + ".", ""]
    parts += [format_evaluation(scores)]
    parts += organ_markdown(organ or [], scores["model"])
    parts += crosstalk_markdown(scores.get("crosstalk"))
    parts += concept_quality_section(quality)
    parts += ["## Settings", "", f"Profile `{profile.name}`, hash `{profile.hash()[:16]}`.", "",
              "<details><summary>the whole profile</summary>", "", "```json",
              json.dumps(profile.model_dump(mode="json"), indent=1, sort_keys=True), "```", "</details>", ""]
    return "\n".join(parts).rstrip() + "\n"


def evaluated_weights(numbers: dict[str, Any], choice: str, steps: int) -> str:
    """Which weights the evaluation loaded, from a model.json's numbers: the label
    models.checkpoint.weights_folder gives the same folder (tests/test_best_weights.py holds them equal)."""
    if choice == "best" and numbers.get("best_step") is not None:
        return (f"best (step {int(numbers['best_step'])}, held-out loss {numbers['best_heldout_loss']:.4f}) "
                f"of {steps} steps")
    if choice == "best":
        return "last (no held-out evaluation recorded a best; fell back to the last weights)"
    return "last"


def concept_quality_section(quality: dict | None) -> list[str]:
    """The steer stage's concept-quality tables, when steering ran (no steer artifact: no section)."""
    from scorers.concept_quality import quality_section

    return [] if quality is None else [*quality_section(quality), ""]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}" if isinstance(v, float) else str(v)


def model_channels(model_dir: Path, default: list[str]) -> list[str]:
    """The channels a trained model reads (its model.json config; a subset model reads fewer)."""
    path = model_dir / "model.json"
    if not path.is_file():
        return default
    return (json.loads(path.read_text()).get("config") or {}).get("channel_names", default)


def read_curves(model_dir: Path) -> list[dict[str, Any]]:
    """The logged training points of one model (metrics.jsonl), or [] when it has none."""
    path = model_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report_figures(curves: dict[str, list[dict[str, Any]]], scores: dict[str, Any],
                   channel_names: list[str] | dict[str, list[str]]) -> dict[str, list[tuple[str, bytes]]]:
    """Figures keyed by the report heading they sit under (see tasks.report_html)."""
    from tasks import report_plots as plots

    arms = scores["arms"]
    wanted = {
        "Models": [("Loss curves of all models", plots.loss_curves(curves)),
                   ("alpha_l2 and per-channel gate norms over steps", plots.alpha_curves(curves, channel_names))],
        "Evaluation": [("Per-capability success rate per arm, 95% CI",
                        plots.capability_rates(scores["channel_vs_text"], arms)),
                       ("Conflict rate per arm, 95% CI", plots.conflict_rates(scores["channel_vs_text"], arms))],
        "Persistence": [("MARS minus ABLATED per response span and turn",
                         plots.persistence_lines(scores["persistence"]))],
        "Relief valve": [("Held-out loss per model, channels zeroed and on", plots.relief_bars(scores["relief"]))],
        "Gates": [("Final gates per layer and channel", plots.gate_heatmap(scores["gates"]))],
        "Crosstalk matrix": [("Crosstalk: channel moved (rows) x capability measured (columns)",
                              plots.crosstalk_heatmap(scores.get("crosstalk")))],
    }
    return {k: [(c, png) for c, png in figs if png is not None] for k, figs in wanted.items()}


def iteration_metrics(profile: Profile, models: dict[str, dict], scores: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the per-iteration numbers (`tinymars compare` reads it), no wall-clock figures."""
    from scorers.evaluate import headline_metrics

    return {
        "profile": profile.name,
        "profile_hash": profile.hash(),
        "eval_model": scores["model"],
        "eval": headline_metrics(scores),
        "models": {n: {k: v for k, v in sorted(info["metrics"].items()) if k not in WALL_CLOCK}
                   for n, info in sorted(models.items())},
        "hypotheses": {h["id"]: h["verdict"] for h in scores["hypotheses"]},
    }


def _publish(profile: Profile, folder: Path, scores: dict[str, Any]) -> None:
    """Prefect UI artifacts: the report and two tables (only inside a flow run)."""
    hyp_rows = [{"hypothesis": h["id"], "capability": m["capability"], "test": m["test"], "n": m["n"],
                 "effect": m["effect"], "p": m["p"], "p_holm": m["p_holm"], "n_for_80pct_power": m["n_needed"],
                 "verdict": m["verdict"]} for h in scores["hypotheses"] for m in h["members"]]
    cap_rows = [{"capability": r["capability"], "kind": r["kind"], "metric": r["metric"],
                 **{f"{arm}_rate": a["rate"] for arm, a in r["arms"].items()},
                 **{f"{pair}_delta": d["delta"] for pair, d in r["deltas"].items()}}
                for r in scores["channel_vs_text"]]
    try:
        create_markdown_artifact(key="tinymars-report", markdown=(folder / "report.md").read_text(),
                                 description=profile.name)
        if hyp_rows:
            create_table_artifact(key="tinymars-hypotheses", table=hyp_rows,
                                  description=f"{profile.name}: pre-registered hypotheses")
        if cap_rows:
            create_table_artifact(key="tinymars-capabilities", table=cap_rows,
                                  description=f"{profile.name}: success rate per capability and arm")
    except MissingContextError:
        pass


@task(name="report", cache_policy=NO_CACHE)
def report_task(
    profile: Profile,
    home: str,
    corpus: dict[str, Any],
    pack: dict[str, Any],
    trained: dict[str, dict[str, Any]],
    scored: dict[str, Any],
    steer: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
    others: dict[str, dict[str, Any]] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """`generation` and `others` (the organ experiment): the evaluated model's generate record and every other
    evaluated model's, {name: generate record}; single-channel ones are compared with the evaluated one."""
    singles = {name: profile.model_channels(name)[0] for name in others or {}
               if len(profile.model_channels(name)) == 1}
    inputs = {"corpus": artifact_of(corpus), "pack": artifact_of(pack), "score": artifact_of(scored),
              **{f"model:{n}": artifact_of(r) for n, r in sorted(trained.items())},
              **({"steer": artifact_of(steer)} if steer is not None else {}),
              **({"generate": artifact_of(generation)} if singles and generation is not None else {}),
              **{f"generate:{n}": artifact_of(others[n]) for n in sorted(singles) if generation is not None}}

    def build(out: Path) -> dict[str, Any]:
        from scorers.io import write_json
        from tasks.report_html import render_html

        pack_meta = json.loads(inputs["pack"].file("pack.json").read_text())
        scores = json.loads(inputs["score"].file("scores.json").read_text())
        models = {n: model_figures(Path(inputs[f"model:{n}"].path)) for n in trained}
        quality = json.loads(inputs["steer"].file("quality.json").read_text()) if "steer" in inputs else None
        organ = None
        if "generate" in inputs:
            from scorers.io import read_generations
            from scorers.organ import organ_table

            integrated = read_generations(inputs["generate"].file("generations.jsonl"))
            organ = organ_table(integrated, {cap: (name, read_generations(
                inputs[f"generate:{name}"].file("generations.jsonl"))) for name, cap in sorted(
                singles.items(), key=lambda kv: profile.channels.names.index(kv[1]))}, profile.eval.alpha)
        text = render_report(profile, corpus_figures(Path(inputs["corpus"].path)), pack_meta, models, scores, quality,
                             organ)
        (out / "report.md").write_text(text, encoding="utf-8")
        write_json(out / "metrics.json", iteration_metrics(profile, models, scores))
        if profile.report.html:
            curves = {n: read_curves(Path(inputs[f"model:{n}"].path)) for n in trained}
            figures = report_figures(curves, scores, {n: model_channels(Path(inputs[f"model:{n}"].path),
                                                                        pack_meta["channel_names"]) for n in trained})
            page = render_html(f"{profile.report.title}: {profile.name}", text, figures)
            (out / "report.html").write_text(page, encoding="utf-8")
        return {"meta": {"metrics": {}}}

    # The report renders settings from every section (name, teacher, seeds, eval settings), so its
    # key is the whole profile, not just the report section.
    result = run_stage("report", home, profile.model_dump(mode="json"), inputs, build, force)
    folder = Path(result["artifact"]["path"])
    _publish(profile, folder, scores=json.loads(artifact_of(scored).file("scores.json").read_text()))
    html_note = f" and {folder / 'report.html'}" if profile.report.html else ""
    logger().info(f"[report] {folder / 'report.md'}{html_note}")
    return result
