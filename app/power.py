"""The power plan `tinymars validate` prints: can the pre-registered hypotheses reach 80% power?

Computed from the profile alone, before any data: the held-out prompts the corpus will make per capability
and kind (capped by eval.max_prompts_per_capability), against the units each test needs at its minimal
effect (scorers.hypotheses.design_n; docs/methods.md).
"""

from __future__ import annotations

from corpus.rows import prompt_splits
from scorers.hypotheses import power_plan
from tinymars.domain import REGISTER_CAPABILITIES
from tinymars.profile import Profile


def planned_prompts(prof: Profile) -> dict[tuple[str, str], int]:
    """How many held-out prompts each (capability, kind) gets: the corpus's own split rule
    (corpus.rows.prompt_splits; conflict prompts are all held out), capped by eval.max_prompts_per_capability.
    Exact unless pre-flight rejects prompts."""
    c, cap_limit = prof.corpus, prof.eval.max_prompts_per_capability
    out: dict[tuple[str, str], int] = {}
    for cap in c.capabilities:
        kinds = {"register": c.prompts_per_capability, "conflict": c.conflict_prompts_per_capability} \
            if cap in REGISTER_CAPABILITIES else {"selection": c.prompts_per_capability}
        for kind, prompts in kinds.items():
            held = prompts if kind == "conflict" else \
                prompt_splits(cap, prompts, c.heldout_fraction, c.seed).count("heldout")
            out[(cap, kind)] = min(held, cap_limit) if cap_limit else held
    return out


def power_lines(prof: Profile) -> list[str]:
    """Human-readable plan: one line per hypothesis member, and a warning count."""
    hyps = [h.model_dump(mode="json") for h in prof.eval.hypotheses]
    if not hyps:
        return []
    rows = power_plan(hyps, planned_prompts(prof))
    lines = ["power plan (80% power at each hypothesis's minimal effect, alpha / family size; docs/methods.md):"]
    for r in rows:
        need = "unreachable" if r["n_needed"] is None else f"{r['n_needed']} {r['unit']}s"
        mark = "ok" if r["reachable"] else "SHORT"
        lines.append(f"  {r['id']:<24} {r['capability']:<11} min effect {r['min_effect']:g} ({r['scale']}): needs "
                     f"{need}, plans ~{r['planned_prompts']} prompts  {mark}")
    short = sum(not r["reachable"] for r in rows)
    if short:
        lines.append(f"  {short} of {len(rows)} cannot reach 80% power as planned: a null result there will read "
                     "'inconclusive'. Raise corpus.prompts_per_capability / eval.max_prompts_per_capability, or "
                     "pre-register a larger min_effect.")
    return lines
