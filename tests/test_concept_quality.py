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
