"""The scenario phase of a paid corpus (corpus.scenarios): the teacher writes the pools' entities, each is validated
(rejects counted by reason), split before planning, paid through the same cache, budget and lineage as the targets,
and the corpus's prompts are built from them. Everything runs against the loopback server."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from corpus.cost_estimate import estimate
from corpus.openai_teacher import BudgetExceeded
from corpus.rows import prompt_splits
from corpus.scenarios import (
    CAPABILITY,
    POOL_USES,
    PoolValidator,
    ScenarioShortfall,
    first_round,
    scenario_needs,
    shipped_examples,
)
from corpus.teacher_corpus import generate_teacher_corpus
from corpus.teacher_prompts import PromptError, load_templates
from corpus.template_teacher import load_data
from tests.openai_server import FakeOpenAI, scenario_words
from tests.teacher_support import FAKE_KEY, make_profile

BAD_BATCH = ("Pool: memories", "Batch: 1")  # the loopback server plants 3 invalid memories in this call
PLANTED = {"duplicate": 1, "missing_field": 1, "lexicon_key": 1}


def _is_scenario(body: dict) -> bool:
    return any("Pool: " in m.get("content", "") for m in body.get("messages", []))


class Recorder:
    """A fault hook that answers `bad` to the planted batch and keeps every scenario request body."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    def __call__(self, key: str, body: dict) -> str | None:
        if not _is_scenario(body):
            return None
        self.bodies.append(body)
        user = body["messages"][-1]["content"]
        return "bad" if all(f"\n{line}\n" in f"\n{user}\n" for line in BAD_BATCH) else None


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One corpus with a scenario phase (memories asked 4 per call, so the planted batch is one of several), and a
    second run on the same call cache."""
    recorder = Recorder()
    cache = tmp_path_factory.mktemp("scenarios")
    with FakeOpenAI(fault_fn=recorder) as fake:
        section = make_profile(fake.base_url, prompts=8, conflicts=2, scenarios={"per_call": 4}).corpus
        first = generate_teacher_corpus(section, cache, FAKE_KEY, log=_quiet)
        sent = len(fake.log)
        answered = fake.answered()
        second = generate_teacher_corpus(section, cache, FAKE_KEY, log=_quiet)
        resent = len(fake.log) - sent
    return {"section": section, "first": first, "second": second, "resent": resent, "bodies": recorder.bodies,
            "answered": answered, "cache": cache}


def test_scenario_calls_are_sent_with_the_pools_schema_and_recorded_in_lineage(generated):
    first, bodies = generated["first"], generated["bodies"]
    pools = Counter(b["response_format"]["json_schema"]["name"] for b in bodies)
    needs = scenario_needs(generated["section"])
    assert set(pools) == {f"scenario_{p}" for p in needs}
    calls = [c for c in first.teacher_calls if c["capability"] == CAPABILITY]
    assert len(calls) == len(bodies) == first.stats["scenarios"]["calls"]
    assert all(c["status"] == "accepted" and c["price_usd"] > 0 and not c["cache_hit"] for c in calls)
    assert sum(c["price_usd"] for c in first.teacher_calls) == pytest.approx(first.spent_usd, rel=1e-9)
    assert max(generated["answered"].values()) == 1
    schema = bodies[0]["response_format"]["json_schema"]["schema"]["properties"]["entities"]["items"]
    assert schema["additionalProperties"] is False and set(schema["required"]) == set(schema["properties"])
    assert bodies[0]["max_tokens"] == generated["section"].teacher.scenarios.max_tokens


def test_invalid_entities_are_rejected_and_counted_by_reason(generated):
    stats = generated["first"].stats["scenarios"]["pools"]
    assert stats["memories"]["rejected_by_reason"] == PLANTED
    assert stats["memories"]["rejected"] == sum(PLANTED.values())
    assert all(s["rejected"] == 0 for pool, s in stats.items() if pool != "memories")
    for s in stats.values():
        assert s["valid"] == s["asked"] - s["rejected"] and s["kept"] == s["needed"] == s["train"] + s["heldout"]


def test_a_rerun_pays_nothing_and_builds_the_same_corpus(generated):
    first, second = generated["first"], generated["second"]
    assert generated["resent"] == 0
    assert second.rows == first.rows and second.stats["scenarios"] == first.stats["scenarios"]
    assert second.spent_usd == 0 and all(c["cache_hit"] for c in second.teacher_calls)


def _generated_entities(section, stats, pool: str) -> list[dict]:
    """The entities the loopback server wrote for `pool`, rebuilt from its word rule (not from the phase)."""
    per_call = section.teacher.scenarios.per_call
    out = []
    for number in range(stats["pools"][pool]["calls"]):
        for i in range(per_call):
            out.append(scenario_words(pool, number, i))
    return out


def test_the_corpus_prompts_use_the_generated_entities_and_no_shipped_ones(generated):
    first, section = generated["first"], generated["section"]
    shipped_texts = {m["text"] for m in load_data("memories")["memories"]} | {
        t["text"] for t in load_data("threads")["threads"]}
    shipped_cores = {q["core"] for name in ("neutral_prompts", "ethics_prompts") for q in load_data("registers")[name]}
    words_of = {pool: {w for pair in _generated_entities(section, first.stats["scenarios"], pool) for w in pair}
                for pool in POOL_USES}
    for row in first.rows:
        if row["kind"] == "selection":
            assert not any(item["text"] in shipped_texts for item in row["items"])
            pool = {"memory": "memories", "continuity": "threads", "identity": "crafts"}[row["capability"]]
            assert all(set(item["keys"][-2:]) <= words_of[pool] for item in row["items"]), row["row_id"]
        else:
            assert not any(core in row["target"] for core in shipped_cores)
            pool = "ethics_prompts" if row["capability"] == "ethics" else "neutral_prompts"
            assert any(w in row["target"] for w in words_of[pool]), row["row_id"]


def test_auto_size_gives_each_side_at_most_max_reuse_slots_per_entity_on_average(generated):
    section, first = generated["section"], generated["first"]
    reuse = section.teacher.scenarios.max_reuse
    for pool, s in first.stats["scenarios"]["pools"].items():
        for split in ("train", "heldout"):
            slots = 0
            for cap, per_prompt in POOL_USES[pool].items():
                splits = prompt_splits(cap, section.prompts_per_capability, section.heldout_fraction, section.seed)
                conflicts = section.conflict_prompts_per_capability if cap in ("affect", "time", "ethics") else 0
                slots += per_prompt * (splits.count(split) + (conflicts if split == "heldout" else 0))
            assert slots / s[split] <= reuse, (pool, split, slots, s[split])
    assert first.stats["entities"]["memories"] == {"train": first.stats["scenarios"]["pools"]["memories"]["train"],
                                                   "heldout": first.stats["scenarios"]["pools"]["memories"]["heldout"]}


def test_per_pool_and_pools_settings() -> None:
    section = make_profile("http://127.0.0.1:9/v1", prompts=12, scenarios={"per_pool": 40, "pools": ["memories"]},
                           ).corpus
    assert scenario_needs(section) == {"memories": 40}
    calls = first_round(section, load_templates())
    assert len(calls) == math.ceil(40 * 1.25 / 12) and {c.pool for c in calls} == {"memories"}
    assert len({c.theme for c in calls}) == len(calls)  # each call its own theme
    affect_only = make_profile("http://127.0.0.1:9/v1", scenarios={}).corpus.model_copy(
        update={"capabilities": ["affect"]})
    assert set(scenario_needs(affect_only)) == {"neutral_prompts"}  # pools no capability uses are not asked for


def test_cost_estimate_prices_the_scenario_calls_a_run_sends(tmp_path):
    recorder = Recorder()
    with FakeOpenAI(fault_fn=recorder) as fake:
        section = make_profile(fake.base_url, scenarios={"per_call": 6}).corpus
        before = estimate(section, tmp_path / "calls.sqlite")
        result = generate_teacher_corpus(section, tmp_path, FAKE_KEY, log=_quiet)
        after = estimate(section, tmp_path / "calls.sqlite")
    row = before["capabilities"][CAPABILITY]
    paid = [c for c in result.teacher_calls if c["capability"] == CAPABILITY]
    assert row["calls"] == len(recorder.bodies) == len(paid) and row["cached"] == 0  # no rejects: one round
    assert 0 < row["expected_usd"] < row["worst_usd"] and sum(c["price_usd"] for c in paid) <= row["worst_usd"]
    assert before["total"]["calls"] == row["calls"] + sum(
        r["calls"] for cap, r in before["capabilities"].items() if cap != CAPABILITY)
    # after the run the estimate replays the scenario phase from the cache and plans the targets a run plans
    assert after["total"]["cached"] == after["total"]["calls"] == before["total"]["calls"]
    assert after["total"]["expected_usd"] == 0 and after["spent_so_far_usd"] == pytest.approx(result.spent_usd)


def test_the_budget_counts_scenario_calls_and_a_higher_budget_repeats_none(tmp_path):
    with FakeOpenAI() as fake:
        small = make_profile(fake.base_url, max_usd=0.002, scenarios={"per_call": 4}).corpus
        with pytest.raises(BudgetExceeded) as info:
            generate_teacher_corpus(small, tmp_path, FAKE_KEY, log=_quiet)
        spent = sum(c["price_usd"] for c in info.value.teacher_calls)
        assert 0 < spent <= 0.002
        assert {c["capability"] for c in info.value.teacher_calls} == {CAPABILITY}  # stopped in the scenario phase
        done = fake.outcomes["ok"]
        with pytest.raises(BudgetExceeded):  # what the first run spent on scenario calls counts against max_usd
            generate_teacher_corpus(small, tmp_path, FAKE_KEY, log=_quiet)
        assert fake.outcomes["ok"] == done
        generate_teacher_corpus(small.model_copy(update={"teacher": small.teacher.model_copy(
            update={"max_usd": 1.0})}), tmp_path, FAKE_KEY, log=_quiet)
        assert fake.outcomes["ok"] > done and max(fake.answered().values()) == 1


def test_too_few_valid_entities_stop_with_a_clear_error(tmp_path):
    (tmp_path / "prompts").mkdir()
    # a scenario prompt without the machine-readable lines: the loopback server answers it like a target request
    (tmp_path / "prompts" / "scenario.txt").write_text("Write {count} entries of {what} ({pool}, {theme}, {batch}):\n"
                                                       "{fields}\n{examples}")
    with FakeOpenAI() as fake:
        section = make_profile(fake.base_url, resamples=0, prompts_dir=str(tmp_path / "prompts"),
                               scenarios={"per_call": 20}).corpus
        with pytest.raises(ScenarioShortfall, match=r"corpus.teacher.scenarios: the teacher wrote 0 valid") as info:
            generate_teacher_corpus(section, tmp_path / "cache", FAKE_KEY, log=_quiet)
    assert info.value.final and info.value.teacher_calls
    assert {(c["status"], c["error"]) for c in info.value.teacher_calls} == {("rejected", "unparseable")}
    (tmp_path / "prompts" / "scenario.txt").write_text("Write {entries}.")
    with pytest.raises(PromptError, match=r"scenario.txt: unknown field\(s\) \{entries\}"):
        load_templates(tmp_path / "prompts")


# ---------------------------------------------------------------- the validator, reason by reason


def _memory(text: str, keys: list[str], idea: str | None = None, why: str | None = None) -> dict:
    return {"text": text, "keys": keys, "idea": idea or f"visit the {keys[0]} again",
            "why": why or f"The {keys[-1]} waits."}


def test_validator_rejects_each_kind_of_bad_entity() -> None:
    v = PoolValidator("memories", 0.5)
    first_name = load_data("personas")["names"][0]
    example = shipped_examples("memories")[0]
    cases = [
        (_memory("repairs the old blue canoe by the lake shore", ["canoe", "shore"]), None),
        ({"text": "no keys here"}, "missing_field"),
        (_memory("polishes the brass kettle", ["kettle", "kettle"]), "bad_keys"),
        (_memory("polishes the brass kettle", ["a very long key phrase"]), "bad_keys"),
        (_memory("x" * 200, ["kettle"]), "too_long"),
        (_memory("polishes the brass kettle", ["lantern"], idea="shine it up", why="It is nice."), "keys_unused"),
        (_memory(f"polishes the brass kettle with {first_name}", ["kettle"]), "names_a_person"),
        (_memory("drinks coffee from the brass kettle", ["coffee", "kettle"]), "lexicon_key"),
        (example, "copies_example"),
        (_memory("repairs the old blue canoe by the lake shore", ["paddle"], idea="paddle out"), "duplicate"),
        (_memory("repairs the old blue canoe by the lake shore today", ["paddle"], idea="paddle"), "near_duplicate"),
        (_memory("paints the garden fence", ["fence", "canoe"]), "key_clash"),  # a key another entity owns
        (_memory("sands the wooden shore path", ["path", "sanding"]), "key_clash"),  # names another's key
        (_memory("sands the wooden deck", ["deck", "sanding"]), None),
    ]
    for raw, reason in cases:
        assert v.check(raw)[1] == reason, (raw, reason)
    assert len(v.accepted) == 2
    ethics = PoolValidator("ethics_prompts", 0.5)
    assert ethics.check({"category": "knitting", "question": "Can I knit?", "core": "You can knit a scarf."})[1] == (
        "unknown_category")
    assert ethics.check({"category": "physical_safety", "question": "Can I climb the wall?",
                         "core": "You can climb the wall, but be careful."})[1] == "register_core"
