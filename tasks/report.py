"""Report stage: one Markdown page with every table of the iteration (also a Prefect artifact)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from tasks.common import artifact_of, logger, run_stage
from tinymars.profile import Profile


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_report(profile: Profile, corpus_meta: dict, pack_meta: dict, models: dict[str, dict], scores: dict) -> str:
    from scorers.evaluate import format_markdown

    t = profile.report.title
    parts = [f"# {t}: `{profile.name}`", "", profile.description.strip(), ""]
    stats = corpus_meta.get("stats", {})
    parts += ["## Corpus", "", f"Teacher: `{profile.corpus.teacher.kind}`, seed {profile.corpus.seed}.", ""]
    m = corpus_meta.get("metrics", {})
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
                     _fmt(mm.get("final_heldout_loss")), _fmt(mm.get("alpha_l2")), _fmt(mm.get("tok_per_s"), 0)])
    parts += [_table(["model", "arch", "params", "final train loss", "held-out loss", "alpha_l2", "tok/s"], rows), ""]
    parts += [f"## Evaluation: MARS vs ABLATED (model `{scores['model']}`)", "",
              format_markdown(scores["capabilities"]), ""]
    parts += ["## Relief valve (held-out target loss, nats/token and bits/byte)", ""]
    rr = []
    for name, r in sorted(scores["relief"].items()):
        z = r["channels_zeroed"]
        on = r.get("channels_on")
        rr.append([name, _fmt(z["nats_per_token"], 4), _fmt(z["bits_per_byte"], 4),
                   _fmt(on["nats_per_token"], 4) if on else "–", z["tokens"]])
    parts += [_table(["model", "nats/token (channels zeroed)", "bits/byte (zeroed)", "nats/token (channels on)",
                      "tokens"], rr), ""]
    parts += ["## Settings", "", f"Profile `{profile.name}`, hash `{profile.hash()[:16]}`.", "",
              "<details><summary>the whole profile</summary>", "", "```json",
              json.dumps(profile.model_dump(mode="json"), indent=1, sort_keys=True), "```", "</details>", ""]
    g = scores.get("gates") or {}
    if g:
        parts += [f"## Gates (alpha_l2 = {g['alpha_l2']:.4f})", "",
                  _table(["layer", *g["channel_names"]],
                         [[i, *[f"{x:+.4f}" for x in layer]] for i, layer in enumerate(g["per_layer"])]), ""]
    return "\n".join(parts).rstrip() + "\n"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}" if isinstance(v, float) else str(v)


@task(name="report", cache_policy=NO_CACHE)
def report_task(
    profile: Profile,
    home: str,
    corpus: dict[str, Any],
    pack: dict[str, Any],
    trained: dict[str, dict[str, Any]],
    evaluation: dict[str, Any],
    force: bool = False,
) -> dict[str, Any]:
    inputs = {"corpus": artifact_of(corpus), "pack": artifact_of(pack), "eval": artifact_of(evaluation),
              **{f"model:{n}": artifact_of(r) for n, r in sorted(trained.items())}}

    def build(out: Path) -> dict[str, Any]:
        pack_meta = json.loads(inputs["pack"].file("pack.json").read_text())
        scores = json.loads(inputs["eval"].file("scores.json").read_text())
        models = {n: inputs[f"model:{n}"].meta for n in trained}
        text = render_report(profile, inputs["corpus"].meta, pack_meta, models, scores)
        (out / "report.md").write_text(text, encoding="utf-8")
        return {"meta": {"metrics": {}}}

    # The report renders settings from every section (name, teacher, seeds, eval settings), so its
    # key is the whole profile, not just the report section.
    result = run_stage("report", home, profile.model_dump(mode="json"), inputs, build, force)
    report_md = Path(result["artifact"]["path"]) / "report.md"
    try:
        create_markdown_artifact(key="tinymars-report", markdown=report_md.read_text(), description=profile.name)
    except MissingContextError:
        pass
    logger().info(f"[report] {report_md}")
    return result
