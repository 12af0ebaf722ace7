"""Corpus stage: teacher-generated counterfactual rows (corpus v2), split by prompt (replay is its own stage).

The template teacher is offline and free. An openai teacher pays per call: its answers live in the
call cache under HOME/teacher-cache/ (outside the artifacts), so a killed, failed or budget-stopped
stage reruns without repeating a call, and every call it made is handed back for lineage, on
success and on failure alike.

The held-out split is entity-disjoint by construction (corpus.rows, corpus.template_teacher); the
stage then measures exact and near-duplicate targets across it (corpus.overlap), logs the figures per
capability, records them (lineage metrics, stats.json) and fails above the profile's limits
(corpus.max_exact_duplicate_targets, max_near_duplicate_rate, near_duplicate_jaccard) before the
corpus is published. For an openai teacher the answers are needed to measure, so the check runs after
generation: the calls are paid and cached by then (a rerun with other limits costs nothing), and the
failure hands them to lineage.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import ROOT, logger, run_stage, stage_progress
from tinymars.artifacts import code_version
from tinymars.domain import TEACHER_LIMIT
from tinymars.profile import Profile

# What a teacher corpus's rows depend on beyond STAGE_SOURCES and the profile (prompt files are hashed by
# content): planning, answer parsing, pre-flight scorers. A rebuild after an edit is free: the call
# cache answers every call it has seen.
TEACHER_SOURCES = ("corpus/teacher_corpus.py", "corpus/teacher_prompts.py", "corpus/openai_teacher.py",
                   "corpus/scenarios.py",
                   "corpus/rows.py", "scorers/register.py", "scorers/selection.py",
                   "scorers/text.py", "scorers/lexicons.json")
# Teacher settings that cannot change a row (transport, pacing, money): left out of the stage key, so
# changing them never rebuilds a finished corpus (which, without its call cache, would mean paying again).
NOT_IN_KEY = ("base_url", "api_key_env", "free", "max_concurrency", "timeout_s", "max_usd", "price",
              "requests_per_minute", "tokens_per_minute", "max_retries", "backoff_s", "backoff_max_s",
              "max_retry_after_s", "structured_output", "batch", "batch_poll_s", "prompts_dir",
              "max_truncation_rate")


def key_section(profile: Profile) -> dict[str, Any]:
    """The part of the profile the corpus artifact depends on."""
    section = profile.section("corpus")
    if profile.corpus.teacher.kind != "template":
        from corpus.teacher_prompts import load_templates

        teacher = {k: v for k, v in section["teacher"].items() if k not in NOT_IN_KEY}
        teacher["prompts"] = load_templates(profile.corpus.teacher.prompts_dir).digest
        teacher["code"] = code_version(ROOT / p for p in TEACHER_SOURCES)
        section = {**section, "teacher": teacher}
    return section


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """A budget stop, a rejected key or a bad setting will not heal in 5 seconds: fail at once."""
    exc = getattr(state, "data", None)
    return not (getattr(exc, "final", False) or isinstance(exc, ValueError))


def _prefect_will_retry(exc: Exception) -> bool:
    """Whether Prefect runs this task again after `exc` (then the retry, not the flow, takes its calls)."""
    from prefect.runtime import task_run

    return not getattr(exc, "final", False) and 1 <= task_run.get_run_count() <= CORPUS_RETRIES


CORPUS_RETRIES = 1


@task(name="corpus", cache_policy=NO_CACHE, retries=CORPUS_RETRIES, retry_delay_seconds=5,
      retry_condition_fn=_worth_retrying)
def corpus_task(profile: Profile, home: str, force: bool = False) -> dict[str, Any]:
    section = profile.corpus

    def build(out: Path) -> dict[str, Any]:
        log = logger()
        calls: list[dict[str, Any]] = []
        teacher_meta: dict[str, Any] = {}
        if section.teacher.kind == "template":
            from corpus.template_teacher import generate_corpus

            rows, stats = generate_corpus(
                capabilities=list(section.capabilities),
                prompts_per_capability=section.prompts_per_capability,
                conflict_prompts_per_capability=section.conflict_prompts_per_capability,
                heldout_fraction=section.heldout_fraction,
                seed=section.seed,
            )
        else:
            rows, stats, calls, teacher_meta = _teacher_rows(profile, home)
        if not rows:
            raise ValueError(_empty_corpus_reason(section, stats))
        overlap = _heldout_overlap(rows, section, calls)
        stats = {**stats, "heldout_overlap": overlap}
        with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
        splits = Counter(r["split"] for r in rows)
        rejected = sum(stats.get("rejected", {}).values()) if isinstance(stats.get("rejected"), dict) else 0
        log.info(
            f"[corpus] {len(rows)} rows ({splits['train']} train, {splits['heldout']} held-out), "
            f"{rejected} prompts rejected by pre-flight"
        )
        metrics = {"rows": len(rows), "rows_train": splits["train"], "rows_heldout": splits["heldout"],
                   "rejected": rejected, **overlap_metrics(overlap), **teacher_meta.get("metrics", {})}
        summary = corpus_summary(rows, stats)
        meta = {"metrics": metrics, "stats": {**stats, "summary": summary}, **teacher_meta.get("meta", {})}
        return {"rows": len(rows), "meta": meta, "teacher_calls": calls}

    return run_stage("corpus", home, key_section(profile), {}, build, force)




def teacher_gate():
    """One slot of the Prefect global concurrency limit `tinymars-teacher` per teacher request.

    It bounds teacher calls across every run and worker sharing the Prefect server (`tinymars deploy`
    creates the limit). Without a configured API (ephemeral runs, a notebook) there is no shared limit
    to honour, and asking for one would start Prefect's temporary server just to find that out: the
    client's own concurrency and rate limiter are the bound. strict=False: a server without the limit
    is a no-op too.
    """
    import contextlib

    from prefect.concurrency.asyncio import concurrency
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return contextlib.nullcontext()
    return concurrency(TEACHER_LIMIT, occupy=1, strict=False)


def _teacher_rows(profile: Profile, home: str) -> tuple[list[dict], dict, list[dict], dict]:
    """Rows from the openai teacher; a stop (budget, endpoint down) re-raises with its calls attached."""
    from corpus.openai_teacher import api_key_from_env
    from corpus.teacher_corpus import generate_teacher_corpus

    section, log = profile.corpus, logger()
    teacher = section.teacher
    log.info(f"[corpus] teacher {teacher.model} at {teacher.base_url.split('?')[0]}"
             + (" (Batch API)" if teacher.batch else f", concurrency {teacher.max_concurrency}")
             + (f", budget ${teacher.max_usd:g}" if teacher.max_usd is not None else ""))
    with stage_progress("[corpus] teacher", None, "call") as progress:
        result = generate_teacher_corpus(section, Path(home) / "teacher-cache", api_key_from_env(teacher), log.info,
                                         will_retry=_prefect_will_retry, gate=teacher_gate, progress=progress)
    paid = [c for c in result.teacher_calls if not c["cache_hit"]]
    spent = sum(c["price_usd"] or 0.0 for c in paid)
    rejected_usd = sum(c["price_usd"] or 0.0 for c in paid if c["status"] == "rejected")
    rows = result.rows
    metrics = {
        "teacher_calls": len(paid), "teacher_cache_hits": len(result.teacher_calls) - len(paid),
        "teacher_usd": round(spent, 6), "teacher_usd_rejected": round(rejected_usd, 6),
        "teacher_usd_per_row": round(spent / len(rows), 8) if rows else 0.0,
        "rejected_targets": result.stats["preflight"]["targets_rejected"],
    }
    by_reason = Counter()
    for reasons in result.stats["preflight"]["rejected_by_reason"].values():
        by_reason.update(reasons)
    metrics.update({f"rejected_{reason}": n for reason, n in sorted(by_reason.items())})
    log.info(f"[corpus] teacher: {len(paid)} paid calls (${spent:.4f}, ${rejected_usd:.4f} of it on rejected "
             f"targets), {metrics['teacher_cache_hits']} from the call cache")
    return rows, result.stats, result.teacher_calls, {"metrics": metrics, "meta": {"teacher": metrics}}


def _heldout_overlap(rows: list[dict], section: Any, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Measure the held-out split against the train split, log it, and raise above the profile's limits."""
    from corpus.overlap import HeldoutOverlapError, overlap_failures, overlap_lines, split_overlap

    log = logger()
    overlap = split_overlap(rows, section.near_duplicate_jaccard)
    for line in overlap_lines(overlap):
        log.info(line)
    failures = overlap_failures(overlap, section.max_exact_duplicate_targets, section.max_near_duplicate_rate)
    if failures:
        paid = " (the teacher's answers are in the call cache: a rerun pays nothing)" if calls else ""
        raise HeldoutOverlapError(
            "corpus: the held-out split repeats train content, so held-out loss, bits per byte and the relief valve "
            "would measure memorisation: " + "; ".join(failures) + ". Held-out prompts use entities no train prompt "
            "uses, so this means targets share text beyond their entities (a teacher echoing its instructions, "
            "repeated answers); raise the limit only if that overlap is acceptable" + paid,
            teacher_calls=calls)
    return overlap


def overlap_metrics(overlap: dict[str, Any]) -> dict[str, float]:
    """Lineage metrics: exact duplicates and near-duplicate rate, in total and per capability."""
    out = {"heldout_exact_duplicates": overlap["total"]["exact_duplicates"],
           "heldout_near_duplicate_rate": overlap["total"]["near_duplicate_rate"],
           "heldout_max_jaccard": overlap["total"]["max_jaccard"]}
    for cap, s in overlap["by_capability"].items():
        if s["heldout_rows"]:
            out[f"heldout_exact_duplicates_{cap}"] = s["exact_duplicates"]
            out[f"heldout_near_duplicate_rate_{cap}"] = s["near_duplicate_rate"]
    return out


def _empty_corpus_reason(section: Any, stats: dict) -> str:
    """Why no row survived: a teacher whose every target failed pre-flight is not a too-small corpus."""
    pre = stats.get("preflight", {})
    if not pre.get("targets_rejected"):
        return "corpus: the teacher produced no rows; raise corpus.prompts_per_capability"
    reasons = Counter()
    for by_reason in pre.get("rejected_by_reason", {}).values():
        reasons.update(by_reason)
    shown = ", ".join(f"{r} {n}" for r, n in reasons.most_common(4))
    return (f"corpus: the teacher's answers are unusable: {pre['targets_rejected']} of {pre['targets_checked']} "
            f"targets failed pre-flight ({shown}) and no prompt kept a valid row; check that corpus.teacher.model "
            f"('{section.teacher.model}') follows the prompt rules (corpus.teacher.prompts_dir), or raise "
            "corpus.teacher.resamples")


def corpus_summary(rows: list[dict], stats: dict) -> dict[str, Any]:
    """For the report: rows per capability, prompt accept rate and target length distribution."""
    from corpus.teacher_corpus import target_length_stats

    by_cap = Counter(r["capability"] for r in rows)
    kept = len({r["prompt_id"] for r in rows if r["capability"] != "replay"})
    rejected = sum(stats.get("rejected", {}).values())
    return {"rows_per_capability": dict(by_cap), "prompt_accept_rate": round(kept / (kept + rejected), 4)
            if kept + rejected else None, "target_chars": target_length_stats(rows)}
