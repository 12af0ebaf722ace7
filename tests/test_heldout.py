"""Held out means held out (issue 14): the split is entity-disjoint, and the corpus stage measures exact and
near-duplicate targets across it, records the figures and fails above the profile's limits."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from corpus.overlap import HeldoutOverlapError, overlap_failures, split_overlap
from corpus.rows import pool_partition
from corpus.teacher_corpus import plan_corpus
from corpus.teacher_prompts import load_templates
from corpus.template_teacher import POOLS, entity_split_sizes, generate_corpus, load_data
from scorers.text import words
from tasks.corpus import corpus_task
from tinymars.domain import CAPABILITIES, SELECTION_CAPABILITIES
from tinymars.profile import ProfileError, load_profile

ALL = list(CAPABILITIES)


@pytest.fixture(scope="module")
def smoke_corpus() -> tuple[list[dict], object]:
    section = load_profile("smoke").corpus
    rows, _ = generate_corpus(list(section.capabilities), section.prompts_per_capability,
                              section.conflict_prompts_per_capability, section.heldout_fraction, section.seed)
    return rows, section


# ---------------------------------------------------------------- the split is entity-disjoint


def _entities_in(row: dict) -> dict[str, set[str]]:
    """Which pool entities a row's text contains, found by searching the text (not by asking the generator)."""
    people, registers = load_data("personas"), load_data("registers")
    prompt_words, text = set(words(row["prompt"])), row["prompt"] + "\n" + row["target"]
    found = {
        "names": {n for n in people["names"] if words(n)[0] in prompt_words},
        "surnames": {s for s in people["surnames"] if words(s)[0] in prompt_words},
        "crafts": {c["activity"] for c in people["crafts"] if c["activity"] in row["prompt"]},
        "identity_questions": {q["question"] for q in people["identity_questions"] if q["question"] in row["prompt"]},
        "memories": {m["text"] for m in load_data("memories")["memories"] if m["text"] in row["prompt"]},
        "threads": {t["text"] for t in load_data("threads")["threads"] if t["text"] in row["prompt"]},
        "neutral_prompts": {q["core"] for q in registers["neutral_prompts"] if q["core"] in text},
        "ethics_prompts": {q["core"] for q in registers["ethics_prompts"] if q["core"] in text},
    }
    return found


def test_no_entity_of_a_heldout_row_appears_in_any_train_row() -> None:
    rows, _ = generate_corpus(ALL, 24, 4, 0.25, seed=1)
    seen: dict[str, dict[str, set[str]]] = {pool: {"train": set(), "heldout": set()} for pool in POOLS}
    for row in rows:
        for pool, found in _entities_in(row).items():
            seen[pool][row["split"]] |= found
    for pool, by_split in seen.items():
        assert by_split["train"] and by_split["heldout"], pool  # the search finds each pool on both sides
        assert not by_split["train"] & by_split["heldout"], (pool, sorted(by_split["train"] & by_split["heldout"]))
    conflict = [r for r in rows if r["kind"] == "conflict"]
    assert conflict and {r["split"] for r in conflict} == {"heldout"}


def test_the_paid_teachers_plan_is_split_before_any_call_and_entity_disjoint() -> None:
    plan = plan_corpus(ALL, 12, 2, seed=1, templates=load_templates(), heldout_fraction=0.25)
    entities: dict[str, dict[str, set[str]]] = {"heldout": {}, "train": {}}
    for prompt in plan:
        if prompt.capability in SELECTION_CAPABILITIES:
            names = {k for item in prompt.items for k in item["keys"]}  # memory / thread / persona key terms
        else:
            names = {prompt.base["first"], prompt.base["core"]}
        entities[prompt.split].setdefault(prompt.capability, set()).update(names)
        assert prompt.split == "heldout" or not prompt.conflict
    for cap in ALL:
        assert entities["train"][cap] and entities["heldout"][cap]
        assert not entities["train"][cap] & entities["heldout"][cap], cap
    held = {cap: sum(p.split == "heldout" and not p.conflict for p in plan if p.capability == cap) for cap in ALL}
    assert held == dict.fromkeys(ALL, 3)  # round(0.25 * 12)


def test_pool_partition_honours_the_fraction_and_is_deterministic() -> None:
    for fraction in (0.1, 0.25, 0.5):
        for pool, sizes in entity_split_sizes(fraction, seed=7).items():
            total = sizes["train"] + sizes["heldout"]
            assert total == len(load_data(POOLS[pool][0])[POOLS[pool][1]])
            assert sizes["heldout"] >= POOLS[pool][2] and sizes["train"] >= POOLS[pool][2]
            if total * fraction >= 5:  # large enough for the minimum not to bind
                assert abs(sizes["heldout"] / total - fraction) <= 1 / total, (pool, fraction, sizes)
    assert pool_partition("memories", 96, 0.25, 7) == pool_partition("memories", 96, 0.25, 7)
    assert pool_partition("memories", 96, 0.25, 7) != pool_partition("memories", 96, 0.25, 8)
    assert pool_partition("memories", 96, 0.1, 7) < pool_partition("memories", 96, 0.25, 7)  # only grows
    assert len(pool_partition("crafts", 10, 0.01, 0, at_least=3)) == 3
    assert len(pool_partition("crafts", 10, 0.99, 0, at_least=3)) == 7
    with pytest.raises(ValueError, match="pool 'crafts' has 5 entries.*needs at least 6"):
        pool_partition("crafts", 5, 0.25, 0, at_least=3)


# ---------------------------------------------------------------- the measurement


def _ref_shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    toks = text.split()
    return {tuple(toks)} if 0 < len(toks) < n else {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def _row(i: int, split: str, target: str, cap: str = "memory") -> dict:
    return {"row_id": f"r{i}", "split": split, "capability": cap, "target": target}


def test_overlap_matches_a_brute_force_reference() -> None:
    rng = random.Random(11)
    vocab = "a b c d e f".split()
    rows = [_row(i, rng.choice(["train", "train", "heldout"]), " ".join(rng.choices(vocab, k=rng.randint(1, 9))),
                 rng.choice(["memory", "affect"])) for i in range(300)]
    report = split_overlap(rows, 0.5)
    train = [r for r in rows if r["split"] == "train"]
    for cap in ("memory", "affect"):
        held = [r for r in rows if r["split"] == "heldout" and r["capability"] == cap]
        best = []
        for h in held:
            hs = _ref_shingles(h["target"])
            best.append(max(len(hs & _ref_shingles(t["target"])) / len(hs | _ref_shingles(t["target"]))
                            for t in train))
        exact = sum(h["target"] in {t["target"] for t in train} for h in held)
        got = report["by_capability"][cap]
        assert got["heldout_rows"] == len(held) and got["exact_duplicates"] == exact > 0
        assert got["near_duplicates"] == sum(b >= 0.5 for b in best)
        assert got["max_jaccard"] == pytest.approx(max(best), abs=1e-4)
        assert got["mean_nearest_jaccard"] == pytest.approx(sum(best) / len(best), abs=1e-4)
        for worst in got["worst"]:  # the nearest train row named really is that near
            h = next(r for r in held if r["row_id"] == worst["row_id"])
            t = next(r for r in train if r["row_id"] == worst["nearest_train_row_id"])
            hs, ts = _ref_shingles(h["target"]), _ref_shingles(t["target"])
            assert len(hs & ts) / len(hs | ts) == pytest.approx(worst["jaccard"], abs=1e-4)


def test_overlap_by_hand() -> None:
    rows = [_row(0, "train", "the cat sat on a mat"), _row(1, "heldout", "The cat sat on the mat"),
            _row(2, "heldout", "THE CAT, sat on a mat!"), _row(3, "heldout", "dogs bark"),
            _row(4, "train", "Dogs bark.", "affect")]
    report = split_overlap(rows, 1 / 3)
    memory = report["by_capability"]["memory"]
    # row 1: {the cat sat, cat sat on, sat on the, on the mat} vs {the cat sat, cat sat on, sat on a, on a mat}: 2/6
    # row 2: the same words as row 0 (case and punctuation fold); row 3: one 2-word shingle, equal to row 4's
    assert memory["exact_duplicates"] == 2 and memory["near_duplicates"] == 3  # 1/3 counts as near (>=)
    assert sorted(w["jaccard"] for w in memory["worst"]) == [pytest.approx(1 / 3, abs=1e-4), 1.0, 1.0]
    assert split_overlap(rows, 0.34)["by_capability"]["memory"]["near_duplicates"] == 2
    failures = overlap_failures(report, max_exact=0, max_near_rate=0.5)
    assert "corpus.max_exact_duplicate_targets is 0" in failures[0] and "memory 2" in failures[0]
    assert "corpus.max_near_duplicate_rate is 0.5" in failures[1] and "r2 ~ r0" in failures[1]
    assert overlap_failures(report, max_exact=2, max_near_rate=1.0) == []


# ---------------------------------------------------------------- what issue 14 asked to show


def test_smoke_corpus_has_no_exact_duplicate_and_near_duplicates_below_the_limit(smoke_corpus) -> None:
    rows, section = smoke_corpus
    report = split_overlap(rows, section.near_duplicate_jaccard)
    assert report["total"]["exact_duplicates"] == 0
    for cap, s in report["by_capability"].items():
        assert s["heldout_rows"] > 0 and s["near_duplicate_rate"] <= section.max_near_duplicate_rate, cap
    assert overlap_failures(report, section.max_exact_duplicate_targets, section.max_near_duplicate_rate) == []
    leaked = rows + [{**next(r for r in rows if r["split"] == "train"), "row_id": "leak", "split": "heldout"}]
    assert split_overlap(leaked, section.near_duplicate_jaccard)["total"]["exact_duplicates"] == 1


def test_a_split_by_prompt_alone_would_fail_the_check(smoke_corpus) -> None:
    """The old split (by prompt id over prompts that share entities) is what the check exists to catch: the same
    rows, re-split by prompt ignoring entities, break the limits."""
    rows, section = smoke_corpus
    rng = random.Random(0)
    ids = sorted({r["prompt_id"] for r in rows})
    held = set(rng.sample(ids, len(ids) // 4))
    resplit = [{**r, "split": "heldout" if r["prompt_id"] in held else "train"} for r in rows]
    report = split_overlap(resplit, section.near_duplicate_jaccard)
    assert overlap_failures(report, section.max_exact_duplicate_targets, section.max_near_duplicate_rate)
    assert report["total"]["near_duplicate_rate"] > 5 * section.max_near_duplicate_rate  # 48% at seed 0


# ---------------------------------------------------------------- the stage records, prints and fails


def test_stage_records_the_figures_and_prints_them(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    result = corpus_task.fn(load_profile("tiny"), str(tmp_path))
    stats = json.loads((Path(result["artifact"]["path"]) / "stats.json").read_text())
    overlap = stats["heldout_overlap"]
    assert overlap["ngram"] == 3 and overlap["jaccard_threshold"] == 0.5 and overlap["total"]["exact_duplicates"] == 0
    metrics = {m["key"]: m["value"] for m in result["metrics"]}
    assert metrics["heldout_exact_duplicates"] == 0
    assert metrics["heldout_near_duplicate_rate"] == overlap["total"]["near_duplicate_rate"]
    assert {f"heldout_near_duplicate_rate_{cap}" for cap in ALL} <= set(metrics)
    printed = [m for m in caplog.messages if "held-out rows" in m]
    assert len(printed) == len(ALL) + 1 and all("exact duplicates, near-duplicate rate" in m for m in printed)
    assert stats["entities"]["memories"]["heldout"] > 0


def test_stage_fails_above_the_limits_naming_the_fields_and_publishes_nothing(tmp_path) -> None:
    profile = load_profile("tiny", ["corpus.near_duplicate_jaccard=0.1"])  # every shared frame is "near"
    expected = r"Jaccard >= 0.1 \(corpus.near_duplicate_jaccard\); corpus.max_near_duplicate_rate is 0.05"
    with pytest.raises(HeldoutOverlapError, match=expected):
        corpus_task.fn(profile, str(tmp_path))
    assert not list((tmp_path / "artifacts" / "corpus").glob("[!.]*"))


def test_profile_limits_are_validated() -> None:
    for override, message in (("corpus.max_near_duplicate_rate=1.5", "corpus.max_near_duplicate_rate"),
                              ("corpus.near_duplicate_jaccard=0", "corpus.near_duplicate_jaccard"),
                              ("corpus.max_exact_duplicate_targets=-1", "corpus.max_exact_duplicate_targets")):
        with pytest.raises(ProfileError, match=message):
            load_profile("tiny", [override])


def test_paid_teacher_fails_after_generation_hands_calls_back_and_a_rerun_pays_nothing(
        tmp_path, monkeypatch, no_teacher_gate) -> None:
    from tests.openai_server import FakeOpenAI
    from tests.teacher_support import FAKE_KEY, KEY_ENV, make_profile
    from tinymars.profile import validate_profile

    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    with FakeOpenAI() as fake:
        strict = make_profile(fake.base_url)
        data = strict.model_dump(mode="json")
        data["corpus"]["near_duplicate_jaccard"] = 0.3  # the loopback answers share a 3-word frame: J = 1/3
        with pytest.raises(HeldoutOverlapError, match="a rerun pays nothing") as info:
            corpus_task.fn(validate_profile(data), str(tmp_path))
        paid = fake.outcomes["ok"]
        assert paid > 0 and len([c for c in info.value.teacher_calls if not c["cache_hit"]]) == paid
        result = corpus_task.fn(strict, str(tmp_path))
        assert fake.outcomes["ok"] == paid  # every answer came from the call cache
    rows = [json.loads(line) for line in (Path(result["artifact"]["path"]) / "corpus.jsonl").read_text().splitlines()]
    assert split_overlap(rows, 0.5)["total"]["exact_duplicates"] == 0
    assert {r["capability"] for r in rows if r["split"] == "heldout"} == set(ALL)


# ---------------------------------------------------------------- generated scenarios (corpus.scenarios)


def test_generated_scenarios_are_split_before_planning_and_entity_disjoint(tmp_path) -> None:
    """With a scenario phase the teacher writes the entities; a held-out row names none that a train row names. The
    loopback server's entities are made-up words (`zu` + eight letters), found here by searching the rows' text."""
    import re

    from corpus.teacher_corpus import generate_teacher_corpus
    from tests.openai_server import FakeOpenAI
    from tests.teacher_support import FAKE_KEY, make_profile

    with FakeOpenAI() as fake:
        section = make_profile(fake.base_url, prompts=12, conflicts=2, scenarios={"per_call": 6}).corpus
        result = generate_teacher_corpus(section, tmp_path, FAKE_KEY, log=lambda _: None)
    made_up = re.compile(r"\bzu[a-z]{8}\b")
    seen: dict[str, dict[str, set[str]]] = {}
    for row in result.rows:
        text = row["prompt"] + "\n" + row["target"]
        seen.setdefault(row["capability"], {"train": set(), "heldout": set()})[row["split"]] |= set(
            made_up.findall(text))
        if row["split"] == "heldout":  # and nothing of the shipped pools either
            assert not _entities_in(row)["memories"] and not _entities_in(row)["neutral_prompts"], row["row_id"]
    for cap, by_split in seen.items():
        assert by_split["train"] and by_split["heldout"], cap
        assert not by_split["train"] & by_split["heldout"], (cap, sorted(by_split["train"] & by_split["heldout"]))
    conflict = [r for r in result.rows if r["kind"] == "conflict"]
    assert conflict and {r["split"] for r in conflict} == {"heldout"}
    assert result.stats["scenarios"]["pools"]["memories"]["heldout"] > 0


def test_iter7_sized_template_corpus_passes_the_split_check() -> None:
    """600 prompts per capability (iter7's size) from the shipped pools: no exact duplicate across the split and a
    near-duplicate rate under the profile's limit, per capability."""
    section = load_profile("iter7").corpus
    rows, stats = generate_corpus(ALL, section.prompts_per_capability, section.conflict_prompts_per_capability,
                                  section.heldout_fraction, section.seed)
    assert stats["rejected"] == dict.fromkeys(ALL, 0)
    report = split_overlap(rows, section.near_duplicate_jaccard)
    assert report["total"]["exact_duplicates"] == 0
    for cap, s in report["by_capability"].items():
        assert s["heldout_rows"] >= 150 * 3 * 0.9 or cap not in SELECTION_CAPABILITIES, cap
        assert s["near_duplicate_rate"] <= section.max_near_duplicate_rate, cap
    assert overlap_failures(report, section.max_exact_duplicate_targets, section.max_near_duplicate_rate) == []
