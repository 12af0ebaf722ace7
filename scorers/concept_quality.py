"""How trustworthy is each concept vector? Diagnostics per concept and layer, plain numpy, JSON-ready.

- first_pc_variance_ratio: the share of the paired differences' (uncentred) energy on their first
  principal direction; near 1 means every pair moves the same way, near 1/n means no shared direction.
- alignment: cosine of each pair's difference with the concept vector; outliers are pairs below
  Tukey's lower fence (Q1 - 1.5 IQR, and at least 0.1 below the median) or pointing the wrong way
  (cosine <= 0): texts to rewrite.
- nearest: the other concepts by cosine at the same layer.
- ridge: each concept vector regressed (ridge, no intercept) on the others; R^2 > 0.9 flags a
  concept that is mostly a linear combination of its peers (redundant: merge it or write more
  discriminative pairs). The top signed coefficients say which peers explain it.
- subspace_eigvals: the top eigenvalues of M_pos - M_base (subspace method): a clear gap means one
  dominant direction, a flat spectrum a shared multi-dimensional subspace.
- method_agreement: cosine of each extracted method's vector with the readout method's.

`quality_section` renders the report (quality.json) as the Markdown section of report.md / report.html,
every number exactly as stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RIDGE_LAMBDA = 0.01
REDUNDANT_R2 = 0.9
OUTLIER_MARGIN = 0.1  # a tight cluster's Tukey fence sits a hair below it; an outlier must also be this far out


def _r(x: float) -> float:
    return round(float(x), 6)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def first_pc_variance_ratio(diffs: np.ndarray) -> float:
    """Largest squared singular value over their sum, for the uncentred paired differences [n, H]."""
    s = np.linalg.svd(np.asarray(diffs, dtype=np.float64), compute_uv=False)
    total = float((s**2).sum())
    return float(s[0] ** 2 / total) if total > 0 else 0.0


def alignment(diffs: np.ndarray, vector: np.ndarray) -> dict[str, Any]:
    cos = _unit_rows(np.asarray(diffs, dtype=np.float64)) @ (vector / max(np.linalg.norm(vector), 1e-12))
    q1, median, q3 = np.percentile(cos, [25, 50, 75])
    fence = min(q1 - 1.5 * (q3 - q1), median - OUTLIER_MARGIN)
    outliers = [int(i) for i in np.flatnonzero((cos < fence) | (cos <= 0))]
    return {"mean": _r(cos.mean()), "min": _r(cos.min()), "cosines": [_r(c) for c in cos], "outliers": outliers}


def ridge_r2(target: np.ndarray, others: np.ndarray, lam: float = RIDGE_LAMBDA) -> tuple[float, np.ndarray]:
    """R^2 (uncentred: a direction has no meaningful mean) and coefficients of target [H] ~ others [k, H]."""
    y = np.asarray(target, dtype=np.float64)
    x = np.asarray(others, dtype=np.float64).T  # [H, k]
    if x.shape[1] == 0:
        return 0.0, np.zeros(0)
    beta = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)
    resid = y - x @ beta
    return float(1.0 - (resid @ resid) / max(float(y @ y), 1e-24)), beta


def layer_report(concepts: list[str], vectors: np.ndarray, diffs: dict[str, np.ndarray],
                 lam: float = RIDGE_LAMBDA, redundant_r2: float = REDUNDANT_R2) -> dict[str, Any]:
    """vectors [n_concepts, H] (one layer, the readout method); diffs: concept -> paired differences [n, H]."""
    vectors = np.asarray(vectors, dtype=np.float64)
    cos = _unit_rows(vectors) @ _unit_rows(vectors).T
    out = {}
    for j, concept in enumerate(concepts):
        peers = [i for i in range(len(concepts)) if i != j]
        r2, beta = ridge_r2(vectors[j], vectors[peers], lam)
        order = np.argsort(-np.abs(beta))[:5]
        nearest = sorted(peers, key=lambda i: -cos[j, i])
        entry: dict[str, Any] = {
            "nearest": [{"concept": concepts[i], "cosine": _r(cos[j, i])} for i in nearest],
            "ridge": {"r2": _r(r2), "redundant": bool(r2 > redundant_r2),
                      "coefficients": {concepts[peers[i]]: _r(beta[i]) for i in order}},
        }
        if concept in diffs and len(diffs[concept]):
            entry["first_pc_variance_ratio"] = _r(first_pc_variance_ratio(diffs[concept]))
            entry["alignment"] = alignment(diffs[concept], vectors[j])
        out[concept] = entry
    return out


def quality_report(concepts: list[str], layers: list[int], method: str,
                   vectors: dict[str, dict[int, np.ndarray]], diffs: dict[int, dict[str, np.ndarray]],
                   spectra: dict[int, dict[str, list[float]]] | None = None,
                   lam: float = RIDGE_LAMBDA, redundant_r2: float = REDUNDANT_R2) -> dict[str, Any]:
    """The whole report: `vectors[method][layer]` is [n_concepts, H]; `diffs[layer][concept]` is [n, H]."""
    per_layer: dict[str, Any] = {}
    redundant = []
    for layer in layers:
        report = layer_report(concepts, vectors[method][layer], diffs.get(layer, {}), lam, redundant_r2)
        for j, concept in enumerate(concepts):
            entry = report[concept]
            ref = vectors[method][layer][j]
            entry["method_agreement"] = {
                m: _r(np.dot(_unit_rows(v[layer][j]), _unit_rows(ref))) for m, v in sorted(vectors.items())}
            if spectra and concept in spectra.get(layer, {}):
                entry["subspace_eigvals"] = [_r(x) for x in spectra[layer][concept]]
            if entry["ridge"]["redundant"]:
                redundant.append({"layer": layer, "concept": concept, "r2": entry["ridge"]["r2"]})
        per_layer[str(layer)] = report
    return {"concepts": list(concepts), "layers": list(layers), "method": method, "methods": sorted(vectors),
            "ridge_lambda": lam, "redundant_r2": redundant_r2, "redundant": redundant, "per_layer": per_layer}


# ---- the report section -------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    """A stored number exactly as quality.json holds it (already rounded to 6 decimals), or a dash."""
    return "–" if value is None else str(value)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def quality_section(quality: dict[str, Any], nearest: int = 2, eigvals: int = 5) -> list[str]:
    """quality.json (`quality_report`) as report Markdown lines: a heading, how to read it, and per layer and
    concept the diagnostics table, the method agreement table and the subspace spectrum (when recorded)."""
    method, methods, cut = quality["method"], quality["methods"], quality["redundant_r2"]
    diagnostics, agreement, spectra = [], [], []
    for layer in quality["layers"]:
        for concept in quality["concepts"]:
            e = quality["per_layer"][str(layer)][concept]
            align = e.get("alignment") or {}
            outliers = (", ".join(str(i) for i in align["outliers"]) or "none") if align else "–"
            peers = ", ".join(f"{n['concept']} {_cell(n['cosine'])}" for n in e["nearest"][:nearest])
            explained = ", ".join(f"{c} {_cell(b)}" for c, b in list(e["ridge"]["coefficients"].items())[:nearest])
            diagnostics.append([str(layer), concept, _cell(e.get("first_pc_variance_ratio")), _cell(align.get("mean")),
                                _cell(align.get("min")), outliers, peers or "–", _cell(e["ridge"]["r2"]),
                                explained or "–", "**yes**" if e["ridge"]["redundant"] else "no"])
            agreement.append([str(layer), concept, *(_cell(e["method_agreement"].get(m)) for m in methods)])
            if "subspace_eigvals" in e:
                spectra.append([str(layer), concept, ", ".join(_cell(v) for v in e["subspace_eigvals"][:eigvals])])
    flagged = "; ".join(f"**{r['concept']}** at layer {r['layer']} (R² {_cell(r['r2'])})" for r in quality["redundant"])
    verdict = (f"Redundant (ridge R² above {_cell(cut)}): {flagged}." if flagged
               else f"No concept is redundant (every ridge R² is at most {_cell(cut)}).")
    lines = ["## Concept vector quality", "",
             f"How far to trust each concept vector (readout method `{method}`), per layer. *First-PC ratio*: "
             "share of the paired differences' energy on their first principal direction (near 1: every pair "
             "moves the same way; near 1/pairs: no shared direction). *Alignment*: cosine of each pair's difference "
             "with the vector, mean and minimum; *outlier pairs* (by index) sit far below the rest or point the "
             "wrong way: rewrite them. *Nearest*: the other concepts by cosine. *Ridge R²*: how much of the vector "
             f"the other concepts' vectors explain (ridge, lambda {_cell(quality['ridge_lambda'])}), with the "
             f"largest coefficients; above {_cell(cut)} the concept is redundant: merge it or write more "
             "discriminative pairs. A dash: not computed (unpaired texts).", "", verdict, "",
             *_md_table(["layer", "concept", "first-PC ratio", "alignment mean", "alignment min", "outlier pairs",
                         "nearest (cosine)", "ridge R²", "explained by (coefficient)", "redundant"], diagnostics), "",
             f"Agreement of every extracted method with `{method}`: cosine of the two vectors (1: the same "
             "direction; near 0: the methods disagree, so the concept is not one clean direction).", "",
             *_md_table(["layer", "concept", *(f"`{m}`" for m in methods)], agreement), ""]
    if spectra:
        lines += [f"Top {eigvals} eigenvalues of M_pos - M_base (subspace method): a clear drop after the first "
                  "means one dominant direction, a flat run a shared multi-dimensional subspace.", "",
                  *_md_table(["layer", "concept", "eigenvalues"], spectra), ""]
    return lines
