"""Selection scorer: references, not key-term hits (hand-written responses, including the traps)."""

from __future__ import annotations

import pytest

from scorers.selection import MAX_BRIDGE, dominant, item_mentions
from scorers.text import FUNCTION_WORDS, count_phrase, phrase_spans, words

ITEMS = [
    {"text": "walks Rex the beagle by the river on Sundays", "keys": ["Rex", "beagle"]},
    {"text": "spent a week in Lisbon with her sister", "keys": ["Lisbon", "sister"]},
    {"text": "is learning her grandmother's piano pieces", "keys": ["piano", "grandmother"]},
]


def key_hits(response: str) -> list[int]:
    """The old count (every key-term hit), to show where it and the reference count part ways."""
    toks = words(response)
    return [sum(count_phrase(toks, words(k)) for k in item["keys"]) for item in ITEMS]


# ---------------------------------------------------------------- what one reference is


def test_one_mention_using_two_keys_is_one_reference() -> None:
    assert key_hits("Ask about her sister's Lisbon trip.") == [0, 2, 0]
    assert item_mentions("Ask about her sister's Lisbon trip.", ITEMS) == [0, 1, 0]  # adjacent keys
    assert item_mentions("Take Rex the beagle out.", ITEMS) == [1, 0, 0]  # bridged by "the"
    assert item_mentions("Lisbón with your sister", ITEMS) == [0, 1, 0]  # accents folded, "with your" bridges


def test_overlapping_keys_are_one_reference() -> None:
    items = [{"keys": ["Lisbon", "Lisbon trip", "trip"]}]
    assert phrase_spans(words("the Lisbon trip"), ["lisbon", "trip"]) == [(1, 3)]
    assert item_mentions("Remember the Lisbon trip?", items) == [1]


def test_mentions_in_separate_clauses_count_separately() -> None:
    assert item_mentions("Take Rex the beagle out; Rex loves it.", ITEMS) == [2, 0, 0]
    assert item_mentions("LISBON! Your sister's favourite city, lisbon.", ITEMS) == [0, 3, 0]
    assert item_mentions("Rex, the beagle, is waiting.", ITEMS) == [2, 0, 0]  # commas end the clause
    assert item_mentions("Rex. Beagle.", ITEMS) == [2, 0, 0]  # touching words, but across a full stop


def test_a_content_word_or_a_long_gap_starts_a_new_reference() -> None:
    assert item_mentions("Rex loves his beagle", ITEMS) == [2, 0, 0]  # "loves" is not a function word
    assert "and" in FUNCTION_WORDS and "loves" not in FUNCTION_WORDS
    near = "Rex " + " ".join(["the"] * MAX_BRIDGE) + " beagle"
    far = "Rex " + " ".join(["the"] * (MAX_BRIDGE + 1)) + " beagle"
    assert item_mentions(near, ITEMS) == [1, 0, 0] and item_mentions(far, ITEMS) == [2, 0, 0]


def test_whole_words_only_empty_and_duplicate_keys() -> None:
    assert item_mentions("Rexford plays pianos", ITEMS) == [0, 0, 0]
    assert item_mentions("", ITEMS) == [0, 0, 0]
    assert item_mentions("Rex", [{"text": "x", "keys": ["Rex", "rex", "REX"]}]) == [1]
    assert item_mentions("Rex", [{"text": "x", "keys": []}, {"text": "y"}]) == [0, 0]


def test_a_key_with_clause_punctuation_still_matches() -> None:
    items = [{"keys": ["St. Ives"]}, {"keys": ["Penzance"]}]
    assert item_mentions("A weekend in St. Ives, then Penzance.", items) == [1, 1]


# ---------------------------------------------------------------- dominant


def test_a_foregrounded_item_wins_over_an_aside_that_uses_two_keys() -> None:
    text = "Sit at the piano tonight; the piano will calm you more than her sister's Lisbon trip did."
    assert key_hits(text) == [0, 2, 2]  # the old hit count called this a tie
    assert item_mentions(text, ITEMS) == [0, 1, 2]
    assert dominant(text, ITEMS, 2) and not dominant(text, ITEMS, 1)


def test_dominant_salient_uniquely_most_referenced() -> None:
    assert dominant("Take Rex the beagle for a long walk.", ITEMS, 0)
    assert not dominant("Take Rex the beagle for a long walk.", ITEMS, 1)
    # one piano-grandmother mention against one Lisbon mention is a tie in references
    assert not dominant("Play the piano your grandmother loved, maybe a Lisbon tune.", ITEMS, 2)
    assert dominant("Play the piano your grandmother loved; the piano suits you, maybe a Lisbon tune.", ITEMS, 2)


def test_an_enumeration_of_all_three_is_not_dominant() -> None:
    text = "You could walk Rex the beagle, visit Lisbon with your sister, or play grandmother's piano."
    assert key_hits(text) == [2, 2, 2]
    assert item_mentions(text, ITEMS) == [1, 1, 1]
    assert not any(dominant(text, ITEMS, i) for i in range(3))
    assert not any(dominant("Rex, Lisbon, piano.", ITEMS, i) for i in range(3))


def test_dominant_needs_at_least_one_mention_and_no_tie() -> None:
    assert not dominant("Have a nice weekend.", ITEMS, 0)
    assert not dominant("", ITEMS, 0)
    assert not dominant("Rex and Lisbon.", ITEMS, 0)  # tie 1-1
    with pytest.raises(ValueError, match="out of range"):
        dominant("Rex", ITEMS, 3)
