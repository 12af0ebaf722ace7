"""Corpus v2 through a teacher LLM: the template teacher's prompts and channel states, targets asked of
an OpenAI-compatible endpoint, every target checked by its capability's scorer before it enters.

1. Plan (no calls, deterministic by seed): the same prompt builders, pools and random streams as
   `corpus.template_teacher`, one *slot* per row whose target the teacher writes (3 per selection
   prompt, 2 per register or conflict prompt), each with its request built from corpus/prompts.
   Each prompt's split is fixed here, before anything is paid for, and its scenario (people composed
   from names and crafts, items, questions, answer cores) is drawn from that split's part of every
   entity pool: a held-out request shares no entity with any train request, so an honest teacher
   cannot leak train content into the held-out split. What the answers share anyway is measured
   after generation (`corpus.overlap`, in the corpus stage).
2. Ask: every slot's request through the backend (online client or Batch API); answers come from the
   call cache when they can.
3. Pre-flight: each target is parsed and scored (selection: `dominant` and no other item named;
   register: the pole's sign, plus VADER agreeing across the pair for affect). A failing slot is
   asked again with a new seed up to `resamples` times; a prompt with a slot still failing is dropped
   whole, and every reject is counted by reason.
4. Assemble rows in the ARCHITECTURE.md schema, each with its planned split.

Rows depend only on the answers, and answers only on the requests, so a run resumed from the cache
after a kill gives the same corpus as one that never stopped.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpus.call_cache import CallCache, call_key
from corpus.openai_teacher import (
    TeacherAnswer,
    TeacherClient,
    TeacherError,
    TeacherRequest,
    estimate_prompt_tokens,
    parse_target,
)
from corpus.rows import (
    capability_rng,
    check_corpus_args,
    corpus_stats,
    flip,
    preflight_register,
    preflight_selection,
    prompt_id,
    prompt_splits,
    register_row,
    selection_row,
)
from corpus.scenarios import ScenarioClient, Scenarios, generate_scenarios, possible_keys, scenario_settings
from corpus.teacher_limits import Budget
from corpus.teacher_prompts import Templates, load_templates
from corpus.template_teacher import (
    Side,
    entity_split_sizes,
    register_prompt,
    register_state,
    register_wrap,
    selection_prompt,
)
from scorers.register import register_score
from scorers.selection import item_mentions
from tinymars.domain import SELECTION_CAPABILITIES
from tinymars.prices import Price, resolve_price
from tinymars.progress import ProgressCallback

SEED_STRIDE = 100  # request seed = corpus seed * stride + sample (resamples stay below the stride)
LOG_EVERY_S = 5.0


@dataclass
class Slot:
    """One row whose target the teacher writes."""

    capability: str
    template: str
    fields: dict[str, str]
    position: int | str  # salient item (selection) or pole (register / conflict)
    typical_chars: int = 0  # the template teacher's target length: what `tinymars cost --estimate` expects


@dataclass
class PlannedPrompt:
    capability: str
    number: int
    conflict: bool
    split: str
    slots: list[Slot]
    prompt: str = ""  # selection
    items: list[dict[str, Any]] = field(default_factory=list)  # selection
    base: dict[str, Any] = field(default_factory=dict)  # register / conflict
    states: dict[str, dict[str, Any]] = field(default_factory=dict)  # register / conflict, per pole

    @property
    def pid(self) -> str:
        return prompt_id(self.capability, self.number, self.conflict)


# ---------------------------------------------------------------- plan


def _plan_selection(capability: str, number: int, rng: Any, seen: set[str], side: Side) -> PlannedPrompt:
    prompt, items, template_targets = selection_prompt(capability, rng, seen, side)
    slots = []
    for i, item in enumerate(items):
        avoid = [k for j, other in enumerate(items) if j != i for k in other["keys"]]
        fields = {"prompt": prompt, "salient": item["text"], "keys": ", ".join(item["keys"]), "avoid": ", ".join(avoid)}
        slots.append(Slot(capability, capability, fields, i, len(template_targets[i])))
    return PlannedPrompt(capability, number, False, side.split, slots, prompt=prompt, items=items)


def _plan_register(
    capability: str, number: int, rng: Any, seen: set[str], conflict: bool, registers: dict[str, Any], side: Side
) -> PlannedPrompt:
    base = register_prompt(capability, rng, seen, conflict, side)
    slots, states = [], {}
    for pole in ("+", "-"):
        opener, closer = register_wrap(capability, pole, rng)
        states[pole] = register_state(capability, pole, base, rng)
        fields = {"prompt": base["texts"][pole], "question": base["question"], "core": base["core"],
                  "opener": opener, "closer": closer, **registers[capability][pole]}
        if conflict:
            fields["text_register"] = registers[capability][flip(pole)]["register"]
        typical = len(opener) + len(base["core"]) + len(closer) + 2
        slots.append(Slot(capability, "conflict" if conflict else "register", fields, pole, typical))
    return PlannedPrompt(capability, number, conflict, side.split, slots, base=base, states=states)


def plan_corpus(
    capabilities: list[str], prompts_per_capability: int, conflict_prompts_per_capability: int, seed: int,
    templates: Templates, *, heldout_fraction: float, scenarios: Scenarios | None = None,
) -> list[PlannedPrompt]:
    """Every prompt and slot of the corpus with its split, before any call (the template teacher's pools,
    entity split and streams; conflict prompts are held out). With `scenarios`, the pools the teacher wrote
    replace the shipped ones, each side drawing only from its own part."""
    plan: list[PlannedPrompt] = []
    sides = {split: Side(split, heldout_fraction, seed, scenarios.side(split) if scenarios else None)
             for split in ("train", "heldout")}
    for cap in capabilities:
        rng, seen = capability_rng(seed, cap, "prompts"), set()
        for number, split in enumerate(prompt_splits(cap, prompts_per_capability, heldout_fraction, seed)):
            side = sides[split]
            if cap in SELECTION_CAPABILITIES:
                plan.append(_plan_selection(cap, number, rng, seen, side))
            else:
                plan.append(_plan_register(cap, number, rng, seen, False, templates.registers, side))
        if cap not in SELECTION_CAPABILITIES:
            conflict_rng, held_out = capability_rng(seed, cap, "conflict"), sides["heldout"]
            for number in range(conflict_prompts_per_capability):
                plan.append(_plan_register(cap, number, conflict_rng, seen, True, templates.registers, held_out))
    return plan


def request_for(slot: Slot, sample: int, seed: int, model: str, params: dict[str, Any],
                templates: Templates) -> TeacherRequest:
    messages = templates.messages(slot.template, slot.fields)
    request_seed = seed * SEED_STRIDE + sample
    return TeacherRequest(
        key=call_key(model, messages, params, request_seed), capability=slot.capability, messages=messages,
        seed=request_seed, prompt_tokens_est=estimate_prompt_tokens(messages),
    )


# ---------------------------------------------------------------- pre-flight


def check_target(prompt: PlannedPrompt, slot: Slot, answer: TeacherAnswer) -> tuple[str | None, str | None]:
    """(target, None) when the slot's answer passes its own check, else (None, reject reason)."""
    if answer.finish_reason == "content_filter":
        return None, "content_filter"
    if answer.truncated:
        return None, "truncated"
    target = parse_target(answer.content)
    if target is None:
        return None, "unparseable"
    if isinstance(slot.position, int):
        counts = item_mentions(target, prompt.items)
        if any(c for i, c in enumerate(counts) if i != slot.position):
            return None, "names_another_item"
        if not preflight_selection(prompt.items, slot.position, target):
            return None, "salient_not_named"
        return target, None
    sign = 1.0 if slot.position == "+" else -1.0
    if register_score(target, slot.capability) * sign <= 0:
        return None, "wrong_register"
    return target, None


def prompt_reject(prompt: PlannedPrompt, targets: dict[int | str, str]) -> str | None:
    """The whole-prompt check once every slot has a target (the pair check of a register prompt)."""
    if prompt.items:
        ok = all(preflight_selection(prompt.items, i, t) for i, t in targets.items())
        return None if ok else "salient_not_named"
    return None if preflight_register(prompt.capability, targets["+"], targets["-"]) else "vader_disagrees"


# ---------------------------------------------------------------- generation


@dataclass
class TeacherCorpus:
    rows: list[dict[str, Any]]
    stats: dict[str, Any]
    verdicts: dict[str, tuple[str, str | None]]  # call key -> ("accepted" | "rejected", reason)


async def generate(
    plan: list[PlannedPrompt],
    backend: Any,
    templates: Templates,
    seed: int,
    resamples: int,
    log: Callable[[str], None] = lambda _: None,
    on_progress: ProgressCallback | None = None,
) -> TeacherCorpus:
    """Ask the backend for every slot (resampling failures), pre-flight, and assemble the corpus."""
    targets: dict[int, tuple[str, str]] = {}  # id(slot) -> (target, the call key that wrote it)
    rejects: dict[str, Counter[str]] = {p.capability: Counter() for p in plan}
    verdicts: dict[str, tuple[str, str | None]] = {}
    checked = 0
    pending = [(p, s) for p in plan for s in p.slots]
    for sample in range(resamples + 1):
        if not pending:
            break
        requests = {id(s): request_for(s, sample, seed, backend.model, backend.params, templates) for _, s in pending}
        progress = _progress_logger(log, sample, lambda: sum(sum(c.values()) for c in rejects.values()),
                                    on_progress=on_progress)
        answers = await backend.answer_all(list(requests.values()), progress)
        still = []
        for prompt, slot in pending:
            key = requests[id(slot)].key
            target, reason = check_target(prompt, slot, answers[key])
            checked += 1
            if reason is None:
                targets[id(slot)] = (target, key)
            else:
                rejects[slot.capability][reason] += 1
                verdicts[key] = ("rejected", reason)
                still.append((prompt, slot))
        pending = still
    rows, stats, prompt_rejects = _assemble(plan, targets, verdicts)
    stats["preflight"] = {
        "targets_checked": checked,
        "targets_rejected": sum(sum(c.values()) for c in rejects.values()),
        "target_accept_rate": round(len(targets) / checked, 4) if checked else None,
        "prompt_accept_rate": round(len({r["prompt_id"] for r in rows}) / len(plan), 4) if plan else None,
        "rejected_by_reason": {cap: dict(sorted((c + prompt_rejects[cap]).items())) for cap, c in rejects.items()},
    }
    stats["target_chars"] = target_length_stats(rows)
    return TeacherCorpus(rows, stats, verdicts)


def _assemble(
    plan: list[PlannedPrompt], targets: dict[int, tuple[str, str]], verdicts: dict[str, tuple[str, str | None]],
) -> tuple[list[dict], dict, dict[str, Counter[str]]]:
    """Rows of every prompt whose slots all have targets and that passes the whole-prompt check, each with its
    planned split; each call that wrote a target gets its verdict."""
    per_capability: dict[str, tuple[list[dict], int, int]] = {}
    prompt_rejects: dict[str, Counter[str]] = {}
    for cap in dict.fromkeys(p.capability for p in plan):
        regular, conflict, rejected, rejected_conflict = [], [], 0, 0
        prompt_rejects[cap] = Counter()
        for prompt in (p for p in plan if p.capability == cap):
            got = {s.position: targets[id(s)][0] for s in prompt.slots if id(s) in targets}
            reason = "slot_rejected" if len(got) < len(prompt.slots) else prompt_reject(prompt, got)
            for s in prompt.slots:
                if id(s) in targets:
                    verdicts[targets[id(s)][1]] = ("accepted", None) if reason is None else ("rejected", reason)
            if reason is None:
                (conflict if prompt.conflict else regular).extend(_rows(prompt, got))
                continue
            if reason != "slot_rejected":  # a slot's own reject is counted already
                prompt_rejects[cap][reason] += 1
            rejected_conflict += prompt.conflict
            rejected += not prompt.conflict
        per_capability[cap] = (regular + conflict, rejected, rejected_conflict)
    rows, stats = corpus_stats(per_capability)
    return rows, stats, prompt_rejects


def _rows(prompt: PlannedPrompt, targets: dict[int | str, str]) -> list[dict[str, Any]]:
    if prompt.items:
        return [selection_row(prompt.capability, prompt.pid, prompt.split, prompt.prompt, prompt.items, i, targets[i])
                for i in range(len(prompt.items))]
    return [register_row(prompt.capability, prompt.pid, prompt.split, prompt.base, pole, prompt.conflict,
                         prompt.states[pole], targets[pole]) for pole in ("+", "-")]


def target_length_stats(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Target length in characters per capability: min, median, mean, p90, max."""
    out: dict[str, dict[str, float]] = {}
    for cap in dict.fromkeys(r["capability"] for r in rows):
        lengths = sorted(len(r["target"]) for r in rows if r["capability"] == cap)
        out[cap] = {"min": lengths[0], "median": statistics.median(lengths),
                    "mean": round(statistics.fmean(lengths), 1),
                    "p90": lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))], "max": lengths[-1]}
    return out


def _progress_logger(log: Callable[[str], None], sample: int, rejects: Callable[[], int], what: str = "calls",
                     on_progress: ProgressCallback | None = None):
    last = [0.0]
    label = what if sample == 0 else f"resample {sample} {what}"

    def progress(snap: dict[str, Any]) -> None:
        if on_progress is not None:  # every answer (a bar draws itself at its own pace); the log line every 5 s
            on_progress(snap["done"], snap["total"], **({} if label == "calls" else {"phase": label}))
        now = time.monotonic()
        if now - last[0] < LOG_EVERY_S and snap["done"] < snap["total"]:
            return
        last[0] = now
        log(f"[corpus] teacher: {snap['done']}/{snap['total']} {label} ({snap['cache_hits']} from cache), "
            f"${snap['spent_usd']:.4f} spent this run, {snap['retries']} retries, {rejects()} rejects so far")

    return progress


# ---------------------------------------------------------------- entry point


@dataclass
class TeacherResult:
    rows: list[dict[str, Any]]
    stats: dict[str, Any]
    teacher_calls: list[dict[str, Any]]
    spent_usd: float


def teacher_price(teacher: Any) -> Price:
    override = teacher.price.model_dump() if teacher.price is not None else None
    return resolve_price(teacher.model, override, teacher.free)


def plan_keys(plan: list[PlannedPrompt], teacher: Any, seed: int, templates: Templates) -> list[str]:
    """Every call key this corpus may make (each slot at every sample)."""
    params = {"temperature": teacher.temperature, "max_tokens": teacher.max_tokens}
    return [request_for(s, k, seed, teacher.model, params, templates).key
            for p in plan for s in p.slots for k in range(teacher.resamples + 1)]


def generate_teacher_corpus(
    section: Any, cache_dir: Path, api_key: str | None, log: Callable[[str], None] = print,
    will_retry: Callable[[TeacherError], bool] = lambda exc: False,
    gate: Callable[[], Any] | None = None,
    progress: ProgressCallback | None = None,
) -> TeacherResult:
    """The corpus for a `corpus` profile section with an openai teacher (sync entry point for the stage).

    Raises TeacherError (BudgetExceeded, TeacherUnavailable) with `teacher_calls` set; either way every
    paid call of this run (and of an earlier run that was killed) is handed back for lineage. When the
    caller will retry after this error (`will_retry`), the calls are left for the retry to adopt instead,
    since only the last attempt's calls reach lineage. `progress(done, total, spent_usd=, max_usd=)` follows
    each round of calls with the money the budget counts (earlier runs' spend on this corpus plus this run's).
    """
    teacher = section.teacher
    check_corpus_args(list(section.capabilities), section.prompts_per_capability,
                      section.conflict_prompts_per_capability, section.heldout_fraction)
    price = teacher_price(teacher)
    templates = load_templates(teacher.prompts_dir)
    # without a scenario phase the plan is known now; with one, only the scenario calls are, and the plan
    # follows from their answers
    plan = None if teacher.scenarios is not None else section_plan(section, templates)
    cache = CallCache(Path(cache_dir) / "calls.sqlite")
    try:
        invocation = cache.start_invocation()
        orphans = [{**r, "error": ((r.get("error") or "") + " [recorded by an interrupted run]").strip()}
                   for r in cache.adopt_orphans(invocation)]
        if orphans:
            log(f"[corpus] {len(orphans)} teacher calls of an interrupted run found in the call cache; "
                "they go to lineage with this run")
        known_keys = (plan_keys(plan, teacher, section.seed, templates) if plan is not None
                      else possible_keys(section, templates))
        budget = Budget(teacher.max_usd, cache.spent_on(known_keys))
        if teacher.max_usd is not None:
            what = "this corpus" if plan is not None else "this corpus's scenario calls"
            log(f"[corpus] budget ${teacher.max_usd:.4f}: ${budget.spent_before:.4f} already spent on {what}")
        client = TeacherClient(teacher, api_key, cache, price, budget, invocation=invocation, log=log, gate=gate)
        scenario_client = None if plan is not None else ScenarioClient(
            scenario_settings(teacher), api_key, cache, price, budget,
            invocation=invocation, log=log, gate=gate)
        clients = [c for c in (scenario_client, client) if c is not None]

        def dollars(done: int, total: int | None = None, **info: Any) -> None:
            if progress is not None:
                progress(done, total, spent_usd=budget.spent, max_usd=teacher.max_usd, **info)

        async def run() -> tuple[TeacherCorpus, Scenarios | None]:
            nonlocal plan
            try:
                scenarios = None
                if scenario_client is not None:
                    scenarios = await generate_scenarios(
                        section, _backend(scenario_client, teacher), scenario_client.schemas, templates, log,
                        lambda round_: _progress_logger(log, round_, lambda: 0, "scenario calls", dollars))
                    plan = section_plan(section, templates, scenarios)
                    on_targets = cache.spent_on(plan_keys(plan, teacher, section.seed, templates))
                    budget.spent_before += on_targets
                    if teacher.max_usd is not None and on_targets:
                        log(f"[corpus] budget: ${on_targets:.4f} already spent on this corpus's target calls")
                corpus = await generate(plan, _backend(client, teacher), templates, section.seed, teacher.resamples,
                                        log, dollars)
                return corpus, scenarios
            finally:
                for c in clients:
                    await c.close()

        def records(verdicts: dict[str, tuple[str, str | None]]) -> list[dict[str, Any]]:
            return [rec for c in clients for rec in _with_verdicts(c.records, verdicts)]

        try:
            result, scenarios = asyncio.run(run())
        except TeacherError as exc:
            exc.teacher_calls = orphans + records(getattr(exc, "verdicts", {}))
            if will_retry(exc):
                cache.release_invocation(invocation)
            else:
                cache.finish_invocation(invocation)
            raise
        except BaseException:
            cache.release_invocation(invocation)  # a crash: the next attempt or run adopts the journal
            raise
        calls = orphans + records({**(scenarios.verdicts if scenarios else {}), **result.verdicts})
        cache.finish_invocation(invocation)
        entities = entity_split_sizes(section.heldout_fraction, section.seed)
        stats = {**result.stats, "entities": entities}
        if scenarios is not None:
            stats["entities"] = {**entities, **scenarios.entity_counts()}
            stats["scenarios"] = scenarios.stats
        return TeacherResult(result.rows, stats, calls, budget.spent_now)
    finally:
        cache.close()


def section_plan(section: Any, templates: Templates, scenarios: Scenarios | None = None) -> list[PlannedPrompt]:
    """`plan_corpus` for a corpus profile section."""
    return plan_corpus(list(section.capabilities), section.prompts_per_capability,
                       section.conflict_prompts_per_capability, section.seed, templates,
                       heldout_fraction=section.heldout_fraction, scenarios=scenarios)


def _backend(client: TeacherClient, teacher: Any) -> Any:
    """The client, or the Batch API through it."""
    if not teacher.batch:
        return client
    from corpus.batch_teacher import BatchTeacher

    return BatchTeacher(client, poll_s=teacher.batch_poll_s)


def _with_verdicts(records: list[dict[str, Any]], verdicts: dict[str, tuple[str, str | None]]) -> list[dict]:
    """Answered calls take their pre-flight verdict as status (accepted / rejected, reason in `error`)."""
    out = []
    for rec in records:
        verdict = verdicts.get(rec["call_key"])
        if rec["status"] in ("ok", "content_filter") and verdict is not None:
            status, reason = verdict
            rec = {**rec, "status": status, "error": reason if status == "rejected" else rec["error"]}
        out.append(rec)
    return out


def check_runnable(section: Any) -> None:
    """What can be checked about a corpus section before any work: the key is in the environment the
    profile names, the prompt templates load. Raises ValueError."""
    if section.teacher.kind != "template":
        from corpus.openai_teacher import api_key_from_env

        api_key_from_env(section.teacher)
        teacher_price(section.teacher)
        load_templates(section.teacher.prompts_dir)

