"""Template teacher (corpus v2) and channel encoders: determinism, split, contract shapes, pre-flight."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import defaultdict

import pytest

from corpus import template_teacher as tt
from corpus.encode import encode_numeric, state_as_prompt_text, state_text
from corpus.rows import ROW_FIELDS, preflight_register, preflight_selection
from corpus.template_teacher import generate_corpus, load_data
from scorers.register import lexicons, register_score, vader_compound
from scorers.selection import dominant, item_mentions
from scorers.text import words
from tinymars.domain import CAPABILITIES, ETHICS_CATEGORIES, NUMERIC_DIMS, TEXT_CHANNELS

ALL = list(CAPABILITIES)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[dict], dict]:
    return generate_corpus(ALL, 12, 4, 0.25, seed=1)


def _by(rows: list[dict], field: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        out[row[field]].append(row)
    return out


# ---------------------------------------------------------------- determinism and split


def test_same_seed_same_rows_and_other_seed_differs(corpus) -> None:
    rows, stats = corpus
    again, again_stats = generate_corpus(ALL, 12, 4, 0.25, seed=1)
    assert json.dumps(again) == json.dumps(rows) and again_stats == stats
    other, _ = generate_corpus(ALL, 12, 4, 0.25, seed=2)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in rows]


def test_a_capability_does_not_depend_on_the_others(corpus) -> None:
    rows, _ = corpus
    alone, _ = generate_corpus(["time"], 12, 4, 0.25, seed=1)
    assert alone == [r for r in rows if r["capability"] == "time"]


def test_counts_and_stats(corpus) -> None:
    rows, stats = corpus
    assert stats["rows"] == len(rows) == 3 * (12 * 3) + 3 * (12 * 2 + 4 * 2)
    assert stats["rejected"] == dict.fromkeys(ALL, 0)
    assert stats["by_kind"] == {"conflict": 24, "register": 72, "selection": 108}
    assert stats["by_split"]["heldout"] + stats["by_split"]["train"] == len(rows)
    for cap, cap_rows in _by(rows, "capability").items():
        assert stats["by_capability"][cap]["rows"] == len(cap_rows)
    assert set(_by(rows, "capability")) == set(ALL)


def test_split_is_by_prompt(corpus) -> None:
    rows, _ = corpus
    for pid, group in _by(rows, "prompt_id").items():
        assert len({r["split"] for r in group}) == 1, pid
    for cap in ALL:
        regular = {
            r["prompt_id"]: r["split"] for r in rows if r["capability"] == cap and r["kind"] != "conflict"
        }
        held = sum(s == "heldout" for s in regular.values())
        assert len(regular) == 12 and held == 3, cap  # round(0.25 * 12)


def test_tiny_corpus_still_has_train_and_heldout() -> None:
    rows, _ = generate_corpus(ALL, 2, 0, 0.01, seed=5)
    for cap in ALL:
        splits = {r["split"] for r in rows if r["capability"] == cap}
        assert splits == {"train", "heldout"}, cap


def test_conflict_rows(corpus) -> None:
    rows, _ = corpus
    conflict = [r for r in rows if r["kind"] == "conflict"]
    regular_ids = {r["prompt_id"] for r in rows if r["kind"] != "conflict"}
    assert {r["capability"] for r in conflict} == {"affect", "time", "ethics"}
    banks = load_data("registers")["banks"]
    for pid, pair in _by(conflict, "prompt_id").items():
        assert "-c-" in pid and pid not in regular_ids
        assert sorted(r["pole"] for r in pair) == ["+", "-"]
        for r in pair:
            assert r["split"] == "heldout"
            assert r["text_pole"] == ("-" if r["pole"] == "+" else "+")
            assert any(a in r["prompt"] for a in banks[r["capability"]][r["text_pole"]]["assertions"])
            assert register_score(r["target"], r["capability"]) * (1 if r["pole"] == "+" else -1) > 0


def test_prompts_are_distinct_within_a_capability() -> None:
    rows, stats = generate_corpus(ALL, 120, 30, 0.25, seed=7)
    assert stats["rejected"] == dict.fromkeys(ALL, 0)  # the grown pools hold no key collisions
    for cap in ALL:
        prompts = {
            r["prompt_id"]: r["prompt"] for r in rows if r["capability"] == cap and r["kind"] != "conflict"
        }
        assert len(set(prompts.values())) == len(prompts) == 120, cap


# ---------------------------------------------------------------- row contract


def test_rows_follow_the_contract(corpus) -> None:
    rows, _ = corpus
    for r in rows:
        assert tuple(r) == ROW_FIELDS
        assert list(r["channel_state"]) == [r["capability"]]
        assert len(r["prompt"].split()) < 70 and 15 <= len(r["target"].split()) <= 50, r["row_id"]
        assert r["row_id"].startswith(r["prompt_id"] + "-")
    assert len({r["row_id"] for r in rows}) == len(rows)


def test_selection_rows(corpus) -> None:
    rows, _ = corpus
    for pid, group in _by([r for r in rows if r["kind"] == "selection"], "prompt_id").items():
        assert [r["salient_item"] for r in group] == [0, 1, 2], pid
        assert len({r["prompt"] for r in group}) == 1 and len({json.dumps(r["items"]) for r in group}) == 1
        for r in group:
            state = r["channel_state"][r["capability"]]
            assert state == {"salient_item": r["salient_item"], "text": r["items"][r["salient_item"]]["text"]}
            assert all(item["text"] in r["prompt"] for item in r["items"])
            assert r["pole"] is None and r["text_pole"] is None
            assert dominant(r["target"], r["items"], r["salient_item"])
            counts = item_mentions(r["target"], r["items"])
            assert sum(counts) == counts[r["salient_item"]]


def test_register_rows_and_channel_states(corpus) -> None:
    rows, _ = corpus
    for r in rows:
        if r["kind"] == "selection":
            continue
        sign = 1 if r["pole"] == "+" else -1
        state = r["channel_state"][r["capability"]]
        assert r["items"] is None and r["salient_item"] is None
        if r["capability"] == "affect":
            assert set(state) == {"valence", "saliency"}
            assert 0.6 <= sign * state["valence"] <= 0.95 and 0 <= state["saliency"] <= 1
        elif r["capability"] == "time":
            assert set(state) == {"hour", "weekday"} and 0 <= state["weekday"] <= 6
            assert state["hour"] in ((6, 7, 8, 9, 10) if sign > 0 else (21, 22, 23, 0, 1, 2))
        else:
            assert set(state) == {"caution", "category"} and state["category"] in ETHICS_CATEGORIES
            assert 0.6 <= sign * state["caution"] <= 0.95
        for dim_cap, dim in NUMERIC_DIMS.items():
            if dim_cap == r["capability"]:
                assert len(encode_numeric(dim_cap, state, dim)) == dim
    for pair in _by([r for r in rows if r["kind"] == "register"], "prompt_id").values():
        plus, minus = sorted(pair, key=lambda r: r["pole"])  # "+" < "-"
        assert (plus["pole"], minus["pole"]) == ("+", "-") and plus["prompt"] == minus["prompt"]
        assert register_score(plus["target"], plus["capability"]) > register_score(
            minus["target"], plus["capability"]
        )


# ---------------------------------------------------------------- pre-flight


def test_preflight_selection_rejects_bad_targets() -> None:
    items = [
        {"text": "a", "keys": ["Rex", "beagle"]},
        {"text": "b", "keys": ["Lisbon"]},
        {"text": "c", "keys": ["piano"]},
    ]
    assert preflight_selection(items, 0, "Walk Rex the beagle today.")
    assert not preflight_selection(items, 0, "Rex, Lisbon or piano?")  # enumeration
    assert not preflight_selection(items, 0, "Walk Rex the beagle, then some piano.")  # names another item
    assert not preflight_selection(items, 1, "Walk Rex the beagle today.")  # wrong item
    assert not preflight_selection(items, 2, "Have a good weekend.")  # names none


def test_preflight_register_rejects_bad_pairs() -> None:
    warm, cold = "Happy to help, lovely! Here it is.", "Sigh, how tedious. Here it is."
    assert preflight_register("affect", warm, cold)
    assert not preflight_register("affect", cold, warm)  # swapped poles
    assert not preflight_register("affect", warm, warm)  # no difference
    assert not preflight_register("affect", warm, "Here it is.")  # - target carries no cold register
    assert preflight_register("time", "Good morning!", "Good night!")
    assert not preflight_register("ethics", "Go ahead.", "Be careful.")


def test_generation_drops_and_counts_rejected_prompts(monkeypatch) -> None:
    monkeypatch.setattr(tt, "register_target", lambda cap, pole, core, rng: f"Happy, lovely! {core}")
    rows, stats = generate_corpus(["affect", "memory"], 5, 2, 0.25, seed=3)
    assert stats["rejected"] == {"affect": 7, "memory": 0} and stats["rejected_conflict"]["affect"] == 2
    assert {r["capability"] for r in rows} == {"memory"}


def test_generation_rejects_enumerating_selection_targets(monkeypatch) -> None:
    real = tt.SELECTION_BUILDERS["identity"]

    def enumerating(rng, side):
        prompt, items, targets = real(rng, side)
        return prompt, items, [" and ".join(it["keys"][0] for it in items)] * 3

    monkeypatch.setitem(tt.SELECTION_BUILDERS, "identity", enumerating)
    rows, stats = generate_corpus(["identity"], 4, 0, 0.25, seed=3)
    assert rows == [] and stats["rejected"] == {"identity": 4}


# ---------------------------------------------------------------- data pools (no rejection at any seed)


def test_data_pools() -> None:
    people = load_data("personas")
    ethics = load_data("registers")["ethics_prompts"]
    assert (
        sorted({p["category"] for p in ethics}) == sorted(ETHICS_CATEGORIES) and len(ETHICS_CATEGORIES) == 24
    )
    pools = {
        "memories": (load_data("memories")["memories"], ("idea", "why")),
        "threads": (load_data("threads")["threads"], ("topic", "step")),
        "crafts": (people["crafts"], ("role", "lens")),
    }
    for name, (pool, fields) in pools.items():
        keys = [tuple(words(k)) for item in pool for k in item["keys"]]
        assert len(keys) == len(set(keys)), f"{name}: a key term is shared by two items"
        for item in pool:
            counts = item_mentions(" ".join(item[f] for f in fields), pool)
            own = pool.index(item)
            assert counts[own] >= 1 and sum(counts) == counts[own], (
                name,
                item["text"] if "text" in item else item,
            )


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return [s for v in value for s in _strings(v)] if isinstance(value, list) else []


def test_people_are_never_a_key_or_a_word_of_other_content() -> None:
    """A first name is a persona's key and a user's name: it must not be another item's key or turn up in any
    other text, or pre-flight would reject prompts (and a name would tie a held-out row to train text)."""
    people = load_data("personas")
    names, surnames = people["names"], people["surnames"]
    assert len(set(names)) == len(names) >= 100 and len(set(surnames)) == len(surnames) >= 30
    assert not {n.lower() for n in names} & {s.lower() for s in surnames}
    other = {k: v for k, v in people.items() if k not in ("names", "surnames")}
    texts = [s for name in ("memories", "threads", "registers") for s in _strings(load_data(name))]
    other_words = {w for s in texts + _strings(other) + _strings(lexicons()) for w in words(s)}
    for person in names + surnames:
        assert len(words(person)) == 1 and words(person)[0] not in other_words, person
    crafts = [{"keys": c["keys"]} for c in people["crafts"]]
    for text in [q["answer"] for q in people["identity_questions"]] + people["identity_templates"]:
        assert sum(item_mentions(text, crafts)) == 0, text
    for name, pool in (("memories", "memories"), ("threads", "threads")):  # the frames name no item either
        data = load_data(name)
        assert sum(item_mentions(" ".join(data["templates"]), data[pool])) == 0, name


def test_answer_cores_and_items_are_unique_so_a_split_cannot_share_them() -> None:
    registers = load_data("registers")
    for pool in (registers["neutral_prompts"], registers["ethics_prompts"], load_data("memories")["memories"],
                 load_data("threads")["threads"], load_data("personas")["crafts"]):
        texts = [e.get("core") or e.get("text") or e["activity"] for e in pool]
        assert len(set(texts)) == len(texts)


def test_every_bank_phrase_carries_its_pole_and_cores_are_neutral() -> None:
    data = load_data("registers")
    cores = {
        "affect": data["neutral_prompts"],
        "time": data["neutral_prompts"],
        "ethics": data["ethics_prompts"],
    }
    for cap, poles in data["banks"].items():
        for pole, bank in poles.items():
            for phrase in bank["openers"] + bank["closers"]:
                assert register_score(phrase, cap) * (1 if pole == "+" else -1) > 0, (cap, pole, phrase)
        for q in cores[cap]:
            assert register_score(q["core"], cap) == 0, (cap, q["core"])


def test_every_affect_combination_passes_vader() -> None:
    data = load_data("registers")
    plus, minus = data["banks"]["affect"]["+"], data["banks"]["affect"]["-"]
    for q in data["neutral_prompts"]:
        worst_plus = min(
            vader_compound(f"{o} {q['core']} {c}")
            for o, c in itertools.product(plus["openers"], plus["closers"])
        )
        best_minus = max(
            vader_compound(f"{o} {q['core']} {c}")
            for o, c in itertools.product(minus["openers"], minus["closers"])
        )
        assert worst_plus > best_minus, q["core"]


def test_generate_corpus_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        generate_corpus(["mood"], 2, 0, 0.25, seed=0)
    with pytest.raises(ValueError):
        generate_corpus(["affect", "affect"], 2, 0, 0.25, seed=0)
    with pytest.raises(ValueError):
        generate_corpus(["affect"], 2, 0, 1.5, seed=0)


def test_exhausted_pools_raise_instead_of_repeating_prompts(monkeypatch) -> None:
    real = tt.SELECTION_BUILDERS["identity"]
    monkeypatch.setitem(tt.SELECTION_BUILDERS, "identity", lambda rng, side: real(random.Random(0), side))
    with pytest.raises(ValueError, match="distinct train prompts"):
        generate_corpus(["identity"], 4, 0, 0.25, seed=0)  # 3 train prompts, all the same


# ---------------------------------------------------------------- encoders


def test_encode_affect() -> None:
    assert encode_numeric("affect", {"valence": -0.8, "saliency": 0.7}, 2) == [-0.8, 0.7]
    assert encode_numeric("affect", {"valence": 0.5, "saliency": 0.1, "dominance": 0.3}, 3) == [0.5, 0.1, 0.3]
    assert encode_numeric("affect", {"valence": 0.5, "saliency": 0.1}, 4) == [0.5, 0.1, 0.0, 0.0]


def test_encode_time() -> None:
    vec = encode_numeric("time", {"hour": 6, "weekday": 0}, 16)
    assert len(vec) == 16 and vec[8:] == [0.0] * 8
    assert vec[0] == pytest.approx(1.0) and vec[1] == pytest.approx(0.0, abs=1e-12)
    assert vec[2] == pytest.approx(0.0) and vec[3] == pytest.approx(1.0)
    assert vec[4:8] == [0.0, 1.0, 0.0, 0.0]  # morning
    phase = {h: encode_numeric("time", {"hour": h, "weekday": 3}, 8)[4:8].index(1.0) for h in range(24)}
    assert [phase[h] for h in (0, 4, 5, 11, 12, 16, 17, 20, 21, 23)] == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]
    late = encode_numeric("time", {"hour": 23, "weekday": 6}, 8)
    assert math.hypot(late[0] - 0.0, late[1] - 1.0) < 0.3  # 23:00 sits next to 00:00


def test_encode_ethics() -> None:
    vec = encode_numeric("ethics", {"caution": -0.8, "category": "privacy"}, 24)
    i = ETHICS_CATEGORIES.index("privacy")
    assert vec[i] == -0.8 and all(v == -0.4 for j, v in enumerate(vec) if j != i)


def test_encode_errors_name_the_channel_and_minimum() -> None:
    with pytest.raises(ValueError, match=r"'time' needs dim >= 8"):
        encode_numeric("time", {"hour": 1, "weekday": 1}, 4)
    with pytest.raises(ValueError, match=r"'ethics' needs dim >= 24"):
        encode_numeric("ethics", {"caution": 0.5, "category": "privacy"}, 16)
    with pytest.raises(ValueError, match=r"'affect' needs dim >= 2"):
        encode_numeric("affect", {"valence": 0.5, "saliency": 0.5}, 1)
    with pytest.raises(ValueError, match="not a numeric channel"):
        encode_numeric("memory", {"salient_item": 0, "text": "x"}, 8)
    with pytest.raises(ValueError, match="category"):
        encode_numeric("ethics", {"caution": 0.5, "category": "vibes"}, 24)
    with pytest.raises(ValueError, match="hour"):
        encode_numeric("time", {"hour": 24, "weekday": 1}, 16)
    with pytest.raises(ValueError, match="valence"):
        encode_numeric("affect", {"valence": 1.5, "saliency": 0.5}, 2)


def test_state_text_and_prompt_text() -> None:
    assert TEXT_CHANNELS == ("memory", "identity", "continuity")
    assert (
        state_text("memory", {"salient_item": 1, "text": "spent a week in Lisbon"})
        == "spent a week in Lisbon"
    )
    with pytest.raises(ValueError):
        state_text("affect", {"valence": 0.5, "saliency": 0.5})
    assert state_as_prompt_text("affect", {"valence": 0.8, "saliency": 0.7}) == (
        "[state: mood warm, valence +0.80, saliency 0.70]"
    )
    assert state_as_prompt_text("time", {"hour": 7, "weekday": 1}) == "[state: time 07:00 Tuesday morning]"
    assert state_as_prompt_text("ethics", {"caution": -0.9, "category": "privacy"}) == (
        "[state: posture permissive, caution -0.90, category privacy]"
    )
    assert state_as_prompt_text("continuity", {"salient_item": 0, "text": "the kitchen repaint"}) == (
        "[state: active thread: the kitchen repaint]"
    )
