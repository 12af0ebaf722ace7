"""The crosstalk matrix (scorers/crosstalk.py) finds a planted interference and only that.

Generations are simulated (scorers.simulate: responses built from the scorers' own vocabularies, prompt
random effects, so the real scorers read them): channel X = time is wired to capability Y = affect (with
time at state 'a' the affect responses carry their row's pole; at 'b' they ignore it), memory is wired to
identity the same way for a selection pair, and every other pair is left untouched.
"""

from __future__ import annotations

import random

from corpus.template_teacher import generate_corpus
from scorers.crosstalk import crosstalk_markdown, crosstalk_matrix
from scorers.simulate import ArmModel, simulate_records
from tinymars.domain import CAPABILITIES, crosstalk_arm

WIRED = {("time", "affect"), ("memory", "identity")}  # (X moved, Y measured)


def _records(wired: set[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    rows, _ = generate_corpus(list(CAPABILITIES), 160, 0, 0.5, seed=11)
    held = [r for r in rows if r["split"] == "heldout" and r["kind"] != "conflict"]
    rng = random.Random(0)
    diagonal = simulate_records(held, {"mars": ArmModel(follow=dict.fromkeys(CAPABILITIES, 0.8)),
                                       "ablated": ArmModel()}, rng)
    moved: list[dict] = []
    for y in CAPABILITIES:
        y_rows = [r for r in held if r["capability"] == y]
        for x in CAPABILITIES:
            if x == y:
                continue
            a = ArmModel(follow={y: 0.9} if (x, y) in wired else {})
            moved += simulate_records(y_rows, {crosstalk_arm(x, "a"): a, crosstalk_arm(x, "b"): ArmModel()}, rng)
    return diagonal, moved


def test_a_planted_crosstalk_cell_is_significant_and_untouched_pairs_are_not():
    diagonal, moved = _records(WIRED)
    matrix = crosstalk_matrix(diagonal, moved, list(CAPABILITIES), alpha=0.01)
    cells = {(c["x"], c["y"]): c for c in matrix["cells"]}
    assert len(cells) == 36
    for pair in WIRED:
        assert cells[pair]["significant"] and cells[pair]["mean_diff"] > 0, cells[pair]
    untouched = [c for (x, y), c in cells.items() if x != y and (x, y) not in WIRED]
    assert not any(c["significant"] for c in untouched), [c for c in untouched if c["significant"]]
    assert all(cells[(y, y)]["significant"] for y in CAPABILITIES)  # the intended effect, planted at 0.8
    assert cells[("time", "affect")]["test"] == "wilcoxon" and cells[("memory", "identity")]["test"] == "sign"
    table = "\n".join(crosstalk_markdown(matrix))
    assert "| time |" in table and " *" in table


def test_without_a_wire_the_off_diagonal_family_stays_quiet():
    """Both states of every X independent null draws (they differ response by response): no cell is found."""
    diagonal, moved = _records(set())
    matrix = crosstalk_matrix(diagonal, moved, list(CAPABILITIES), alpha=0.01)
    off = [c for c in matrix["cells"] if not c["diagonal"]]
    assert sum(c["wins"] + c["losses"] for c in off) > 500  # the states did answer differently
    assert not any(c["significant"] for c in off)
