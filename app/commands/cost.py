"""`tinymars cost`: what teacher calls cost, from lineage (after) or from the profile (before).

    tinymars cost [--home H] [--run RUN] [--by run|model|capability|stage] [--json]
    tinymars cost --estimate --profile P [--set K=V] [--home H] [--json]

The audit is a query on the lineage table `teacher_calls`: one row per HTTP attempt or cache hit.
An answered call's status is its pre-flight verdict (`accepted` / `rejected`), so the money spent
on rejected targets and the cost per accepted row fall out of the same table; failed attempts
(rate limited, timed out, truncated, ...) are counted and priced apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from app.common import fail, home_arg, open_lineage, print_table

ANSWERED = "('accepted', 'rejected', 'ok', 'content_filter')"
NOT_CALLS = "('batch_submitted')"  # a lineage note, not a paid call
GROUPS = {
    "run": "run_id",
    "model": "model",
    "capability": "capability",
    "stage": "coalesce((SELECT 'corpus (' || s.status || ')' FROM stages s WHERE s.run_id = tc.run_id"
             " AND s.stage = 'corpus' ORDER BY s.ended_at DESC LIMIT 1), 'corpus')",
}
_failed = f"NOT cache_hit AND status NOT IN {ANSWERED} AND status NOT IN {NOT_CALLS}"
COLUMNS = f"""
    count(*) FILTER (WHERE NOT cache_hit AND status NOT IN {NOT_CALLS}) AS calls,
    count(*) FILTER (WHERE cache_hit) AS cache_hits,
    count(*) FILTER (WHERE {_failed}) AS failed_attempts,
    count(DISTINCT call_key) FILTER (WHERE status = 'accepted') AS accepted_rows,
    count(DISTINCT call_key) FILTER (WHERE status = 'rejected') AS rejected_targets,
    coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
    coalesce(sum(cached_tokens), 0) AS cached_tokens,
    coalesce(sum(completion_tokens), 0) AS completion_tokens,
    coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
    round(coalesce(sum(price_usd), 0), 6) AS usd,
    round(coalesce(sum(price_usd) FILTER (WHERE status = 'rejected'), 0), 6) AS usd_rejected,
    round(coalesce(sum(price_usd) FILTER (WHERE {_failed}), 0), 6) AS usd_failed,
    round(coalesce(sum(price_usd), 0)
          / nullif(count(DISTINCT call_key) FILTER (WHERE status = 'accepted'), 0), 8) AS usd_per_accepted_row
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cost", help="teacher cost audit from lineage, or an estimate for a profile before running")
    p.add_argument("--run", help="only this run (a unique prefix works)")
    p.add_argument("--by", choices=sorted(GROUPS), action="append",
                   help="group by this (repeatable; default: all of run, model, capability, stage)")
    p.add_argument("--estimate", action="store_true", help="estimate a profile's corpus cost; nothing is spent")
    p.add_argument("--profile", help="with --estimate: a shipped profile or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    home_arg(p)
    p.set_defaults(handler=cmd_cost)


def audit(lineage: Any, run: str | None = None, groups: list[str] | None = None) -> dict[str, Any]:
    """Totals and per-group tables of teacher spending (optionally for one run)."""
    where, params = ("WHERE run_id = ?", [run]) if run else ("", [])
    out: dict[str, Any] = {"total": lineage.query(f"SELECT {COLUMNS} FROM teacher_calls tc {where}", params)[0]}
    for group in groups or list(GROUPS):
        out[f"by_{group}"] = lineage.query(
            f"SELECT {GROUPS[group]} AS {group}, {COLUMNS} FROM teacher_calls tc {where} GROUP BY 1 ORDER BY 1",
            params)
    return out


def cmd_cost(args: argparse.Namespace) -> int:
    if args.estimate:
        return _estimate(args)
    if args.profile:
        return fail("--profile goes with --estimate; the audit reads lineage (pass --run to pick a run)")
    try:
        lineage = open_lineage(args.home)
        kind, run = lineage.resolve(args.run) if args.run else ("run", None)
    except (FileNotFoundError, KeyError) as exc:
        return fail(str(exc).strip("'\""))
    if kind != "run":
        return fail(f"--run {args.run}: that is an artifact hash, not a run id (see `tinymars runs`)")
    report = audit(lineage, run, args.by)
    if args.json:
        print(json.dumps(report, default=str, indent=1))
        return 0
    print(f"teacher cost, {Path(args.home)}" + (f", run {run}" if run else ", all runs") + " (USD)")
    print("\ntotal")
    print_table([_brief(report["total"])])
    for key, rows in report.items():
        if key != "total":
            print(f"\n{key.replace('_', ' ')}")
            print_table([_brief(r) for r in rows])
    return 0


def _estimate_row(capability: str, r: dict[str, Any]) -> dict[str, Any]:
    return {"capability": capability, "calls": r["calls"], "cached": r["cached"], "prompt_tokens~": r["prompt_tokens"],
            "completion_tokens~": r["completion_tokens"], "expected_usd": f"{r['expected_usd']:.4f}",
            "worst_usd": f"{r['worst_usd']:.4f}"}


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    """The columns worth a terminal line (everything is in --json)."""
    keep = ("run", "model", "capability", "stage", "calls", "cache_hits", "failed_attempts", "accepted_rows",
            "rejected_targets", "prompt_tokens", "completion_tokens", "usd", "usd_rejected", "usd_failed",
            "usd_per_accepted_row")
    return {k: row[k] for k in keep if k in row}


def _estimate(args: argparse.Namespace) -> int:
    from corpus.cost_estimate import estimate
    from tinymars.profile import ProfileError, load_profile

    if not args.profile:
        return fail("--estimate needs --profile (a shipped profile or a YAML path)")
    try:
        prof = load_profile(args.profile, args.overrides)
    except ProfileError as exc:
        return fail(str(exc))
    from app.budget import budget_lines
    from corpus.budget import budget_problems, token_budget

    budget = token_budget(prof)  # what the corpus will hold: a vocabulary it cannot support fails after paying
    vocabulary = budget_lines(prof, budget)[0]
    refused = budget_problems(budget)
    teacher = prof.corpus.teacher
    if teacher.kind == "template":
        print(f"profile '{prof.name}': the template teacher is offline and free: $0, no calls")
        print(vocabulary)
        return fail("\n".join(refused)) if refused else 0
    try:
        est = estimate(prof.corpus, Path(args.home) / "teacher-cache" / "calls.sqlite")
    except ValueError as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps({**est, "token_budget": budget, "problems": refused}, indent=1))
        return 0
    t = est["total"]
    mode = "Batch API prices" if est["batch"] else "online prices"
    print(f"profile '{prof.name}': teacher {est['model']} ({'free endpoint' if est['free'] else mode}), "
          f"max_tokens {est['max_tokens']}, resamples {est['resamples']}; nothing has been spent")
    print_table([_estimate_row(cap, r) for cap, r in [*est["capabilities"].items(), ("total", t)]])
    print(f"\nremaining (calls not in the cache): expected ${t['expected_usd']:.4f}; worst case ${t['worst_usd']:.4f} "
          f"first pass, ${t['worst_usd_with_resamples']:.4f} if every target were resampled")
    if est["spent_so_far_usd"]:
        print(f"already spent on this corpus (call cache): ${est['spent_so_far_usd']:.4f}")
    if est["max_usd"] is not None:
        left = est["max_usd"] - est["spent_so_far_usd"]
        verdict = "fits" if t["worst_usd"] <= left else (
            "should fit (expected)" if t["expected_usd"] <= left else "will NOT fit: generation stops at the budget")
        print(f"budget corpus.teacher.max_usd ${est['max_usd']:g} (${left:.4f} left): {verdict}")
    print("expected: template-length targets, no reasoning tokens; worst case: what the budget guards against")
    print(vocabulary)
    return fail("\n".join(refused) + "\n(fix these before paying: `tinymars run` refuses this profile)") \
        if refused else 0
