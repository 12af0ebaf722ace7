"""Scorer rules on hand-written responses (including the traps) and statistics against scipy/statsmodels."""

from __future__ import annotations

import json
import math
import random

import pytest
from scipy.stats import binomtest
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from scorers.evaluate import format_markdown, score_generations
from scorers.register import (
    directional,
    follows_pole,
    lexicons,
    register_gap,
    register_hits,
    register_score,
    vader_compound,
)
from scorers.selection import dominant, item_mentions
from scorers.stats import binom_test, clopper_pearson, mcnemar_exact, sign_test
from scorers.text import clauses, count_phrase, words

ITEMS = [
    {"text": "walks Rex the beagle by the river on Sundays", "keys": ["Rex", "beagle"]},
    {"text": "spent a week in Lisbon with her sister", "keys": ["Lisbon", "sister"]},
    {"text": "is learning her grandmother's piano pieces", "keys": ["piano", "grandmother"]},
]


# ---------------------------------------------------------------- text normalisation


def test_words_fold_case_accents_possessives_and_contractions() -> None:
    assert words("Rex's BEAGLE, São-Paulo!") == ["rex", "beagle", "sao", "paulo"]
    assert words("It isn’t warm; don't") == ["it", "is", "not", "warm", "do", "not"]
    assert words("") == []


def test_clauses_break_on_punctuation() -> None:
    assert clauses("No, I am happy. Not sad") == [["no"], ["i", "am", "happy"], ["not", "sad"]]


def test_count_phrase_is_whole_word_and_multiword() -> None:
    toks = words("Rexford met Rex; double check, double-check and check")
    assert count_phrase(toks, ["rex"]) == 1
    assert count_phrase(toks, ["double", "check"]) == 2
    assert count_phrase(toks, []) == 0


# ---------------------------------------------------------------- selection


def test_item_mentions_counts_key_occurrences_per_item() -> None:
    assert item_mentions("Take Rex the beagle out; Rex loves it.", ITEMS) == [3, 0, 0]
    assert item_mentions("LISBON! Your sister's favourite city, lisbon.", ITEMS) == [0, 3, 0]
    assert item_mentions("Lisbón with your sister", ITEMS) == [0, 2, 0]  # accents folded
    assert item_mentions("Rexford plays pianos", ITEMS) == [0, 0, 0]  # whole words only
    assert item_mentions("", ITEMS) == [0, 0, 0]


def test_item_mentions_counts_a_key_listed_twice_once() -> None:
    items = [{"text": "x", "keys": ["Rex", "rex", "REX"]}]
    assert item_mentions("Rex", items) == [1]


def test_dominant_salient_uniquely_most_referenced() -> None:
    assert dominant("Take Rex the beagle for a long walk.", ITEMS, 0)
    assert not dominant("Take Rex the beagle for a long walk.", ITEMS, 1)
    # more references to the salient item than to another still counts
    assert dominant("Play the piano your grandmother loved, maybe a Lisbon tune.", ITEMS, 2)


def test_dominant_rejects_the_enumeration_leak() -> None:
    text = "You could walk Rex the beagle, visit Lisbon with your sister, or play grandmother's piano."
    assert item_mentions(text, ITEMS) == [2, 2, 2]
    assert not any(dominant(text, ITEMS, i) for i in range(3))


def test_dominant_needs_at_least_one_mention_and_no_tie() -> None:
    assert not dominant("Have a nice weekend.", ITEMS, 0)
    assert not dominant("", ITEMS, 0)
    assert not dominant("Rex and Lisbon.", ITEMS, 0)  # tie 1-1
    with pytest.raises(ValueError, match="out of range"):
        dominant("Rex", ITEMS, 3)


# ---------------------------------------------------------------- register


def test_register_score_counts_pole_hits() -> None:
    assert register_score("Oh, happy to help! What a lovely question.", "affect") == 2.0
    assert register_score("Fine. Tedious, but whatever.", "affect") == -2.0
    assert register_score("Good morning, coffee first.", "time") == 2.0
    assert register_score("It is late; go to bed.", "time") == -2.0
    assert register_score("Please be careful and consult an expert.", "ethics") == 3.0
    assert register_score("Relax and go ahead, it's harmless.", "ethics") == -3.0


def test_register_negation_flips_the_pole() -> None:
    assert register_hits("I am not warm today.", "affect") == (0, 1)
    assert register_score("This is not boring at all.", "affect") == 1.0
    assert register_score("Don't worry about it.", "ethics") == -1.0  # negated caution reads permissive
    assert register_score("No need to check anything.", "ethics") == -1.0
    assert register_score("It isn't safe.", "ethics") == -1.0


def test_register_negation_stays_inside_its_clause_and_window() -> None:
    assert register_score("No, I am happy.", "affect") == 1.0  # comma ends the negator's clause
    assert register_score("Not that I mind the long quiet walk, happy", "affect") == 1.0
    assert register_score("I do not think this will be so happy", "affect") == 1.0  # 4+ words away


def test_register_longest_phrase_counts_once() -> None:
    assert register_hits("Double check the wiring.", "ethics") == (1, 0)
    assert register_hits("Just do it.", "ethics") == (0, 1)


def test_register_empty_and_unknown() -> None:
    assert register_score("", "affect") == 0.0
    assert register_score("   ", "time") == 0.0
    with pytest.raises(ValueError, match="no register lexicon"):
        register_score("hello", "memory")


def test_directional_and_gap() -> None:
    warm, cold = "So happy to help, lovely!", "Sigh, how tedious."
    assert register_gap(warm, cold, "affect") == 4.0
    assert directional(warm, cold, "affect")
    assert not directional(cold, warm, "affect")
    assert not directional(warm, warm, "affect")  # a tie is not directional


def test_follows_pole_needs_nonzero_score_of_the_right_sign() -> None:
    assert follows_pole("Good morning!", "time", "+")
    assert not follows_pole("Good morning!", "time", "-")
    assert not follows_pole("Here is the plan.", "time", "+")
    assert not follows_pole("Here is the plan.", "time", "-")
    with pytest.raises(ValueError):
        follows_pole("x", "time", "warm")


def test_vader_compound() -> None:
    assert vader_compound("What a lovely, wonderful day!") > 0.5
    assert vader_compound("This is awful and miserable.") < -0.5
    assert vader_compound("") == 0.0


def test_lexicons_are_well_formed() -> None:
    lex = lexicons()
    negators = set(lex["negators"])
    for cap in ("affect", "time", "ethics"):
        plus = {tuple(words(e)) for e in lex[cap]["+"]}
        minus = {tuple(words(e)) for e in lex[cap]["-"]}
        assert not plus & minus, cap
        assert all(entry and not set(entry) & negators for entry in plus | minus), cap
        assert len(plus) == len(lex[cap]["+"]) and len(minus) == len(lex[cap]["-"]), cap


# ---------------------------------------------------------------- statistics


def test_mcnemar_reference_value() -> None:
    assert mcnemar_exact(3, 12) == pytest.approx(0.03515625, abs=1e-12)
    assert mcnemar(([50, 3], [12, 35]), exact=True).pvalue == pytest.approx(0.03515625, abs=1e-12)


def test_mcnemar_hand_computed() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 1) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8)


def test_mcnemar_matches_statsmodels_on_random_tables() -> None:
    rng = random.Random(1234)
    for _ in range(50):
        a, b, c, d = (rng.randint(0, 40) for _ in range(4))
        expected = mcnemar([[a, b], [c, d]], exact=True).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-15), (a, b, c, d)


def test_sign_and_binomial_tests() -> None:
    assert sign_test(3, 0) == pytest.approx(0.125)
    assert sign_test(0, 0) == 1.0
    assert sign_test(0, 4) == 1.0
    assert binom_test(10, 10) == pytest.approx(2.0**-10)
    assert binom_test(0, 0) == 1.0
    assert binom_test(3, 10, 0.5, "two-sided") == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)
    rng = random.Random(99)
    for _ in range(50):
        n = rng.randint(1, 60)
        k = rng.randint(0, n)
        assert sign_test(k, n - k) == pytest.approx(binomtest(k, n, 0.5, alternative="greater").pvalue)
        p = rng.choice([0.1, 0.25, 0.5, 0.8])
        assert binom_test(k, n, p, "less") == pytest.approx(binomtest(k, n, p, alternative="less").pvalue)


def test_clopper_pearson() -> None:
    lo, hi = clopper_pearson(0, 10, 0.05)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = clopper_pearson(10, 10, 0.05)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10))
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(1, 200)
        k = rng.randint(0, n)
        alpha = rng.choice([0.01, 0.05, 0.1])
        exp_lo, exp_hi = proportion_confint(k, n, alpha=alpha, method="beta")
        got_lo, got_hi = clopper_pearson(k, n, alpha)
        assert got_lo == pytest.approx(exp_lo, abs=1e-9) and got_hi == pytest.approx(exp_hi, abs=1e-9)


@pytest.mark.parametrize(
    "call",
    [lambda: mcnemar_exact(-1, 2), lambda: mcnemar_exact(1.5, 2), lambda: binom_test(5, 3),
     lambda: binom_test(1, 2, 1.5), lambda: clopper_pearson(1, 2, 0.0), lambda: sign_test(True, 1)],
)  # fmt: skip
def test_stats_reject_bad_input(call) -> None:
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------- evaluate


def _sel(row: int, arm: str, response: str, salient: int = 0, cap: str = "memory") -> dict:
    return {"row_id": f"{cap[:3]}-{row:04d}-a", "prompt_id": f"{cap[:3]}-{row:04d}", "capability": cap,
            "kind": "selection", "arm": arm, "pole": None, "text_pole": None, "salient_item": salient,
            "items": ITEMS, "response": response, "prompt_tokens": 40, "response_tokens": 12}  # fmt: skip


def _reg(pid: int, arm: str, pole: str, response: str, cap: str = "affect", kind: str = "register") -> dict:
    text_pole = None if kind == "register" else ("-" if pole == "+" else "+")
    return {"row_id": f"{cap[:3]}-{pid:04d}-{pole}", "prompt_id": f"{cap[:3]}-{pid:04d}", "capability": cap,
            "kind": kind, "arm": arm, "pole": pole, "text_pole": text_pole, "salient_item": None, "items": [],
            "response": response, "prompt_tokens": 10, "response_tokens": 8}  # fmt: skip


def _records() -> list[dict]:
    hit, miss = "Take Rex the beagle out.", "Rex, Lisbon, piano."  # miss is the enumeration leak
    cells = [(hit, hit)] * 2 + [(hit, miss)] * 6 + [(miss, hit)] * 1 + [(miss, miss)] * 3
    recs = []
    for i, (m, a) in enumerate(cells):
        recs += [_sel(i, "mars", m), _sel(i, "ablated", a)]
    warm, cold, flat = "Happy to help, lovely!", "Sigh, how tedious.", "Here is the plan."
    mars_pairs = [(warm, cold)] * 4 + [(cold, warm)] + [(flat, flat)]
    for i, (plus, minus) in enumerate(mars_pairs):
        recs += [_reg(i, "mars", "+", plus), _reg(i, "mars", "-", minus)]
        recs += [_reg(i, "ablated", "+", flat), _reg(i, "ablated", "-", flat)]
    conflict = [("+", warm), ("-", cold), ("+", cold), ("-", flat)]
    for i, (pole, response) in enumerate(conflict):
        recs.append(_reg(i, "mars", pole, response, kind="conflict"))
        recs.append(_reg(i, "ablated", pole, flat, kind="conflict"))
    return recs


def test_score_generations_selection_table() -> None:
    out = score_generations(_records(), alpha=0.01)["memory"]
    assert out["mcnemar"] == {"both": 2, "mars_only": 6, "ablated_only": 1, "neither": 3}
    assert out["n"] == 12
    assert out["mars_dominant_rate"] == pytest.approx(8 / 12)
    assert out["ablated_dominant_rate"] == pytest.approx(3 / 12)
    assert out["p"] == pytest.approx(mcnemar([[2, 6], [1, 3]], exact=True).pvalue)
    assert out["significant"] is False  # p = 0.125
    assert out["tokens"]["mars"]["mean_prompt_tokens"] == 40


def test_score_generations_register_and_conflict() -> None:
    out = score_generations(_records(), alpha=0.01)["affect"]
    mars, abl = out["arms"]["mars"], out["arms"]["ablated"]
    assert (mars["pairs"], mars["wins"], mars["losses"], mars["ties"]) == (6, 4, 1, 1)
    assert mars["reliability"] == pytest.approx(100 * 4 / 6)
    assert mars["mean_gap"] == pytest.approx((4 * 4 - 4 + 0) / 6)
    assert mars["p"] == pytest.approx(sign_test(4, 1))
    assert mars["vader_wins"] == 4 and mars["vader_mean_gap"] is not None
    assert (abl["wins"], abl["losses"], abl["ties"], abl["reliability"]) == (0, 0, 6, 0.0)
    con = out["conflict"]["arms"]["mars"]
    assert (con["n"], con["follows_channel"], con["follows_text"]) == (4, 2, 1)
    assert con["p"] == pytest.approx(binom_test(2, 4))
    assert out["conflict_rate"] == 0.5
    assert out["conflict"]["arms"]["ablated"]["follows_channel"] == 0


def test_score_generations_is_deterministic_and_json_safe() -> None:
    recs = _records()
    first = json.dumps(score_generations(recs), allow_nan=False)
    random.Random(3).shuffle(recs)
    assert json.dumps(score_generations(recs), allow_nan=False) == first
    assert list(score_generations(recs)) == ["memory", "affect"]


def test_score_generations_flags_bad_records() -> None:
    recs = _records()
    with pytest.raises(ValueError, match="duplicate"):
        score_generations(recs + [recs[0]])
    with pytest.raises(ValueError, match="unknown record kind"):
        score_generations([{**recs[0], "kind": "judge"}])


def test_score_generations_unpaired_rows_are_left_out() -> None:
    recs = [_sel(0, "mars", "Rex"), _sel(0, "ablated", "Lisbon"), _sel(1, "mars", "Rex")]
    out = score_generations(recs)["memory"]
    assert out["n"] == 1 and out["unpaired_rows"] == 1
    assert out["mcnemar"] == {"both": 0, "mars_only": 1, "ablated_only": 0, "neither": 0}
    assert out["arms"]["mars"]["n"] == 2 and out["arms"]["mars"]["dominant"] == 2


def test_a_third_arm_is_scored_alongside_without_changing_the_pairing() -> None:
    recs = _records()
    base = score_generations(recs)
    text_arm = [{**r, "arm": "text", "prompt_tokens": 55} for r in recs if r["arm"] == "mars"]
    out = score_generations(recs + text_arm)
    assert out["memory"]["mcnemar"] == base["memory"]["mcnemar"] and out["memory"]["p"] == base["memory"]["p"]
    assert list(out["memory"]["arms"]) == ["mars", "ablated", "text"]
    assert out["memory"]["arms"]["text"]["rate"] == out["memory"]["arms"]["mars"]["rate"]
    assert out["affect"]["arms"]["text"]["wins"] == 4
    assert out["memory"]["tokens"]["text"]["mean_prompt_tokens"] == 55


def test_significance_needs_the_right_direction() -> None:
    recs = []
    for i in range(12):
        recs += [_sel(i, "mars", "Lisbon"), _sel(i, "ablated", "Rex")]
    out = score_generations(recs)["memory"]
    assert out["p"] < 0.01 and out["significant"] is False
    assert math.isclose(out["delta_pp"], -100.0)


def test_format_markdown_has_every_table() -> None:
    md = format_markdown(score_generations(_records()))
    assert "### Selection" in md and "### Register" in md and "### Conflict" in md
    assert "| memory | 12 | 66.7% | 25.0% | 41.7 pp | 2 | 6 | 1 | 3 | 0.125 | n.s. |" in md
    assert "| affect | mars | 6 | 4 | 1 | 1 | 66.7% |" in md
    assert format_markdown({}) == "_No generations were scored._\n"
