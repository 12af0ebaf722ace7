"""Concept quality report: redundancy by ridge R^2 (checked against independent solvers), PC ratio, outliers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scorers.concept_quality import REDUNDANT_R2, alignment, first_pc_variance_ratio, quality_report, ridge_r2

H = 64


def concept_vectors(seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Three independent random directions plus 'dup', a noisy copy of 'a' (the planted duplicate)."""
    rng = np.random.default_rng(seed)
    a, b, c = rng.standard_normal((3, H))
    dup = a + 0.1 * rng.standard_normal(H)
    vectors = np.stack([a, b, c, dup])
    return ["a", "b", "c", "dup"], vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_planted_duplicate_is_flagged_redundant_and_independent_concepts_are_not() -> None:
    names, vectors = concept_vectors()
    report = quality_report(names, [3], "diff_means", {"diff_means": {3: vectors}}, {})
    flagged = {r["concept"] for r in report["redundant"]}
    # a duplicate pair explains each other: both copies are flagged, the independent ones are not
    assert flagged == {"a", "dup"}
    layer = report["per_layer"]["3"]
    assert layer["dup"]["ridge"]["r2"] > REDUNDANT_R2 and layer["b"]["ridge"]["r2"] < 0.5
    assert layer["dup"]["nearest"][0]["concept"] == "a"
    assert max(layer["dup"]["ridge"]["coefficients"].items(), key=lambda kv: abs(kv[1]))[0] == "a"
    json.dumps(report, allow_nan=False)  # strictly JSON-serialisable


@pytest.mark.parametrize("lam", [0.01, 0.5])
def test_ridge_r2_matches_independent_solvers(lam: float) -> None:
    from sklearn.linear_model import Ridge

    names, vectors = concept_vectors(1)
    y, x = vectors[3], vectors[:3]
    r2, beta = ridge_r2(y, x, lam)
    # the same objective solved as augmented least squares: [X; sqrt(lam) I] beta = [y; 0]
    aug_x = np.vstack([x.T, np.sqrt(lam) * np.eye(3)])
    aug_y = np.concatenate([y, np.zeros(3)])
    ref_beta = np.linalg.lstsq(aug_x, aug_y, rcond=None)[0]
    np.testing.assert_allclose(beta, ref_beta, rtol=1e-8, atol=1e-10)
    sk = Ridge(alpha=lam, fit_intercept=False).fit(x.T, y)
    np.testing.assert_allclose(beta, sk.coef_, rtol=1e-6, atol=1e-8)
    resid = y - x.T @ ref_beta
    assert r2 == pytest.approx(1 - resid @ resid / (y @ y), rel=1e-9)


def test_first_pc_ratio_and_alignment_outliers() -> None:
    rng = np.random.default_rng(2)
    u = rng.standard_normal(H)
    u /= np.linalg.norm(u)
    diffs = np.outer(rng.uniform(1.0, 2.0, 20), u) + 0.05 * rng.standard_normal((20, H))
    diffs[7] = -diffs[7]  # one pair written the wrong way round
    eig = np.linalg.eigvalsh(diffs.T @ diffs)
    assert first_pc_variance_ratio(diffs) == pytest.approx(eig[-1] / eig.sum(), rel=1e-9)
    assert first_pc_variance_ratio(diffs) > 0.9
    noise = rng.standard_normal((20, H))
    assert first_pc_variance_ratio(noise) < 0.3
    result = alignment(diffs, u)
    assert result["outliers"] == [7]
    assert result["cosines"][7] < -0.9 and result["min"] == result["cosines"][7]


def test_report_carries_spectra_and_method_agreement() -> None:
    names, vectors = concept_vectors(3)
    flipped = vectors.copy()
    flipped[1] *= -1
    rng = np.random.default_rng(3)
    diffs = {0: {n: vectors[i] + 0.03 * rng.standard_normal((5, H)) for i, n in enumerate(names)}}
    spectra = {0: {n: [0.9, 0.1, 0.0] for n in names}}
    report = quality_report(names, [0], "pca", {"pca": {0: vectors}, "logistic": {0: flipped}}, diffs, spectra)
    entry = report["per_layer"]["0"]["b"]
    assert entry["method_agreement"] == {"logistic": pytest.approx(-1.0), "pca": pytest.approx(1.0)}
    assert entry["subspace_eigvals"] == [0.9, 0.1, 0.0]
    assert entry["alignment"]["mean"] > 0.9 and len(entry["alignment"]["cosines"]) == 5
    assert report["methods"] == ["logistic", "pca"]


# ---- the report section ----------------------------------------------------------------------------------
def _tables(lines: list[str]) -> list[list[list[str]]]:
    """Every pipe table in the lines, as rows of cells (header first, the |---| rule dropped)."""
    tables, current = [], None
    for line in [*lines, ""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current = (current or []) + [[c.strip() for c in line.strip().strip("|").split("|")]]
        elif current:
            tables.append(current)
            current = None
    return tables


@pytest.fixture(scope="module")
def real_quality(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """quality.json as the steer stage writes it: a tiny native model read on three concepts' pairs."""
    import torch

    from models.architectures import build
    from tasks.steering import QUALITY, write_readout
    from tinymars.profile import SteeringSection

    model = build({"arch": "native", "n_layer": 3, "n_head": 2, "d_model": 16}, vocab_size=40, seq_len=32,
                  channel_names=["affect"], channel_dim=4, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh init leaves every block an identity; give the blocks something to do
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def encode(texts: list[str]) -> list[list[int]]:
        return [[ord(ch) % 40 for ch in text] for text in texts]

    words = {"warmth": ("warm sunny", "cold grim"), "kindness": ("kind soft", "harsh mean"), "time": ("dawn", "dusk")}
    texts = {c: ([f"{p} day {i}" for i in range(6)], [f"{n} day {i}" for i in range(6)], [f"day {i}" for i in range(6)])
             for c, (p, n) in words.items()}
    out = tmp_path_factory.mktemp("readout")
    write_readout(model.eval(), encode, texts, SteeringSection(layers=[0, 2], method="pca", device="cpu"), out,
                  {"name": "tiny", "arch": "native"})
    return json.loads((out / QUALITY).read_text())


def test_quality_section_shows_the_numbers_quality_json_holds(real_quality: dict) -> None:
    from scorers.concept_quality import quality_section

    lines = quality_section(real_quality)
    assert lines[0] == "## Concept vector quality" and "`pca`" in lines[2]
    diagnostics, agreement, spectra = _tables(lines)
    rows = {(r[0], r[1]): r for r in diagnostics[1:]}
    assert sorted(rows) == sorted((str(layer), c) for layer in (0, 2) for c in ("warmth", "kindness", "time"))
    for (layer, concept), row in rows.items():
        e = real_quality["per_layer"][layer][concept]
        assert float(row[2]) == e["first_pc_variance_ratio"]
        assert (float(row[3]), float(row[4])) == (e["alignment"]["mean"], e["alignment"]["min"])
        assert row[5] == (", ".join(map(str, e["alignment"]["outliers"])) or "none")
        first, cosine = row[6].split(", ")[0].split(" ")
        assert (first, float(cosine)) == (e["nearest"][0]["concept"], e["nearest"][0]["cosine"])
        assert float(row[7]) == e["ridge"]["r2"] and (row[9] == "**yes**") == e["ridge"]["redundant"]
    assert agreement[0][2:] == [f"`{m}`" for m in real_quality["methods"]] and len(real_quality["methods"]) == 5
    for row in agreement[1:]:
        stored = real_quality["per_layer"][row[0]][row[1]]["method_agreement"]
        assert [float(c) for c in row[2:]] == [stored[m] for m in real_quality["methods"]]
        assert stored["pca"] == pytest.approx(1.0)
    for row in spectra[1:]:
        stored = real_quality["per_layer"][row[0]][row[1]]["subspace_eigvals"][:5]
        assert [float(v) for v in row[2].split(", ")] == stored


def test_quality_section_names_the_redundant_concept_and_renders_as_html() -> None:
    from scorers.concept_quality import quality_section
    from tasks.report_html import markdown_to_html

    names, vectors = concept_vectors()
    report = json.loads(json.dumps(quality_report(names, [3], "diff_means", {"diff_means": {3: vectors}}, {})))
    lines = quality_section(report)
    verdict = next(line for line in lines if line.startswith("Redundant"))
    assert "**dup** at layer 3" in verdict and "**a** at layer 3" in verdict and "**b**" not in verdict
    diagnostics = {r[1]: r for r in _tables(lines)[0][1:]}
    assert diagnostics["dup"][9] == "**yes**" and diagnostics["b"][9] == "no"
    assert diagnostics["b"][2] == "–" and diagnostics["b"][5] == "–"  # no pairs given: not computed
    assert len(_tables(lines)) == 2  # no spectra recorded: no eigenvalue table
    page = markdown_to_html("\n".join(lines))
    assert page.count("<table>") == 2 and "<h2>Concept vector quality</h2>" in page
    assert "<strong>yes</strong>" in page
