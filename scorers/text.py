"""Text normalisation shared by the scorers, so key terms and lexicon entries match the same way.

Rules: NFKD accent folding, lower case, curly quotes folded, possessive ``'s`` dropped
("Rex's" -> "rex"), ``n't`` expanded to `` not`` ("isn't" -> "is not", so negation is seen),
every other non-alphanumeric character is a word break. Matching is on whole words only.
"""

from __future__ import annotations

import re
import unicodedata

_CLAUSE_BREAK = re.compile(r"[.!?;:,()\[\]\n\u2014\u2013]+|\s-\s")
_NON_WORD = re.compile(r"[^a-z0-9]+")


def fold(text: str) -> str:
    """Lower-case, accent-free, with apostrophes folded and contractions expanded."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    text = re.sub(r"'s\b", "", text)
    text = re.sub(r"n't\b", " not", text)
    return text.replace("'", "")


def words(text: str) -> list[str]:
    """Whole words after `fold`; punctuation never glues to a word."""
    return [w for w in _NON_WORD.split(fold(text)) if w]


def clauses(text: str) -> list[list[str]]:
    """Words grouped by clause, so negation never reaches across a comma or a full stop."""
    return [ws for part in _CLAUSE_BREAK.split(text) if (ws := words(part))]


def count_phrase(tokens: list[str], phrase: list[str]) -> int:
    """Non-overlapping whole-word occurrences of a (possibly multi-word) phrase."""
    n, k, i, hits = len(tokens), len(phrase), 0, 0
    if k == 0:
        return 0
    while i + k <= n:
        if tokens[i : i + k] == phrase:
            hits += 1
            i += k
        else:
            i += 1
    return hits


# Words that can sit between two key terms of one mention ("Rex *the* beagle", "Lisbon *with your* sister")
# without making it a second mention: articles, determiners, possessives, prepositions, "and"/"or".
FUNCTION_WORDS = frozenset(
    "a an the this that these those my your his her its our their me him them us "
    "of in on at to for with from by about into over near and or".split()
)


def clause_tokens(text: str) -> tuple[list[str], list[int]]:
    """The words of `text` (as `words` gives them) and each word's clause index (as `clauses` groups them)."""
    tokens: list[str] = []
    clause_of: list[int] = []
    for index, part in enumerate(clauses(text)):
        tokens += part
        clause_of += [index] * len(part)
    return tokens, clause_of


def phrase_spans(tokens: list[str], phrase: list[str]) -> list[tuple[int, int]]:
    """Every whole-word occurrence of `phrase` as a half-open [start, end) token span, overlaps included."""
    k = len(phrase)
    if k == 0:
        return []
    return [(i, i + k) for i in range(len(tokens) - k + 1) if tokens[i : i + k] == phrase]
