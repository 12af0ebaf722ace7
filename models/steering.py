"""Concept directions from pooled activations, and the readout files that carry them.

Every method returns a unit vector signed so that positives project above negatives:
- diff_means: mean(pos) - mean(neg), the plain contrastive-activation-addition direction;
- pca: first principal direction of the paired differences pos_i - neg_i (uncentred, so the shared
  shift is the signal, not removed), which denoises diff-of-means when pairs vary in strength;
- logistic / logistic_l1: the weight vector of a pos-vs-neg logistic regression, solved to a convergence
  criterion (`logistic_fit`), on activations centred and scaled by one global number so the geometry, and
  hence the weight's direction, is kept. logistic: L2 (ridge 0.01). logistic_l1: elastic net, a sparse
  denoiser for concepts carried by a few coordinates: an L1 strength relative to the data (a fraction of
  the strength that zeroes every weight) zeroes noise-only coordinates; on a dense direction it keeps a
  sparse subset, so expect a lower cosine to the dense truth than the other methods give;
- subspace: each example spans a subspace (a pooled activation, measured from a neutral origin,
  spans its unit vector; `subspace_eigen` also takes per-example [tokens, hidden] matrices, whose
  full-rank right singular vectors span it); M = mean V V^T over positives minus the same over the
  baseline set; the top-k eigenvectors of M, each signed along mean(pos) - mean(neg) and weighted by
  its (non-negative) eigenvalue, sum to the direction. A flat spectrum then keeps the whole shared
  subspace and a clear gap reduces to the top eigenvector. The pipeline reads pooled activations.
Eigen/SVD work runs in float32 on `device` (the accelerator when there is one).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from tinymars.artifacts import write_atomic
from tinymars.profile import SteeringMethod, SteeringSection

METHODS: tuple[str, ...] = get_args(SteeringMethod)  # ("diff_means", "pca", "logistic", "logistic_l1", "subspace")
READOUT_WEIGHTS = "readout.safetensors"
READOUT_META = "readout.json"
META_KEYS = ("concepts", "layers", "hidden_size", "dtype", "method", "pooling", "model", "layer_norms")


class ReadoutError(ValueError):
    """A readout folder whose files disagree with each other or with readout.json."""


def _unit(v: Tensor) -> Tensor:
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise ValueError("direction is zero or not finite: positives and negatives are indistinguishable")
    return v / n


def _signed(v: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """Flip v so that mean(pos) projects above mean(neg)."""
    return -v if float((pos.mean(0) - neg.mean(0)) @ v) < 0 else v


def diff_means(pos: Tensor, neg: Tensor) -> Tensor:
    return _unit(pos.mean(0) - neg.mean(0))


def first_pc_of_pairs(pos: Tensor, neg: Tensor, device: str = "cpu") -> Tensor:
    if pos.shape != neg.shape:
        raise ValueError(f"pca needs paired rows (pos_i, neg_i); got pos {list(pos.shape)} and neg {list(neg.shape)}")
    diffs = (pos - neg).to(device, torch.float32)
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    return _signed(vh[0].cpu(), pos, neg)


L2_STRENGTH = 1e-2  # logistic: ridge on the weights (not the intercept); keeps the problem strongly convex
# logistic_l1 is an elastic net: the L1 strength (a fraction of lambda_max, see logistic_fit; the profile's
# steering.l1_fraction) zeroes coordinates that carry only noise, and a ridge strong enough to keep correlated
# relevant coordinates together (plain L1 on separable pairs keeps one of them and drops the rest).
L1_FRACTION: float = SteeringSection.model_fields["l1_fraction"].default
L1_RIDGE = 1.0
SOLVER_TOL = 1e-7  # stop when the (proximal) gradient norm falls below this fraction of its value at w = 0
SOLVER_MAX_ITER = 20_000  # a guard: the fits here take 30-2000 iterations


class SolverWarning(RuntimeWarning):
    """The logistic solver hit its iteration guard before its convergence criterion."""


@dataclass(frozen=True)
class LogisticFit:
    """A solved logistic problem with the evidence that it is solved (iterations, convergence, gradient)."""

    weight: Tensor  # [H], in the units of `logistic_design`'s x
    bias: float
    l1: float  # the absolute L1 strength used (l1_fraction x lambda_max)
    lambda_max: float
    iterations: int
    converged: bool
    gradient_norm: float  # of the last proximal gradient mapping, relative to the gradient at w = 0, b = 0


def logistic_design(pos: Tensor, neg: Tensor, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """(x, y) in float64: rows centred on the overall mean and divided by one global number so the mean row
    norm is sqrt(H) (an average feature has unit scale); one scale keeps the geometry, hence the direction."""
    x = torch.cat([pos, neg]).to(device, torch.float64)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(device, torch.float64)
    x = x - x.mean(0)
    x = x / x.norm(dim=1).mean().clamp_min(1e-12) * x.size(1) ** 0.5
    return x, y


def logistic_fit(pos: Tensor, neg: Tensor, l1_fraction: float = 0.0, l2: float = L2_STRENGTH,
                 tol: float = SOLVER_TOL, max_iter: int = SOLVER_MAX_ITER, device: str = "cpu") -> LogisticFit:
    """Minimise mean log-loss(x w + b, y) + l2/2 |w|^2 + l1 |w|_1 on `logistic_design`'s (x, y).

    l1 = l1_fraction x lambda_max, where lambda_max = |x^T (y - mean y)|_inf / n is the smallest strength at
    which every weight is zero. So the strength is relative to the data's own scale: a feature stays at zero
    unless its correlation with the label residual, at the fit, reaches that fraction of the strongest
    single feature's correlation with the label; 0 is plain L2 logistic regression, 1 zeroes everything.
    Solver: FISTA (accelerated proximal gradient, soft-thresholding for L1) with gradient-based restarts and
    step 1/L; it stops when the norm of the proximal gradient mapping is below `tol` times the gradient's
    norm at w = 0, b = 0. Reaching `max_iter` first is reported with a `SolverWarning`, never silently.
    """
    if not 0.0 <= l1_fraction < 1.0:
        raise ValueError(f"l1_fraction: {l1_fraction} must be in [0, 1): it is the L1 strength as a fraction of "
                         "the strength that zeroes every weight")
    if l2 < 0 or tol <= 0 or max_iter < 1:
        raise ValueError(f"logistic: needs l2 >= 0, tol > 0 and max_iter >= 1 (got {l2}, {tol}, {max_iter})")
    x, y = logistic_design(pos, neg, device)
    n, hidden = x.shape
    lambda_max = float((x.T @ (y - y.mean())).abs().max()) / n
    l1 = l1_fraction * lambda_max
    # theta = [w, b]: one vector, so each step is a handful of tensor ops (they dominate at these sizes)
    x1 = torch.cat([x, torch.ones(n, 1, device=x.device, dtype=x.dtype)], dim=1)
    ridge = torch.full((hidden + 1,), l2, device=x.device, dtype=x.dtype)
    ridge[-1] = 0.0  # the intercept is not penalised
    # step 1/L: the loss Hessian is x1^T D x1 / n with D <= 1/4, and x1's blocks are orthogonal (x centred)
    lr = 1.0 / (max(float(torch.linalg.matrix_norm(x, ord=2)) ** 2 / n, 1.0) / 4 + l2)
    shrink = torch.full_like(ridge, lr * l1)
    shrink[-1] = 0.0

    def gradient(theta: Tensor) -> Tensor:
        return x1.T @ (torch.sigmoid(x1 @ theta) - y) / n + ridge * theta

    theta = torch.zeros(hidden + 1, device=x.device, dtype=x.dtype)
    start_norm = float(gradient(theta).norm())
    if start_norm <= 1e-9 * hidden**0.5:
        raise ValueError("logistic: the gradient is zero at w = 0; positives and negatives are indistinguishable")
    point, t, norm, iterations = theta, 1.0, float("inf"), 0
    while iterations < max_iter and norm > tol * start_norm:
        iterations += 1
        step = point - lr * gradient(point)
        new = step.sign() * (step.abs() - shrink).clamp_min(0) if l1 > 0 else step
        norm = float((point - new).norm()) / lr  # the proximal gradient mapping at `point`
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        # restart the momentum when it points uphill (O'Donoghue & Candes 2015): linear convergence
        if float((point - new) @ (new - theta)) > 0:
            point, t_next = new, 1.0
        else:
            point = new + (t - 1) / t_next * (new - theta)
        theta, t = new, t_next
    converged = norm <= tol * start_norm
    if not converged:
        warnings.warn(f"logistic: not converged after {max_iter} iterations (proximal gradient norm "
                      f"{norm / start_norm:.1e} of its start, tolerance {tol:.0e}); the direction may be off - "
                      "raise max_iter (models.steering.SOLVER_MAX_ITER) or the L2 strength", SolverWarning,
                      stacklevel=2)
    return LogisticFit(weight=theta[:-1].cpu(), bias=float(theta[-1]), l1=l1, lambda_max=lambda_max,
                       iterations=iterations, converged=converged, gradient_norm=norm / start_norm)


def logistic_direction(pos: Tensor, neg: Tensor, l1_fraction: float = 0.0, device: str = "cpu",
                       **solver: Any) -> Tensor:
    """The unit weight vector of `logistic_fit` (in the centred, globally scaled space that keeps directions)."""
    fit = logistic_fit(pos, neg, l1_fraction, device=device, **solver)
    return _signed(_unit(fit.weight.float()), pos, neg)


def _projector_mean(examples: Tensor | list[Tensor], rank: int | None, device: str) -> Tensor:
    """mean over examples of V V^T; an example is a pooled vector [H] or a token matrix [T,H]."""
    rows = [examples[i] for i in range(len(examples))]
    hidden = rows[0].shape[-1]
    m = torch.zeros(hidden, hidden, device=device)
    for ex in rows:
        ex = ex.to(device, torch.float32)
        if ex.dim() == 1:
            v = _unit(ex)[:, None]
        else:
            _, s, vh = torch.linalg.svd(ex, full_matrices=False)
            keep = int((s > s[0] * 1e-6).sum()) if rank is None else min(rank, len(s))
            v = vh[:keep].T
        m += v @ v.T
    return m / len(rows)


def subspace_eigen(pos: Tensor | list[Tensor], base: Tensor | list[Tensor], rank: int | None = None,
                   device: str = "cpu") -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of M_pos - M_base, float32 on the CPU."""
    m = _projector_mean(pos, rank, device) - _projector_mean(base, rank, device)
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vals.flip(0).cpu(), vecs.flip(1).cpu()


def subspace_inputs(pos: Tensor, neg: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
    """Pooled vectors measured from a neutral origin, so a pooled example's subspace is its concept content.

    With baselines the origin is the pos/neg midpoint (both poles lie on the concept's axis, the
    baselines do not); without, the negatives are the base set and their mean the origin.
    """
    if base is None:
        return pos - neg.mean(0), neg - neg.mean(0)
    origin = torch.cat([pos, neg]).mean(0)
    return pos - origin, base - origin


def subspace_direction(pos: Tensor, neg: Tensor, base: Tensor | None = None, k: int = 5,
                       device: str = "cpu") -> Tensor:
    vals, vecs = subspace_eigen(*subspace_inputs(pos, neg, base), device=device)
    weights = vals[:k].clamp_min(0)  # a wrong-sign (base-heavy) direction contributes nothing
    if float(weights.sum()) == 0:
        raise ValueError("subspace: M_pos - M_base has no positive eigenvalue; positives share nothing the "
                         "baselines lack")
    direction = torch.zeros(vecs.size(0))
    for w, v in zip(weights, vecs[:, :k].T, strict=True):
        direction += w * _signed(v, pos, neg)
    return _unit(direction)


def extract_direction(pos: Tensor, neg: Tensor, method: str, base: Tensor | None = None,
                      device: str = "cpu", k: int = 5, l1_fraction: float = L1_FRACTION) -> Tensor:
    """pos [n,H], neg [m,H] (base [k,H] for subspace) -> unit-norm [H], signed so pos projects above neg."""
    pos, neg = pos.float().cpu(), neg.float().cpu()
    if pos.dim() != 2 or neg.dim() != 2 or pos.size(1) != neg.size(1) or not len(pos) or not len(neg):
        raise ValueError(f"pos/neg must be non-empty [n, hidden] with one hidden size; got {list(pos.shape)}, "
                         f"{list(neg.shape)}")
    if method == "diff_means":
        return diff_means(pos, neg)
    if method == "pca":
        return first_pc_of_pairs(pos, neg, device)
    if method == "logistic":
        return logistic_direction(pos, neg, device=device)
    if method == "logistic_l1":
        return logistic_direction(pos, neg, l1_fraction=l1_fraction, l2=L1_RIDGE, device=device)
    if method == "subspace":
        return subspace_direction(pos, neg, None if base is None else base.float().cpu(), k=k, device=device)
    raise ValueError(f"method: unknown '{method}'; allowed: {', '.join(METHODS)}")


def extract_all(acts: dict[str, tuple[Tensor, Tensor, Tensor | None]], layers: list[int], methods: list[str],
                k: int = 5, device: str = "cpu", top_eigvals: int = 20, l1_fraction: float = L1_FRACTION
                ) -> tuple[dict[str, dict[int, Tensor]], dict[int, dict[str, list[float]]]]:
    """acts[concept] = (pos, neg, base or None), each [n, len(layers), H] -> (vectors[method][layer]
    [n_concepts, H], spectra[layer][concept]: the top eigenvalues of M_pos - M_base, for the quality report)."""
    concepts = list(acts)
    vectors: dict[str, dict[int, Tensor]] = {m: {} for m in methods}
    spectra: dict[int, dict[str, list[float]]] = {}
    for li, layer in enumerate(layers):
        at = {c: tuple(None if t is None else t[:, li].float() for t in acts[c]) for c in concepts}
        for m in methods:
            rows = []
            for c in concepts:
                try:
                    rows.append(extract_direction(at[c][0], at[c][1], m, at[c][2], device=device, k=k,
                                                   l1_fraction=l1_fraction))
                except ValueError as exc:
                    raise ValueError(f"concept '{c}', layer {layer}, method {m}: {exc}") from None
            vectors[m][layer] = torch.stack(rows)
        spectra[layer] = {}
        for c in concepts:
            vals, _ = subspace_eigen(*subspace_inputs(*at[c]), device=device)
            spectra[layer][c] = vals[:top_eigvals].tolist()
    return vectors, spectra


def resolve_arm_layer(arm_layer: int | str, layers: list[int]) -> int:
    """The block the steer arm adds at: the profile's choice, or for "auto" the middle of the read layers."""
    layers = sorted(layers)
    if arm_layer == "auto":
        return layers[len(layers) // 2]
    if arm_layer not in layers:
        raise ValueError(f"steering.arm_layer: {arm_layer} was not read out (layers {layers}); add it to "
                         "steering.layers or use auto")
    return int(arm_layer)


# ---- readout files ------------------------------------------------------------------------------
def save_readout(out_dir: Path, vectors: dict[int, Tensor], meta: dict) -> None:
    """readout.safetensors (`layer.{i}` -> [n_concepts, hidden]) + readout.json (meta, shapes, weights sha256)."""
    out_dir = Path(out_dir)
    missing = [k for k in ("concepts", "method", "pooling", "model", "layer_norms") if k not in meta]
    if missing:
        raise ValueError(f"readout meta: missing {', '.join(missing)}")
    if not vectors:
        raise ValueError("readout: no layers")
    layers = sorted(vectors)
    tensors = {f"layer.{i}": vectors[i].detach().float().cpu().contiguous() for i in layers}
    hidden = tensors[f"layer.{layers[0]}"].shape[-1]
    for name, t in tensors.items():
        if list(t.shape) != [len(meta["concepts"]), hidden]:
            raise ValueError(f"readout {name}: shape {list(t.shape)}, expected [{len(meta['concepts'])}, {hidden}]")
    data = save_safetensors(tensors)
    full = {**meta, "layers": layers, "hidden_size": int(hidden), "dtype": "float32",
            "layer_norms": {str(i): float(meta["layer_norms"][str(i)]) for i in layers},
            "weights_sha256": hashlib.sha256(data).hexdigest()}
    write_atomic(out_dir / READOUT_WEIGHTS, data)
    write_atomic(out_dir / READOUT_META, json.dumps(full, indent=2, sort_keys=True) + "\n")


def load_readout(out_dir: Path) -> tuple[dict[int, Tensor], dict[str, Any]]:
    """The per-layer vectors and readout.json, refused unless hash, keys, shapes and dtype all agree."""
    out_dir = Path(out_dir)
    weights, meta_path = out_dir / READOUT_WEIGHTS, out_dir / READOUT_META
    for path in (weights, meta_path):
        if not path.is_file():
            raise ReadoutError(f"{path}: missing; extract a readout first (tinymars steer)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReadoutError(f"{meta_path}: not valid JSON ({exc})") from None
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ReadoutError(f"{meta_path}: missing {', '.join(missing)}")
    data = weights.read_bytes()
    if meta.get("weights_sha256") != hashlib.sha256(data).hexdigest():
        raise ReadoutError(f"{weights}: sha256 does not match readout.json; the file was changed or is from "
                           "another readout - re-extract it")
    tensors = load_safetensors(data)
    expected = {f"layer.{i}" for i in meta["layers"]}
    if set(tensors) != expected:
        raise ReadoutError(f"{weights}: holds {sorted(tensors)}, readout.json lists {sorted(expected)}")
    shape = [len(meta["concepts"]), meta["hidden_size"]]
    for name, t in tensors.items():
        if list(t.shape) != shape or str(t.dtype).removeprefix("torch.") != meta["dtype"]:
            raise ReadoutError(f"{weights}: {name} is {list(t.shape)} {t.dtype}, readout.json says {shape} "
                               f"{meta['dtype']}")
    return {int(name.split(".")[1]): t for name, t in tensors.items()}, meta
