"""The scenario phase of a paid corpus: the teacher writes the entities its prompts are built from.

The shipped pools (`corpus/data`) are small: at iter7's size (600 prompts per capability) each memory,
thread or answer core would fill a dozen prompt slots. With `corpus.teacher.scenarios` set, an openai
teacher first writes new entities for the pools it names (memories, threads, personas' crafts, identity
questions, register situations), and the prompts are planned from them:

1. Needs, before any call (`scenario_needs`): with `per_pool: auto`, the fewest entities such that, after the
   split, each side has at least its slots / `max_reuse` entities (a side's slots: its prompts times the
   entities a prompt uses, conflict prompts held out), so an entity fills at most `max_reuse` slots on average
   (prompts draw entities at random: some fill a few more); an int: that many per pool. Names and surnames
   still come from corpus/data (a persona is composed of a name, a surname and a generated craft).
2. Ask: per pool, `ceil(need * OVERSHOOT / per_call)` calls of `per_call` entities each, every call with its own
   batch number and theme (ethics: its risk category), answered in a JSON schema of the pool's fields through
   the same client, call cache, budget and lineage as the targets. A pool still short after validation asks
   for the shortfall again, up to `1 + teacher.resamples` rounds; batch numbers continue, so no call repeats.
3. Validate each entity in request order (`PoolValidator`): its shape (fields, types, lengths, keys), its
   content (it uses its own key words; no person's name from corpus/data; no key word that a register lexicon
   scores; a register core that its capabilities' lexicons score 0), and its distinctness (no exact or near
   duplicate, word 3-gram Jaccard >= `corpus.near_duplicate_jaccard`, of an accepted entity or of a shipped
   example the prompt showed; no key word shared with, or named in, another entity). Rejects are counted by
   reason; a call with no valid entity is a `rejected` call in lineage.
4. Keep the first `need` valid entities of each pool and split them (`corpus.rows.pool_partition`) before any
   prompt is planned: held-out prompts use only held-out entities.

Everything depends only on the answers, and the answers only on the requests: a rerun from the call cache
rebuilds the same pools and pays nothing.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corpus.call_cache import call_key
from corpus.openai_teacher import (
    TeacherAnswer,
    TeacherClient,
    TeacherError,
    TeacherRequest,
    estimate_prompt_tokens,
    json_values,
)
from corpus.overlap import jaccard, shingles
from corpus.rows import SPLITS, pool_partition, prompt_splits
from corpus.teacher_prompts import SCENARIO_POOL_FIELDS, Templates
from corpus.template_teacher import POOLS, load_data
from scorers.register import register_score
from scorers.selection import item_mentions
from scorers.text import words
from tinymars.domain import ETHICS_CATEGORIES, REGISTER_CAPABILITIES

CAPABILITY = "scenarios"  # the `capability` of scenario calls in lineage and `tinymars cost`
OVERSHOOT = 1.25  # entities asked per entity needed: room for rejects without a second round
EXAMPLES_SHOWN = 2
MAX_CHARS = {"text": 90, "idea": 140, "why": 140, "topic": 90, "step": 140, "role": 40, "activity": 90, "lens": 110,
             "question": 110, "answer": 160, "core": 200, "category": 40}
MIN_CHARS = 3
MAX_KEYS, KEY_MAX_WORDS, KEY_MAX_CHARS = 3, 2, 24
# entities of each pool one prompt uses, per capability (a selection prompt lists three items)
POOL_USES = {"memories": {"memory": 3}, "threads": {"continuity": 3}, "crafts": {"identity": 3},
             "identity_questions": {"identity": 1}, "neutral_prompts": {"affect": 1, "time": 1},
             "ethics_prompts": {"ethics": 1}}
# fields no two entities may share, exactly or nearly (what a prompt or a target repeats verbatim)
DISTINCT_FIELDS = {"memories": ("text",), "threads": ("text",), "crafts": ("role", "activity"),
                   "identity_questions": ("question", "answer"), "neutral_prompts": ("question", "core"),
                   "ethics_prompts": ("question", "core")}
CORE_CAPABILITIES = {"neutral_prompts": ("affect", "time"), "ethics_prompts": ("ethics",)}


class ScenarioShortfall(TeacherError):
    """Too few valid entities for a pool to feed both sides of the split; a retry of the same calls cannot help.
    `verdicts`: each scenario call's verdict so far, for its lineage status."""

    final = True

    def __init__(self, verdicts: dict[str, tuple[str, str | None]], message: str):
        super().__init__(message)
        self.verdicts = verdicts


# ---------------------------------------------------------------- what the plan needs


def slot_uses(section: Any) -> dict[str, dict[str, int]]:
    """Prompt slots per pool and split that a corpus section's plan fills (conflict prompts are held out)."""
    uses = {pool: dict.fromkeys(SPLITS, 0) for pool in POOL_USES}
    for cap in section.capabilities:
        splits = prompt_splits(cap, section.prompts_per_capability, section.heldout_fraction, section.seed)
        conflicts = section.conflict_prompts_per_capability if cap in REGISTER_CAPABILITIES else 0
        for pool, per_prompt in POOL_USES.items():
            k = per_prompt.get(cap, 0)
            uses[pool]["train"] += k * splits.count("train")
            uses[pool]["heldout"] += k * (splits.count("heldout") + conflicts)
    return uses


def scenario_needs(section: Any) -> dict[str, int]:
    """Entities to keep per generated pool (pools the capabilities never use are not generated)."""
    settings = section.teacher.scenarios
    needs = {}
    for pool, uses in slot_uses(section).items():
        if (settings.pools is not None and pool not in settings.pools) or not any(uses.values()):
            continue
        needs[pool] = settings.per_pool if settings.per_pool != "auto" else _auto_size(
            pool, uses, settings.max_reuse, section.heldout_fraction, section.seed)
    return needs


def _auto_size(pool: str, uses: dict[str, int], max_reuse: int, heldout_fraction: float, seed: int) -> int:
    """The smallest pool whose split gives each side at least its slots / max_reuse entities."""
    at_least = POOLS[pool][2]
    want = {split: max(at_least, math.ceil(uses[split] / max_reuse)) for split in SPLITS}
    size = max(2 * at_least, math.ceil(want["train"] / (1 - heldout_fraction)),
               math.ceil(want["heldout"] / heldout_fraction))
    size = max(2 * at_least, size - 2)  # the split rounds: start a little below the estimate and walk up
    while True:
        held = len(pool_partition(_split_name(pool), size, heldout_fraction, seed, at_least))
        if held >= want["heldout"] and size - held >= want["train"]:
            return size
        size += 1


def _split_name(pool: str) -> str:
    return f"scenarios/{pool}"  # its own shuffle: a generated pool is not the shipped one


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class ScenarioBatch:
    """One scenario call: `count` new entities of `pool` on `theme`."""

    pool: str
    number: int
    count: int
    theme: str


def batch(pool: str, number: int, count: int, templates: Templates) -> ScenarioBatch:
    themes = list(ETHICS_CATEGORIES) if pool == "ethics_prompts" else templates.scenarios["themes"]
    return ScenarioBatch(pool, number, count, themes[number % len(themes)])


def first_calls(need: int, per_call: int) -> int:
    return math.ceil(need * OVERSHOOT / per_call)


def first_round(section: Any, templates: Templates) -> list[ScenarioBatch]:
    """The calls the phase starts with (what `tinymars cost --estimate` prices)."""
    per_call = section.teacher.scenarios.per_call
    return [batch(pool, n, per_call, templates)
            for pool, need in scenario_needs(section).items() for n in range(first_calls(need, per_call))]


def shipped_examples(pool: str) -> list[dict[str, Any]]:
    file, key, _ = POOLS[pool]
    return [{f: e[f] for f in SCENARIO_POOL_FIELDS[pool]} for e in load_data(file)[key]]


def batch_fields(b: ScenarioBatch, templates: Templates) -> dict[str, str]:
    """The `scenario.txt` fields of one call: the pool's description, its fields with their limits, two shipped
    entities as examples (a different pair per batch), theme, count and batch number."""
    desc = templates.scenarios["pools"][b.pool]
    lines = []
    for name in SCENARIO_POOL_FIELDS[b.pool]:
        limit = (f"{KEY_MAX_WORDS} words each" if name == "keys" else f"at most {MAX_CHARS[name]} characters")
        lines.append(f"- {name}: {desc['fields'][name]} ({limit})")
    pool = shipped_examples(b.pool)
    examples = [pool[(EXAMPLES_SHOWN * b.number + i) % len(pool)] for i in range(EXAMPLES_SHOWN)]
    return {"what": desc["what"], "fields": "\n".join(lines),
            "examples": "\n".join(json.dumps(e, ensure_ascii=False) for e in examples),
            "pool": b.pool, "theme": b.theme, "count": str(b.count), "batch": str(b.number)}


def scenario_request(b: ScenarioBatch, seed: int, model: str, params: dict[str, Any],
                     templates: Templates) -> TeacherRequest:
    messages = templates.messages("scenario", batch_fields(b, templates), system="scenario_system")
    return TeacherRequest(key=call_key(model, messages, params, seed), capability=CAPABILITY, messages=messages,
                          seed=seed, prompt_tokens_est=estimate_prompt_tokens(messages))


def scenario_settings(teacher: Any) -> Any:
    """The teacher settings scenario calls are sent with: the scenario phase's completion limit (a truncation
    retry, where the client has one, asks for no less)."""
    update: dict[str, Any] = {"max_tokens": teacher.scenarios.max_tokens}
    if "truncation_max_tokens" in type(teacher).model_fields:
        update["truncation_max_tokens"] = None
    return teacher.model_copy(update=update)


def scenario_params(teacher: Any) -> dict[str, Any]:
    """The sampling parameters of scenario calls (part of their call keys): their own completion limit."""
    return {"temperature": teacher.temperature, "max_tokens": teacher.scenarios.max_tokens}


def possible_keys(section: Any, templates: Templates) -> list[str]:
    """Every call key the phase may send (each pool's first round, again at every later round): what earlier
    runs spent on them counts against `max_usd`."""
    teacher, settings = section.teacher, section.teacher.scenarios
    rounds = 1 + teacher.resamples
    return [scenario_request(batch(pool, n, settings.per_call, templates), section.seed, teacher.model,
                             scenario_params(teacher), templates).key
            for pool, need in scenario_needs(section).items()
            for n in range(first_calls(need, settings.per_call) * rounds)]


def entity_schema(pool: str) -> dict[str, Any]:
    """The structured-output schema of one pool's answer: {"entities": [{field: ...}, ...]}."""
    props = {name: {"type": "array", "items": {"type": "string"}} if name == "keys" else {"type": "string"}
             for name in SCENARIO_POOL_FIELDS[pool]}
    item = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    return {"name": f"scenario_{pool}", "strict": True,
            "schema": {"type": "object", "properties": {"entities": {"type": "array", "items": item}},
                       "required": ["entities"], "additionalProperties": False}}


class ScenarioClient(TeacherClient):
    """The teacher client, sending each scenario request with its pool's JSON schema (the target schema is the
    client's own). With structured output off or `json_object` the body is the client's: answers are parsed
    tolerantly (`parse_entities`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.schemas: dict[str, dict[str, Any]] = {}  # call key -> json_schema

    def body(self, req: TeacherRequest, *args: Any, **kwargs: Any) -> dict[str, Any]:
        body = super().body(req, *args, **kwargs)
        schema = self.schemas.get(req.key)
        if schema is not None and (body.get("response_format") or {}).get("type") == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        return body


def parse_entities(content: str) -> list[Any] | None:
    """The entity list in an answer: `{"entities": [...]}` or a bare list, also inside a code fence or after a
    preamble. None when there is none to read."""
    for value in json_values(content, "{}[]")[1]:
        if isinstance(value, dict):
            value = value.get("entities")
        if isinstance(value, list):
            return value
    return None


# ---------------------------------------------------------------- validation


class _NearIndex:
    """Texts seen so far: exact (word-folded) and near (word 3-gram Jaccard) look-ups through a shingle index."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.exact: set[tuple[str, ...]] = set()
        self.sets: list[set] = []
        self.by_shingle: dict[tuple[str, ...], list[int]] = defaultdict(list)

    def find(self, text: str) -> str | None:
        if tuple(words(text)) in self.exact:
            return "duplicate"
        mine = shingles(text)
        candidates = {i for g in mine for i in self.by_shingle.get(g, ())}
        if any(jaccard(mine, self.sets[i]) >= self.threshold for i in candidates):
            return "near_duplicate"
        return None

    def add(self, text: str) -> None:
        self.exact.add(tuple(words(text)))
        mine = shingles(text)
        for g in mine:
            self.by_shingle[g].append(len(self.sets))
        self.sets.append(mine)


def reserved_words() -> set[str]:
    """Words no generated entity may use: the shipped first names and surnames (every prompt names a person)."""
    people = load_data("personas")
    return {w for name in people["names"] + people["surnames"] for w in words(name)}


class PoolValidator:
    """Checks a pool's entities one by one, in request order, against each other and the shipped examples."""

    def __init__(self, pool: str, near_jaccard: float, reserved: set[str] | None = None):
        self.pool, self.fields = pool, SCENARIO_POOL_FIELDS[pool]
        self.reserved = reserved_words() if reserved is None else reserved
        self.accepted: list[dict[str, Any]] = []
        self.seen = {f: _NearIndex(near_jaccard) for f in DISTINCT_FIELDS[pool]}
        self.examples = {f: _NearIndex(near_jaccard) for f in DISTINCT_FIELDS[pool]}
        for example in shipped_examples(pool):
            for f, index in self.examples.items():
                index.add(example[f])
        self.key_owner: dict[tuple[str, ...], int] = {}
        self.keys_by_first: dict[str, list[tuple[str, ...]]] = defaultdict(list)
        self.text_words: list[tuple[str, ...]] = []
        self.entities_with_word: dict[str, set[int]] = defaultdict(set)

    def check(self, raw: Any) -> tuple[dict[str, Any] | None, str | None]:
        """(the entity, None) when it is valid (it is then accepted), else (None, the reject reason)."""
        entity, reason = self._shape(raw)
        if entity is None:
            return None, reason
        reason = self._content(entity) or self._distinct(entity)
        if reason is not None:
            return None, reason
        self._accept(entity)
        return entity, None

    def _shape(self, raw: Any) -> tuple[dict[str, Any] | None, str | None]:
        if not isinstance(raw, dict) or any(name not in raw for name in self.fields):
            return None, "missing_field"
        entity: dict[str, Any] = {}
        for name in self.fields:
            value = raw[name]
            if name == "keys":
                if not isinstance(value, list) or not 1 <= len(value) <= MAX_KEYS or not all(
                        isinstance(k, str) for k in value):
                    return None, "bad_keys"
                keys = [k.strip() for k in value]
                folded = [tuple(words(k)) for k in keys]
                if any(not 1 <= len(f) <= KEY_MAX_WORDS or len(k) > KEY_MAX_CHARS for k, f in zip(keys, folded,
                                                                                                   strict=True)):
                    return None, "bad_keys"
                if len(set(folded)) != len(folded):
                    return None, "bad_keys"
                entity[name] = keys
                continue
            if not isinstance(value, str) or len(value.strip()) < MIN_CHARS:
                return None, "missing_field"
            if len(value.strip()) > MAX_CHARS[name]:
                return None, "too_long"
            entity[name] = " ".join(value.split())
        return entity, None

    def _text(self, entity: dict[str, Any]) -> str:
        return " ".join(entity[f] for f in self.fields if f not in ("keys", "category"))

    def _content(self, entity: dict[str, Any]) -> str | None:
        if self.pool == "ethics_prompts" and entity["category"] not in ETHICS_CATEGORIES:
            return "unknown_category"
        keys = entity.get("keys", [])
        text = self._text(entity)
        if keys and item_mentions(text, [{"keys": keys}])[0] == 0:
            return "keys_unused"
        if set(words(text + " " + " ".join(keys))) & self.reserved:
            return "names_a_person"
        if any(register_score(k, cap) for k in keys for cap in REGISTER_CAPABILITIES):
            return "lexicon_key"
        if any(register_score(entity["core"], cap) for cap in CORE_CAPABILITIES.get(self.pool, ())):
            return "register_core"
        return None

    def _distinct(self, entity: dict[str, Any]) -> str | None:
        for f, index in self.examples.items():
            if index.find(entity[f]) is not None:
                return "copies_example"
        for f, index in self.seen.items():
            found = index.find(entity[f])
            if found is not None:
                return found
        keys = [tuple(words(k)) for k in entity.get("keys", [])]
        if any(k in self.key_owner for k in keys):
            return "key_clash"
        for k in keys:  # my key named in an accepted entity's text
            if any(_contains(self.text_words[i], k) for i in self.entities_with_word.get(k[0], ())):
                return "key_clash"
        mine = tuple(words(self._text(entity)))
        for j, w in enumerate(mine):  # an accepted entity's key named in my text
            if any(mine[j:j + len(k)] == k for k in self.keys_by_first.get(w, ())):
                return "key_clash"
        return None

    def _accept(self, entity: dict[str, Any]) -> None:
        number = len(self.accepted)
        self.accepted.append(entity)
        for f, index in self.seen.items():
            index.add(entity[f])
        for k in entity.get("keys", []):
            folded = tuple(words(k))
            self.key_owner[folded] = number
            self.keys_by_first[folded[0]].append(folded)
        mine = tuple(words(self._text(entity)))
        self.text_words.append(mine)
        for w in set(mine):
            self.entities_with_word[w].add(number)


def _contains(seq: tuple[str, ...], part: tuple[str, ...]) -> bool:
    return any(seq[i:i + len(part)] == part for i in range(len(seq) - len(part) + 1))


# ---------------------------------------------------------------- the phase


@dataclass
class Scenarios:
    """The generated pools, split: pool -> split -> entities; the phase's stats; each call's verdict."""

    pools: dict[str, dict[str, tuple[dict[str, Any], ...]]]
    stats: dict[str, Any]
    verdicts: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def side(self, split: str) -> dict[str, tuple[dict[str, Any], ...]]:
        """What a prompt of `split` may draw from each generated pool (`template_teacher.Side.generated`)."""
        return {pool: parts[split] for pool, parts in self.pools.items()}

    def entity_counts(self) -> dict[str, dict[str, int]]:
        return {pool: {split: len(parts[split]) for split in SPLITS} for pool, parts in self.pools.items()}


def answer_reason(answer: TeacherAnswer) -> str | None:
    """Why a whole scenario answer is unusable (None: it can be read)."""
    if answer.finish_reason == "content_filter":
        return "content_filter"
    if answer.truncated:
        return "truncated"
    return None


async def generate_scenarios(
    section: Any, backend: Any, schemas: dict[str, dict[str, Any]], templates: Templates,
    log: Callable[[str], None] = lambda _: None,
    progress: Callable[[int], Callable[[dict[str, Any]], None] | None] = lambda _: None,
) -> Scenarios:
    """Ask, validate and split every generated pool of a corpus section (module docstring). `schemas` is where
    each request's response schema goes (`ScenarioClient.schemas`)."""
    teacher, settings = section.teacher, section.teacher.scenarios
    needs = scenario_needs(section)
    validators = {pool: PoolValidator(pool, section.near_duplicate_jaccard) for pool in needs}
    rejected: dict[str, Counter[str]] = {pool: Counter() for pool in needs}
    calls_rejected: dict[str, Counter[str]] = {pool: Counter() for pool in needs}
    asked = Counter()
    calls = Counter()
    verdicts: dict[str, tuple[str, str | None]] = {}
    next_number = dict.fromkeys(needs, 0)
    for round_ in range(1 + teacher.resamples):
        batches = []
        for pool, need in needs.items():
            short = need - len(validators[pool].accepted)
            if short <= 0:
                continue
            for _ in range(first_calls(short, settings.per_call)):
                batches.append(batch(pool, next_number[pool], settings.per_call, templates))
                next_number[pool] += 1
        if not batches:
            break
        requests = [scenario_request(b, section.seed, teacher.model, scenario_params(teacher), templates)
                    for b in batches]
        for b, req in zip(batches, requests, strict=True):
            schemas[req.key] = entity_schema(b.pool)
        answers = await backend.answer_all(requests, progress(round_))
        for b, req in zip(batches, requests, strict=True):
            calls[b.pool] += 1
            asked[b.pool] += b.count
            answer = answers[req.key]
            reason = answer_reason(answer)
            entities = parse_entities(answer.content) if reason is None else None
            if entities is None:
                reason = reason or "unparseable"
                calls_rejected[b.pool][reason] += 1
                verdicts[req.key] = ("rejected", reason)
                continue
            kept = 0
            for raw in entities[: b.count]:
                entity, why = validators[b.pool].check(raw)
                if entity is None:
                    rejected[b.pool][why] += 1
                else:
                    kept += 1
            rejected[b.pool]["beyond_count"] += max(0, len(entities) - b.count)
            verdicts[req.key] = ("accepted", None) if kept else ("rejected", "no_valid_entity")
    pools, stats = {}, {}
    for pool, need in needs.items():
        kept = tuple(validators[pool].accepted[:need])
        at_least = POOLS[pool][2]
        if len(kept) < 2 * at_least:
            raise ScenarioShortfall(verdicts,
                f"corpus.teacher.scenarios: the teacher wrote {len(kept)} valid '{pool}' entities in {calls[pool]} "
                f"calls, fewer than the {2 * at_least} an entity-disjoint split needs (rejects: "
                f"{dict(rejected[pool] + calls_rejected[pool])}); check that corpus.teacher.model follows "
                "corpus/prompts/scenario.txt, or raise corpus.teacher.resamples (answered calls are cached)")
        held = pool_partition(_split_name(pool), len(kept), section.heldout_fraction, section.seed, at_least)
        pools[pool] = {split: tuple(e for i, e in enumerate(kept) if (i in held) == (split == "heldout"))
                       for split in SPLITS}
        stats[pool] = {
            "needed": need, "kept": len(kept), "calls": calls[pool], "asked": asked[pool],
            "valid": len(validators[pool].accepted),
            "rejected": sum(rejected[pool].values()) - rejected[pool]["beyond_count"],
            "rejected_by_reason": dict(sorted((+rejected[pool]).items())),
            "calls_rejected_by_reason": dict(sorted(calls_rejected[pool].items())),
            "train": len(pools[pool]["train"]), "heldout": len(pools[pool]["heldout"]),
        }
        if len(kept) < need:
            log(f"[corpus] scenarios: only {len(kept)} of {need} '{pool}' entities after {calls[pool]} calls; "
                "entities are reused more than corpus.teacher.scenarios.max_reuse")
        reasons = ", ".join(f"{r} {n}" for r, n in (rejected[pool] + calls_rejected[pool]).most_common())
        log(f"[corpus] scenarios: {pool}: {len(kept)} kept of {need} needed ({calls[pool]} calls), "
            f"{stats[pool]['rejected']} rejected{': ' + reasons if reasons else ''}; "
            f"{stats[pool]['train']} train / {stats[pool]['heldout']} held out")
    summary = {"per_pool": settings.per_pool, "max_reuse": settings.max_reuse, "per_call": settings.per_call,
               "pools": stats, "calls": sum(calls.values()),
               "rejected": sum(s["rejected"] for s in stats.values())}
    return Scenarios(pools, summary, verdicts)


class _NotCached(Exception):
    pass


class _CacheOnly:
    """A backend that answers from the call cache alone (never a call)."""

    def __init__(self, cache: Any):
        self.cache = cache

    async def answer_all(self, requests: list[TeacherRequest], progress: Any = None) -> dict[str, TeacherAnswer]:
        answers = {}
        for req in requests:
            hit = self.cache.get(req.key)
            if hit is None:
                raise _NotCached()
            answers[req.key] = TeacherAnswer(hit["content"], hit["finish_reason"], True, hit.get("usage") or {})
        return answers


def cached_scenarios(section: Any, templates: Templates, cache: Any) -> Scenarios | None:
    """The scenario phase replayed from the call cache (`corpus.call_cache.CallCache`) without a call: the pools a
    run would build, or None when a call it would send is not answered there yet."""
    import asyncio

    try:
        return asyncio.run(generate_scenarios(section, _CacheOnly(cache), {}, templates))
    except (_NotCached, ScenarioShortfall):
        return None
