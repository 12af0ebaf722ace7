"""Steering extraction: planted-direction recovery, readout files, activations from our model and HF models, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus.concepts import concept_coefficient, concept_pairs, read_paired_jsonl
from models.activations import collect_activations, residual_blocks
from models.steering import (
    L1_FRACTION,
    L1_RIDGE,
    L2_STRENGTH,
    METHODS,
    SOLVER_MAX_ITER,
    ReadoutError,
    SolverWarning,
    extract_direction,
    load_readout,
    logistic_fit,
    save_readout,
)
from tinymars.domain import CONCEPTS


# ---- planted direction ---------------------------------------------------------------------------
def planted(seed: int, hidden: int = 48, n: int = 80, signal: float = 1.0, noise: float = 0.3):
    """Positives/negatives at +/- signal along a hidden unit direction u, around a shared offset; baselines
    at the offset alone (the neutral scenario); isotropic noise everywhere."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(hidden, generator=g)
    u /= u.norm()
    offset = 2.0 * torch.randn(hidden, generator=g)

    def draw(shift: torch.Tensor) -> torch.Tensor:
        return offset + shift + noise * torch.randn(n, hidden, generator=g)

    return u, draw(signal * u), draw(-signal * u), draw(torch.zeros(hidden))


# logistic_l1 is a sparse denoiser: on a direction spread over every coordinate it keeps a subset of them
DENSE_FLOOR = {"logistic_l1": 0.7}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_method_recovers_a_planted_direction(method: str, seed: int) -> None:
    u, pos, neg, base = planted(seed)
    v = extract_direction(pos, neg, method, base=base)
    assert abs(float(v.norm()) - 1.0) < 1e-5
    assert float(v @ u) > DENSE_FLOOR.get(method, 0.9)  # signed: not merely the axis


def sparse_planted(seed: int, relevant: int = 4, hidden: int = 32, n: int = 80, noise: float = 0.5):
    """A direction on the first `relevant` coordinates only (each |u_j| within a factor 2 of the others); the
    remaining coordinates carry noise and a shared offset, nothing about the label."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(hidden)
    u[:relevant] = (0.5 + 0.5 * torch.rand(relevant, generator=g)) * torch.randn(relevant, generator=g).sign()
    u /= u.norm()
    offset = 2.0 * torch.randn(hidden, generator=g)
    return u, *(offset + s * u + noise * torch.randn(n, hidden, generator=g) for s in (1.0, -1.0))


def standardised(pos: torch.Tensor, neg: torch.Tensor):
    """The design the docstring states, rebuilt here: centred, one global scale (mean row norm sqrt(H))."""
    x = torch.cat([pos, neg]).double()
    x = x - x.mean(0)
    x = x * x.size(1) ** 0.5 / x.norm(dim=1).mean()
    return x.numpy(), np.r_[np.ones(len(pos)), np.zeros(len(neg))]


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("seed", [0, 1])
def test_logistic_reaches_the_optimum_of_its_objective(seed: int) -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    u, pos, neg, _ = planted(seed)
    x, y = standardised(pos, neg)
    # mean log-loss + l2/2 |w|^2 (intercept free) is sklearn's C sum log-loss + 1/2 |w|^2 with C = 1 / (l2 n)
    ref = sklearn.LogisticRegression(C=1 / (L2_STRENGTH * len(x)), tol=1e-12, max_iter=100_000).fit(x, y)
    fit = logistic_fit(pos, neg)
    assert fit.converged and fit.iterations < SOLVER_MAX_ITER
    assert _cos(fit.weight, ref.coef_[0]) >= 0.9999
    assert fit.bias == pytest.approx(float(ref.intercept_[0]), abs=1e-4)
    assert _cos(extract_direction(pos, neg, "logistic"), ref.coef_[0]) >= 0.9999


def _elastic_net_reference(x: np.ndarray, y: np.ndarray, l1: float, l2: float) -> np.ndarray:
    """The same objective solved independently (scipy, float64): w = a - b with a, b >= 0 makes the L1 term
    smooth and linear; L-BFGS-B to a tight tolerance."""
    from scipy.optimize import minimize
    from scipy.special import expit

    n, h = x.shape

    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        w, c = z[:h] - z[h : 2 * h], z[-1]
        t = x @ w + c
        loss = np.mean(np.logaddexp(0, t) - y * t) + l2 / 2 * w @ w + l1 * z[: 2 * h].sum()
        r = (expit(t) - y) / n
        gw = x.T @ r + l2 * w
        return loss, np.r_[gw + l1, -gw + l1, r.sum()]

    bounds = [(0, None)] * (2 * h) + [(None, None)]
    z = minimize(objective, np.zeros(2 * h + 1), jac=True, method="L-BFGS-B", bounds=bounds,
                 options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 50_000}).x
    return z[:h] - z[h : 2 * h]


def test_logistic_l1_reaches_the_optimum_of_its_objective() -> None:
    u, pos, neg = sparse_planted(0, noise=1.0)
    x, y = standardised(pos, neg)
    fit = logistic_fit(pos, neg, L1_FRACTION, l2=L1_RIDGE)
    lambda_max = np.abs(x.T @ (y - y.mean())).max() / len(x)  # the smallest strength that zeroes every weight
    assert fit.lambda_max == pytest.approx(lambda_max, rel=1e-9) and fit.l1 == pytest.approx(L1_FRACTION * lambda_max)
    ref = _elastic_net_reference(x, y, fit.l1, L1_RIDGE)
    assert fit.converged and _cos(fit.weight, ref) >= 0.9999
    assert set(np.flatnonzero(fit.weight.numpy())) == set(np.flatnonzero(np.abs(ref) > 1e-6))


@pytest.mark.parametrize(("seed", "relevant", "noise"), [(0, 4, 0.5), (1, 4, 1.0), (2, 3, 1.0), (3, 6, 1.0)])
def test_logistic_l1_zeroes_the_irrelevant_dimensions_and_keeps_the_planted_ones(seed: int, relevant: int,
                                                                                  noise: float) -> None:
    u, pos, neg = sparse_planted(seed, relevant, noise=noise)
    v = extract_direction(pos, neg, "logistic_l1")
    irrelevant = 32 - relevant
    assert int((v[relevant:] == 0).sum()) >= 2 * irrelevant / 3
    assert bool((v[:relevant] != 0).all()) and bool((v[:relevant].sign() == u[:relevant].sign()).all())
    assert float(v @ u) > 0.9
    assert int((extract_direction(pos, neg, "logistic") == 0).sum()) == 0  # the L1 term does the zeroing


def test_the_iteration_guard_is_reported_and_bad_strengths_refused() -> None:
    u, pos, neg, _ = planted(0)
    with pytest.warns(SolverWarning, match="not converged after 5 iterations"):
        fit = logistic_fit(pos, neg, max_iter=5)
    assert not fit.converged and fit.iterations == 5
    with pytest.raises(ValueError, match="l1_fraction"):
        logistic_fit(pos, neg, l1_fraction=1.0)
    with pytest.raises(ValueError, match="indistinguishable"):
        logistic_fit(pos, pos)


def test_profile_l1_fraction_is_validated_and_reaches_the_extraction() -> None:
    from pydantic import ValidationError

    from models.steering import extract_all
    from tinymars.profile import SteeringSection

    assert SteeringSection().l1_fraction == L1_FRACTION
    with pytest.raises(ValidationError, match="l1_fraction"):
        SteeringSection(l1_fraction=1.5)
    u, pos, neg = sparse_planted(1, noise=1.0)
    acts = {"c": (pos[:, None], neg[:, None], None)}
    sparse = extract_all(acts, [0], ["logistic_l1"], l1_fraction=0.6)[0]["logistic_l1"][0][0]
    default = extract_all(acts, [0], ["logistic_l1"])[0]["logistic_l1"][0][0]
    assert int((sparse != 0).sum()) < int((default != 0).sum())


def test_token_level_subspaces_find_the_direction_every_positive_text_carries() -> None:
    from models.steering import subspace_eigen

    g = torch.Generator().manual_seed(3)
    u = torch.randn(32, generator=g)
    u /= u.norm()

    def text(with_concept: bool) -> torch.Tensor:  # 6 tokens spanning 3 nuisance directions (+ u)
        basis = torch.randn(3, 32, generator=g)
        if with_concept:
            basis = torch.cat([basis, u[None]])
        return torch.randn(6, len(basis), generator=g) @ basis

    vals, vecs = subspace_eigen([text(True) for _ in range(12)], [text(False) for _ in range(12)])
    assert abs(float(vecs[:, 0] @ u)) > 0.9
    assert vals[0] > 2 * vals[1]  # one shared direction: a clear gap in the spectrum


def test_swapping_poles_flips_the_sign_and_bad_input_is_refused() -> None:
    u, pos, neg, base = planted(2)
    for method in METHODS:
        swapped = extract_direction(neg, pos, method, base=base)
        assert float(swapped @ u) < -DENSE_FLOOR.get(method, 0.9)
        if method.startswith("logistic"):  # relabelling negates the optimum exactly
            torch.testing.assert_close(swapped, -extract_direction(pos, neg, method), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="method"):
        extract_direction(pos, neg, "mean")
    with pytest.raises(ValueError, match="paired"):
        extract_direction(pos, neg[:-1], "pca")


# ---- readout files ---------------------------------------------------------------------------------
def _readout(tmp_path: Path) -> tuple[Path, dict[int, torch.Tensor]]:
    vectors = {0: torch.randn(3, 16), 2: torch.randn(3, 16)}
    meta = {"concepts": list(CONCEPTS), "method": "pca", "pooling": "last", "model": {"name": "m"},
            "layer_norms": {"0": 1.5, "2": 3.0}}
    save_readout(tmp_path, vectors, meta)
    return tmp_path, vectors


def test_readout_roundtrip(tmp_path: Path) -> None:
    folder, vectors = _readout(tmp_path)
    loaded, meta = load_readout(folder)
    assert sorted(loaded) == [0, 2] and meta["layers"] == [0, 2]
    assert meta["hidden_size"] == 16 and meta["dtype"] == "float32" and meta["concepts"] == list(CONCEPTS)
    for i, v in vectors.items():
        assert loaded[i].shape == (3, 16)
        assert torch.equal(loaded[i], v)


def test_tampered_or_mismatched_readout_is_refused(tmp_path: Path) -> None:
    folder, _ = _readout(tmp_path / "a")
    weights = folder / "readout.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ReadoutError, match="sha256"):
        load_readout(folder)

    other, _ = _readout(tmp_path / "b")  # consistent hash, but readout.json claims two concepts
    meta = json.loads((other / "readout.json").read_text())
    meta["concepts"] = ["affect", "time"]
    (other / "readout.json").write_text(json.dumps(meta))
    with pytest.raises(ReadoutError, match=r"\[2, 16\]"):
        load_readout(other)
    (other / "readout.json").unlink()
    with pytest.raises(ReadoutError, match="missing"):
        load_readout(other)


# ---- activations -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def native():
    from models.architectures import build

    model = build({"arch": "native", "n_layer": 3, "n_head": 2, "d_model": 16}, vocab_size=40, seq_len=32,
                  channel_names=["affect", "time"], channel_dim=4, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the init zeroes residual outputs and gates; make every block and channel matter
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


TEXTS = [[1, 5, 9], [2, 7, 11, 13, 17, 19, 23], [3]]


def test_native_activations_match_a_manual_forward_with_zeroed_channels(native) -> None:
    acts = collect_activations(native, TEXTS, [0, 2], pooling="last", batch_size=2)
    assert acts.shape == (3, 2, 16) and acts.dtype == torch.float32
    idx = torch.tensor([TEXTS[1]])
    cos, sin = native._rope(torch.arange(idx.size(1)))
    tokens = native.encode_channels(torch.zeros(1, 2, 4), 1)
    x = native.wte(idx)
    states = []
    for block in native.blocks:
        x = block(x, cos, sin, tokens)
        states.append(x)
    torch.testing.assert_close(acts[1, 0], states[0][0, -1])
    torch.testing.assert_close(acts[1, 1], states[2][0, -1])
    mean = collect_activations(native, [TEXTS[1]], [2], pooling="mean")
    torch.testing.assert_close(mean[0, 0], states[2][0].mean(0))


def _padding_ignored(model) -> None:
    batched = collect_activations(model, TEXTS, [0, 1], pooling="mean", batch_size=3)
    for i, ids in enumerate(TEXTS):
        alone = collect_activations(model, [ids], [0, 1], pooling="mean")
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)
    # a padded position, if it were read, would change the mean: pad tokens are not zero vectors
    assert not torch.allclose(batched[0], batched[2])


def test_mean_pooling_ignores_padding_native(native) -> None:
    _padding_ignored(native)


def _tiny_hf(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=3, n_head=2)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=32)).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_activations_shapes_and_hidden_states(kind: str) -> None:
    model = _tiny_hf(kind)
    assert len(residual_blocks(model)) == 3
    acts = collect_activations(model, TEXTS, [0, 1], pooling="last", batch_size=2)
    assert acts.shape == (3, 2, 16)
    with torch.no_grad():  # hidden_states[i + 1] is block i's output (the last one is after the final norm)
        hs = model(input_ids=torch.tensor([TEXTS[1]]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts[1, 0], hs[1][0, -1])
    torch.testing.assert_close(acts[1, 1], hs[2][0, -1])
    _padding_ignored(model)


def test_bad_layers_and_pooling_are_refused(native) -> None:
    with pytest.raises(ValueError, match="layers"):
        collect_activations(native, TEXTS, [3])
    with pytest.raises(ValueError, match="pooling"):
        collect_activations(native, TEXTS, [0], pooling="max")


# ---- concepts --------------------------------------------------------------------------------------
def _row(cap: str, pid: str, pole: str, split: str = "train", kind: str = "register") -> dict:
    return {"capability": cap, "prompt_id": pid, "pole": pole, "split": split, "kind": kind,
            "prompt": f"P {pid}", "target": f"T {pid} {pole}"}


def test_concept_pairs_and_coefficients(tmp_path: Path) -> None:
    rows = [_row("affect", "a2", "-"), _row("affect", "a2", "+"), _row("affect", "a1", "+"), _row("affect", "a1", "-"),
            _row("affect", "a3", "+"), _row("affect", "h1", "+", split="heldout"),
            _row("affect", "h1", "-", split="heldout"), _row("time", "t1", "+")]
    pos, neg, base = concept_pairs(rows, "affect")
    assert pos == ["P a1\nT a1 +", "P a2\nT a2 +"] and neg == ["P a1\nT a1 -", "P a2\nT a2 -"]
    assert base == ["P a1", "P a2"]
    assert concept_pairs(rows, "affect", limit=1)[0] == ["P a1\nT a1 +"]
    assert concept_coefficient("affect", {"affect": {"valence": -0.7, "saliency": 0.5}}) == -0.7
    assert concept_coefficient("ethics", {"caution": 1.4, "category": "x"}) == 1.0
    assert concept_coefficient("time", {"time": {"hour": 8, "weekday": 1}}) == 1.0
    assert concept_coefficient("time", {"time": {"hour": 23, "weekday": 1}}) == -1.0
    assert concept_coefficient("time", {"affect": {"valence": 1.0}}) == 0.0
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"concept": "joy", "positive": "a", "negative": "b"}\n\n{"concept": "joy", "positive": "c"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: .*negative"):
        read_paired_jsonl(path)


# ---- CLI -------------------------------------------------------------------------------------------
def test_cli_help_and_a_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["steer", "--help"])
    assert exit_info.value.code == 0
    assert "--pairs" in capsys.readouterr().out
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    missing = tmp_path / "nope.jsonl"
    code = main(["steer", "--model", str(model), "--pairs", str(missing), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--pairs" in err and str(missing) in err
    code = main(["steer", "--model", str(model), "--pairs", str(missing), "--out", str(tmp_path / "o"),
                 "--pooling", "max"])
    assert code == 2 and "--pooling" in capsys.readouterr().err


# ---- the standalone readout, end to end ---------------------------------------------------------------
def test_readout_task_writes_readout_and_quality(tmp_path: Path) -> None:
    """The `steering` flow's one task, run as a plain function (no Prefect API: the harness costs more than
    this whole file); the flow itself only validates the settings dict and calls it."""
    from corpus.tokenizer import train_tokenizer
    from models.architectures import build
    from models.checkpoint import save_model
    from tasks.steering import readout_task
    from tinymars.profile import SteeringSection

    words = ["warm", "cold", "sunny", "grim", "kind", "harsh", "morning", "night", "the", "day", "was"]
    lines = [{"concept": c, "positive": f"the day was {p} {i}", "negative": f"the day was {n} {i}",
              "baseline": f"the day {i}"} for i in range(6) for c, p, n in
             (("warmth", "warm sunny", "cold grim"), ("kindness", "kind", "harsh"))]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "tok").mkdir()
    tok = train_tokenizer([" ".join(words)] * 20 + [r["positive"] for r in lines], tmp_path / "tok", 300)
    model = build({"arch": "native", "n_layer": 3, "n_head": 2, "d_model": 16}, vocab_size=300, seq_len=32,
                  channel_names=["affect"], channel_dim=4, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fresh init leaves every block an identity; give the blocks something to do
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    save_model(model, tmp_path / "model")
    out = readout_task.fn(str(tmp_path / "model"), str(pairs), str(tmp_path / "out"),
                          SteeringSection(layers=[0, 2], method="pca"), str(tok))
    assert out["concepts"] == ["warmth", "kindness"]
    vectors, meta = load_readout(tmp_path / "out")
    assert meta["method"] == "pca" and meta["arm_layer"] == 2 and sorted(vectors) == [0, 2]
    assert vectors[2].shape == (2, 16)
    quality = json.loads((tmp_path / "out" / "quality.json").read_text())
    entry = quality["per_layer"]["2"]["warmth"]
    assert len(entry["alignment"]["cosines"]) == 6 and entry["method_agreement"]["pca"] == pytest.approx(1.0)
    assert len(entry["subspace_eigvals"]) == 16
