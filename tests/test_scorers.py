"""Scorer rules on hand-written responses (including the traps) and statistics against scipy/statsmodels."""

from __future__ import annotations

import json
import math
import random

import pytest
from scipy.stats import binomtest, ttest_1samp
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
    # one row per prompt here, so the per-prompt sign test is the one-sided exact McNemar: half the two-sided p
    assert out["p"] == pytest.approx(sign_test(6, 1)) == pytest.approx(mcnemar([[2, 6], [1, 3]], exact=True).pvalue / 2)
    assert (out["prompts"], out["prompts_mars_better"], out["prompts_ablated_better"]) == (12, 6, 1)
    assert out["significant"] is False  # p = 0.0625
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
    # one conflict row per prompt here: per-prompt rates [1, 1, 0, 0], t-test against 0.5
    assert con["p"] == pytest.approx(ttest_1samp([1, 1, 0, 0], 0.5, alternative="greater").pvalue)
    assert (con["pairs"], con["pair_rate"], con["pair_p"]) == (0, None, 1.0)  # no prompt has both rows
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
    assert out["p"] == 1.0 and out["significant"] is False  # one-sided: the wrong direction is no evidence
    assert (out["prompts_mars_better"], out["prompts_ablated_better"]) == (0, 12)
    assert math.isclose(out["delta_pp"], -100.0)


def test_format_markdown_has_every_table() -> None:
    md = format_markdown(score_generations(_records()))
    assert "### Selection" in md and "### Register" in md and "### Conflict" in md
    assert "| memory | 12 | 66.7% | 25.0% | 41.7 pp | 2 | 6 | 1 | 3 | 6/1 | 0.0625 | n.s. |" in md
    assert "| affect | mars | 6 | 4 | 1 | 1 | 66.7% |" in md
    assert format_markdown({}) == "_No generations were scored._\n"


# ---------------------------------------------------------------- traps: wrong language, empty, negation


def test_wrong_language_responses_score_nothing() -> None:
    # The lexicons and key terms are English: a response in another language earns no register points,
    # no VADER sentiment and no selection, even when it says the right thing.
    for text in ("¡Qué alegría ayudarte! Un abrazo muy cálido.", "Ach, wie langweilig. Na gut."):
        assert register_score(text, "affect") == 0.0
        assert vader_compound(text) == 0.0
        assert not follows_pole(text, "affect", "+") and not follows_pole(text, "affect", "-")
    assert register_score("Bonjour, quelle belle matinée!", "time") == 0.0
    assert item_mentions("Vai a Lisboa com a tua irmã.", ITEMS) == [0, 0, 0]
    assert not dominant("Vai a Lisboa com a tua irmã.", ITEMS, 1)
    # ...but proper names do not translate: a German answer about Rex the beagle still selects item 0
    assert dominant("Geh mit Rex spazieren, dem Beagle.", ITEMS, 0)


def test_empty_response_is_a_miss_everywhere() -> None:
    from scorers.persistence import split_segments
    from scorers.similarity import cosine_distance

    assert not any(dominant("", ITEMS, i) for i in range(3))
    assert register_gap("", "", "time") == 0.0 and not directional("", "", "time")
    # directional is relative: an empty + response still beats a cold - response (0 > -2), never a warm one
    assert directional("", "Sigh, how tedious.", "affect") and not directional("", "So happy!", "affect")
    assert not follows_pole("", "ethics", "+") and not follows_pole("", "ethics", "-")
    assert split_segments("", 3) == ["", "", ""]
    assert cosine_distance("", "") == 0.0 and cosine_distance("", "hello") == 1.0


def test_negated_pole_word_counts_for_the_other_pole() -> None:
    assert follows_pole("I am not happy about this.", "affect", "-")
    assert not follows_pole("I am not happy about this.", "affect", "+")
    assert follows_pole("It is not dark yet.", "time", "+")  # "not dark" reads as the + (morning) pole
    assert register_gap("Never boring, always a delight!", "Not lovely, not kind.", "affect") == 4.0


# ---------------------------------------------------------------- statistics: more tests vs scipy / statsmodels


def test_mcnemar_equals_statsmodels_to_the_last_digit() -> None:
    rng = random.Random(2024)
    for _ in range(500):
        a, b, c, d = (rng.randint(0, 250) for _ in range(4))
        assert mcnemar_exact(b, c) == mcnemar([[a, b], [c, d]], exact=True).pvalue, (a, b, c, d)


def test_wilcoxon_matches_scipy_and_handles_all_zero() -> None:
    import numpy as np
    from scipy.stats import wilcoxon

    from scorers.stats import wilcoxon_signed_rank

    rng = np.random.default_rng(11)
    for _ in range(30):
        n = int(rng.integers(3, 60))
        d = np.round(rng.normal(0.3, 1.0, size=n), int(rng.integers(0, 3)))  # rounding makes ties and zeros
        if not np.any(d):
            continue
        for alt in ("greater", "two-sided"):
            assert wilcoxon_signed_rank(d, alt) == pytest.approx(wilcoxon(d, alternative=alt).pvalue, rel=1e-12)
    assert wilcoxon_signed_rank([0.0, 0.0, 0.0]) == 1.0
    assert wilcoxon_signed_rank([]) == 1.0
    assert wilcoxon_signed_rank([1.0, 2.0, 3.0]) == pytest.approx(1 / 8)  # exact: only the all-positive ranking


def test_bootstrap_equals_scipy_paired_percentile_bootstrap() -> None:
    import numpy as np
    from scipy.stats import bootstrap

    from scorers.stats import bootstrap_mean_ci

    rng = np.random.default_rng(3)
    for seed in range(5):
        a, b = rng.integers(0, 2, size=40).astype(float), rng.integers(0, 2, size=40).astype(float)
        ref = bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                        n_resamples=999, method="percentile", rng=np.random.default_rng(seed))
        got = bootstrap_mean_ci(list(a - b), seed=seed, resamples=999)
        assert got == pytest.approx([ref.confidence_interval.low, ref.confidence_interval.high], abs=1e-12)
    assert bootstrap_mean_ci([0.5] * 10, seed=0) == [0.5, 0.5]
    assert bootstrap_mean_ci([1.0], seed=0) is None
    lo, hi = bootstrap_mean_ci([0.0, 1.0] * 50, seed=1, resamples=4000)
    assert lo < 0.5 < hi and 0.35 < lo and hi < 0.65


def test_holm_hand_computed_and_against_statsmodels() -> None:
    from statsmodels.stats.multitest import multipletests

    from scorers.stats import holm

    # m = 4: sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03 = 0.06, max(0.06, 1*0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # step-down monotonicity: a later, smaller raw product is lifted to the running max
    assert holm([0.02, 0.021]) == pytest.approx([0.04, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.003]) == [0.003] and holm([]) == []
    rng = random.Random(8)
    for _ in range(20):  # multipletests costs ~60 ms a call
        p = [rng.random() ** 3 for _ in range(rng.randint(1, 8))]
        assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]), abs=1e-15)
    with pytest.raises(ValueError):
        holm([1.5])


def _brute_power(n: int, p1: float, p0: float, alpha: float, alternative: str) -> float:
    from scipy.stats import binom

    return sum(binom.pmf(k, n, p1) for k in range(n + 1)
               if binomtest(k, n, p0, alternative=alternative).pvalue < alpha)


@pytest.mark.parametrize("p1,p0,alternative", [(0.7, 0.5, "greater"), (0.8, 0.5, "two-sided"),
                                               (0.6, 1 / 3, "greater"), (0.9, 0.5, "greater")])
def test_power_and_n_needed_match_brute_force_exact_tests(p1, p0, alternative) -> None:
    from scorers.stats import binomial_n_for_power, binomial_power

    for n in (1, 4, 9, 20, 33):
        assert float(binomial_power(n, p1, p0, 0.05, alternative)) == pytest.approx(
            _brute_power(n, p1, p0, 0.05, alternative), abs=1e-12)
    need = binomial_n_for_power(p1, p0, 0.05, 0.8, alternative)
    assert _brute_power(need, p1, p0, 0.05, alternative) >= 0.8
    assert all(_brute_power(n, p1, p0, 0.05, alternative) < 0.8 for n in range(1, need))


def test_power_without_an_effect() -> None:
    from scorers.stats import binomial_n_for_power

    assert binomial_n_for_power(0.5, 0.5, 0.05) is None and binomial_n_for_power(0.3, 0.5, 0.05) is None
    assert binomial_n_for_power(0.5001, 0.5, 0.05, n_max=50) is None  # beyond n_max


# ---------------------------------------------------------------- hypotheses, arms, persistence, distances, relief


def _hyp(hid: str, metric: str, beats: str, capability: str = "all", arm: str = "mars", alpha: float = 0.05) -> dict:
    return {"id": hid, "capability": capability, "metric": metric, "arm": arm, "beats": beats, "alpha": alpha}


def _selection_cells(cells: list[tuple[str, str]], cap: str = "memory") -> list[dict]:
    recs = []
    for i, (m, a) in enumerate(cells):
        recs += [_sel(i, "mars", m, cap=cap), _sel(i, "ablated", a, cap=cap)]
    return recs


HIT, MISS = "Take Rex the beagle out.", "Rex, Lisbon, piano."


def _verdict(records: list[dict], hyp: dict) -> dict:
    from scorers.evaluate import score_all

    return score_all(records, {"hypotheses": [hyp], "bootstrap_resamples": 200})["hypotheses"][0]


def test_hypothesis_supported_not_supported_and_inconclusive() -> None:
    from scorers.stats import binomial_n_for_power

    needed = binomial_n_for_power(0.65, 0.5, 0.05, 0.8)  # default minimal effect: share 0.5 + 0.15
    strong = _selection_cells([(HIT, MISS)] * 20 + [(HIT, HIT)] * 5)
    h = _verdict(strong, _hyp("H1", "dominant", "ablated"))
    m = h["members"][0]
    assert (h["verdict"], m["verdict"], m["test"], m["n"], m["n_informative"]) == \
        ("supported", "supported", "sign test", 25, 20)
    assert m["p"] == sign_test(20, 0) == 0.5**20 and m["p_holm"] == m["p"]
    assert m["effect"] == 1.0 and m["ci95"] == pytest.approx(list(clopper_pearson(20, 20)))
    assert m["n_needed"] == needed  # fixed by the design, not by these data

    wrong = _verdict(_selection_cells([(MISS, HIT)] * 20), _hyp("H1", "dominant", "ablated"))
    assert wrong["verdict"] == "not supported" and wrong["members"][0]["p"] == 1.0
    assert wrong["members"][0]["reason"] == "95% interval excludes the minimal effect"

    small = _selection_cells([(HIT, MISS)] * 3 + [(MISS, MISS)] * 3)
    h = _verdict(small, _hyp("H1", "dominant", "ablated"))
    m = h["members"][0]
    assert m["p"] == sign_test(3, 0) and m["p"] > 0.05
    assert h["verdict"] == "inconclusive" and m["n_needed"] == needed > m["n_informative"] == 3


def test_hypothesis_family_is_holm_corrected_across_capabilities() -> None:
    # memory alone is significant at 0.05 (one-sided sign test, 5 of 5: p = 0.5**5 = 0.03125); with identity
    # null the family of two needs p < 0.025 for it: Holm doubles the smallest p-value.
    recs = _selection_cells([(HIT, MISS)] * 5, cap="memory") + _selection_cells([(MISS, MISS)] * 6, cap="identity")
    alone = _verdict(recs, _hyp("H", "dominant", "ablated", capability="memory"))
    fam = _verdict(recs, _hyp("H", "dominant", "ablated"))
    assert alone["verdict"] == "supported" and alone["members"][0]["p"] == pytest.approx(0.03125)
    assert [m["capability"] for m in fam["members"]] == ["memory", "identity"]
    assert fam["members"][0]["p_holm"] == pytest.approx(0.0625) and fam["members"][0]["verdict"] != "supported"
    assert fam["members"][1]["verdict"] == "inconclusive" and fam["verdict"] == "inconclusive"


def test_hypotheses_against_chance_and_on_magnitudes() -> None:
    import numpy as np

    from scorers.stats import wilcoxon_signed_rank

    recs = _records()
    sign = _verdict(recs, _hyp("H2", "directional", "chance"))["members"][0]
    assert (sign["test"], sign["counts"], sign["p"]) == \
        ("sign test", {"wins": 4, "losses": 1, "ties": 1}, sign_test(4, 1))
    gap = _verdict(recs, _hyp("H3", "gap", "ablated"))["members"][0]
    diffs = [4.0, 4.0, 4.0, 4.0, -4.0, 0.0]
    assert gap["test"] == "Wilcoxon signed-rank" and gap["mean"] == pytest.approx(2.0)
    assert gap["effect"] == pytest.approx(np.mean(diffs) / np.std(diffs, ddof=1))  # d_z
    assert gap["p"] == wilcoxon_signed_rank(diffs)
    con = _verdict(recs, _hyp("H5", "conflict", "chance"))["members"][0]
    assert con["p"] == pytest.approx(ttest_1samp([1, 1, 0, 0], 0.5, alternative="greater").pvalue)
    assert con["verdict"] == "inconclusive"  # 4 prompts rule nothing in or out
    dom = _verdict(recs, _hyp("H6", "dominant", "chance"))["members"][0]
    rates = [1.0] * 8 + [0.0] * 4  # rows 0-7 hit (both-hit and mars-only cells), one row per prompt
    assert dom["p"] == pytest.approx(ttest_1samp(rates, 1 / 3, alternative="greater").pvalue)
    assert dom["effect"] == pytest.approx(8 / 12)


def test_hypothesis_without_generations_is_inconclusive_and_bad_specs_fail() -> None:
    from scorers.evaluate import score_all

    h = _verdict(_records(), _hyp("H", "dominant", "ablated", capability="identity"))
    assert h["verdict"] == "inconclusive" and h["members"][0]["n"] == 0
    with pytest.raises(ValueError, match="does not apply"):
        _verdict(_records(), _hyp("H", "dominant", "ablated", capability="affect"))
    with pytest.raises(ValueError, match="unique"):
        score_all(_records(), {"hypotheses": [_hyp("H", "gap", "chance")] * 2})
    with pytest.raises(ValueError, match="unknown scoring setting"):
        score_all(_records(), {"alfa": 0.1})


def test_channel_vs_text_rates_deltas_and_token_cost() -> None:
    from scorers.evaluate import score_all

    recs = _records()
    recs += [{**r, "arm": "text", "prompt_tokens": r["prompt_tokens"] + 7,
              "response": MISS if r["kind"] == "selection" else r["response"]} for r in recs if r["arm"] == "mars"]
    rows = {(r["capability"], r["kind"]): r for r in score_all(recs, {"bootstrap_resamples": 300})["channel_vs_text"]}
    mem = rows[("memory", "selection")]
    assert [mem["arms"][a]["rate"] for a in ("mars", "ablated", "text")] == pytest.approx([8 / 12, 3 / 12, 0.0])
    assert [mem["arms"][a]["prompts"] for a in ("mars", "ablated", "text")] == [12, 12, 12]
    assert mem["deltas"]["mars-ablated"]["discordant"] == [6, 1]
    assert mem["deltas"]["mars-ablated"]["p"] == pytest.approx(binomtest(1, 7, 0.5).pvalue)  # two-sided sign test
    assert mem["deltas"]["mars-text"]["delta"] == pytest.approx(8 / 12)
    assert mem["deltas"]["text-ablated"]["delta"] == pytest.approx(-3 / 12)
    assert mem["tokens"]["text_extra_prompt_tokens"] == 7.0
    assert mem["tokens"]["text"]["mean_prompt_tokens"] == 47.0
    assert set(rows) == {("memory", "selection"), ("affect", "register"), ("affect", "conflict")}


def test_persistence_by_segment_and_turn() -> None:
    from scorers.evaluate import score_all
    from scorers.persistence import split_segments

    assert split_segments("a b c d e f g", 3) == ["a b", "c d", "e f g"]
    assert split_segments("one two", 3) == ["", "one", "two"]
    fading = "Rex the beagle needs a walk and then some quiet time at home today"
    recs = _selection_cells([(fading, "Nothing.")] * 4)
    recs += [{**r, "turn": 1, "response": "Nothing." if r["arm"] == "mars" else HIT} for r in recs]
    p = score_all(recs)["persistence"]
    seg = {r["arm"]: r["rates"] for r in p["segments"]}
    assert seg["mars"] == [1.0, 0.0, 0.0] and seg["ablated"] == [0.0, 0.0, 0.0]
    turns = {r["arm"]: r["rates"] for r in p["by_turn"]}
    assert p["turns"] == [0, 1] and turns["mars"] == [1.0, 0.0] and turns["ablated"] == [0.0, 1.0]
    # turn-1 records never leak into the turn-0 verdicts
    assert score_all(recs)["capabilities"] == score_all([r for r in recs if r.get("turn", 0) == 0])["capabilities"]


def test_cosine_distance_between_arms() -> None:
    from scorers.evaluate import score_all
    from scorers.similarity import cosine_distance

    assert cosine_distance("Rex the beagle", "the BEAGLE, Rex!") == 0.0
    assert cosine_distance("warm sun", "cold moon") == 1.0
    assert cosine_distance("a b", "a c") == pytest.approx(0.5)
    sim = {(r["capability"], r["pair"]): r for r in score_all(_records())["similarity"]}
    mem = sim[("memory", "mars-ablated")]
    assert mem["n"] == 12 and mem["identical"] == pytest.approx((2 + 3) / 12)  # both-hit and both-miss rows


def test_relief_valve_against_each_baseline() -> None:
    from scorers.relief import score_relief

    loss = lambda nats, bpb: {"nats_per_token": nats, "bits_per_byte": bpb, "tokens": 10, "total_nats": nats * 10}  # noqa: E731
    relief = {"native": {"has_channels": True, "channels_zeroed": loss(3.0, 1.2), "channels_on": loss(2.5, 1.0)},
              "small": {"has_channels": False, "channels_zeroed": loss(2.8, 1.1)},
              "large": {"has_channels": False, "channels_zeroed": loss(3.1, None)}}
    out = score_relief(relief, "native")
    assert out["channel_benefit_nats"] == pytest.approx(0.5)
    vs = {v["baseline"]: v for v in out["versus"]}
    assert vs["small"]["delta_nats"] == pytest.approx(0.2) and vs["small"]["delta_bpb"] == pytest.approx(0.1)
    assert vs["large"]["delta_nats"] == pytest.approx(-0.1) and vs["large"]["delta_bpb"] is None
    assert score_relief(relief, None)["versus"] == []


def test_score_all_is_deterministic_order_free_and_strict_json() -> None:
    from scorers.evaluate import score_all

    recs = _records() + [{**r, "arm": "text"} for r in _records() if r["arm"] == "mars"]
    settings = {"hypotheses": [_hyp("H1", "dominant", "ablated"), _hyp("H3", "gap", "ablated")],
                "bootstrap_resamples": 300}
    first = json.dumps(score_all(recs, settings), allow_nan=False)
    random.Random(5).shuffle(recs)
    assert json.dumps(score_all(recs, settings), allow_nan=False) == first
    assert json.loads(first) == score_all(recs, settings)  # a JSON round trip loses nothing


def test_format_evaluation_has_every_section() -> None:
    from scorers.evaluate import score_all
    from scorers.report_md import format_evaluation

    recs = _records() + [{**r, "turn": 1} for r in _records()]
    meas = {"model": "native",
            "relief": {"native": {"has_channels": True, "channels_zeroed": {"nats_per_token": 3.0, "bits_per_byte": 1.0,
                                                                            "tokens": 5, "total_nats": 15.0}},
                       "baseline": {"has_channels": False, "channels_zeroed": {"nats_per_token": 2.9,
                                                                               "bits_per_byte": 0.9, "tokens": 5,
                                                                               "total_nats": 14.5}}},
            "gates": {"alpha_l2": 0.5, "channel_names": ["memory", "affect"], "per_layer": [[0.3, -0.4]]}}
    md = format_evaluation(score_all(recs, {"hypotheses": [_hyp("H1", "dominant", "ablated")]}, meas))
    for heading in ("## Hypotheses (pre-registered)", "## Evaluation: MARS vs ABLATED (model `native`)",
                    "### Selection", "### Register", "### Conflict", "## Arms side by side", "## Persistence",
                    "## Response distance between arms", "## Relief valve", "## Gates (alpha_l2 = 0.5000)"):
        assert heading in md, heading
    assert "| H1 | memory | sign test | 7 of 12 prompts decided |" in md
    assert "| native | baseline | +0.1000 | +0.1000 |" in md
    assert "| turn 0 | turn 1 |" in md


def test_read_generations_names_the_bad_line(tmp_path) -> None:
    from scorers.io import GenerationsError, read_generations

    good = _records()[0]
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "arm": None}) + "\n")
    with pytest.raises(GenerationsError, match="line 3: missing field 'arm'"):
        read_generations(path)
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(GenerationsError, match="line 2: not JSON"):
        read_generations(path)
    path.write_text(json.dumps({**good, "items": None}) + "\n")
    with pytest.raises(GenerationsError, match="missing field 'items'"):
        read_generations(path)
    path.write_text(json.dumps({**good, "response": ""}) + "\n")
    assert read_generations(path)[0]["response"] == ""  # an empty response is a valid (failed) answer
    with pytest.raises(GenerationsError, match="no such file"):
        read_generations(tmp_path / "missing.jsonl")
