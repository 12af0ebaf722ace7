"""Steer stage and standalone readout: concept vectors + quality report from a model's activations.

`write_readout` is the one path both use: texts -> token ids -> pooled activations per layer ->
every method's directions -> readout.safetensors / readout.json (the profile's method) + quality.json.
The stage reads the evaluated native model (channels zeroed) on the corpus's register pairs; the
`steering` flow reads any of our model folders or a local Hugging Face model on any pairs.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from corpus.rows import read_rows
from models.distributed import resolve_device
from tasks.common import artifact_of, logger, run_stage
from tinymars.artifacts import write_atomic
from tinymars.profile import Profile, SteeringSection

QUALITY = "quality.json"
KEY_EXCLUDES = {"enabled", "multiplier"}  # multiplier is the eval's (steer arm) business, not the readout's


def write_readout(model: Any, encode: Any, texts: dict[str, tuple[list[str], list[str], list[str]]],
                  settings: SteeringSection, out: Path, model_info: dict[str, Any]) -> dict[str, Any]:
    """Extract every method at every chosen layer; write the readout (settings.method) and quality.json."""
    import torch

    from models.activations import collect_activations, residual_blocks
    from models.steering import extract_all, resolve_arm_layer, save_readout
    from scorers.concept_quality import quality_report

    if not texts:
        raise ValueError("steering: no paired texts (the corpus has no train-split register pairs for "
                         "affect/time/ethics, or the pairs file is empty)")
    n_layer = len(residual_blocks(model))
    layers = list(range(n_layer)) if settings.layers == "all" else sorted(settings.layers)
    if layers[-1] >= n_layer:
        raise ValueError(f"steering.layers: {layers} reaches past the model's {n_layer} blocks (0..{n_layer - 1})")
    arm_layer = resolve_arm_layer(settings.arm_layer, layers)
    device = resolve_device(settings.device)
    acts = {}
    for concept, groups in texts.items():  # an empty baseline group: the negatives are the base set
        acts[concept] = tuple(collect_activations(model, encode(g), layers, settings.pooling, settings.batch_size,
                                                  device) if g else None for g in groups)
    vectors, spectra = extract_all(acts, layers, list(settings.methods), settings.subspace_k, device,
                                   l1_fraction=settings.l1_fraction)
    every = torch.cat([t for groups in acts.values() for t in groups if t is not None])  # [all texts, L, H]
    norms = {str(layer): float(every[:, li].norm(dim=-1).mean()) for li, layer in enumerate(layers)}
    concepts = list(texts)
    save_readout(out, {layer: vectors[settings.method][layer] for layer in layers}, {
        "concepts": concepts, "method": settings.method, "pooling": settings.pooling, "model": model_info,
        "layer_norms": norms, "arm_layer": arm_layer, "pairs": {c: len(t[0]) for c, t in texts.items()}})
    diffs = {layer: {c: (acts[c][0][:, li] - acts[c][1][:, li]).numpy() for c in concepts
                     if len(acts[c][0]) == len(acts[c][1])} for li, layer in enumerate(layers)}
    report = quality_report(concepts, layers, settings.method,
                            {m: {layer: v.numpy() for layer, v in per.items()} for m, per in vectors.items()},
                            diffs, spectra)
    write_atomic(out / QUALITY, json.dumps(report, indent=1, allow_nan=False) + "\n")
    at_arm = report["per_layer"][str(arm_layer)]
    metrics: dict[str, float] = {"pairs": float(sum(len(t[0]) for t in texts.values())),
                                 "redundant": float(len(report["redundant"]))}
    for c in concepts:
        if "alignment" in at_arm[c]:
            metrics[f"{c}_alignment"] = at_arm[c]["alignment"]["mean"]
            metrics[f"{c}_first_pc_ratio"] = at_arm[c]["first_pc_variance_ratio"]
    return metrics


def steer_key_section(profile: Profile) -> dict[str, Any]:
    """The steer stage's key: the steering settings the readout depends on, and which weights it reads."""
    return {**profile.steering.model_dump(mode="json", exclude=KEY_EXCLUDES), "weights": profile.eval.weights}


def steer_applies(profile: Profile) -> bool:
    """The steer stage runs when enabled and the corpus has a concept to read (affect, time or ethics)."""
    from tinymars.domain import CONCEPTS

    return profile.steering.enabled and bool(set(profile.corpus.capabilities) & set(CONCEPTS))


@task(name="steer", cache_policy=NO_CACHE)
def steer_task(profile: Profile, home: str, corpus: dict[str, Any], tokenizer: dict[str, Any],
               trained: dict[str, dict[str, Any]], force: bool = False) -> dict[str, Any]:
    settings = profile.steering
    name = profile.eval_model()
    inputs = {"corpus": artifact_of(corpus), "tokenizer": artifact_of(tokenizer),
              f"model:{name}": artifact_of(trained[name])}

    def build(out: Path) -> dict[str, Any]:
        from corpus.concepts import corpus_concepts
        from corpus.tokenizer import Tokenizer
        from models.activations import load_reader, native_token_ids
        from models.checkpoint import weights_folder

        rows = read_rows(inputs["corpus"].file("corpus.jsonl"))
        tok = Tokenizer(inputs["tokenizer"].file("tokenizer.model"))
        folder, which = weights_folder(inputs[f"model:{name}"].path, profile.eval.weights)
        model, info = load_reader(folder, resolve_device(settings.device))
        texts = corpus_concepts(rows, settings.max_pairs)
        logger().info(f"[steer] {name} ({which} weights): "
                      f"{', '.join(f'{c} {len(t[0])} pairs' for c, t in texts.items())}")
        encode = partial(native_token_ids, tok, seq_len=info["max_seq_len"])
        metrics = write_readout(model, encode, texts, settings, out,
                                {"name": name, "arch": info["arch"], "weights_sha256": info["weights_sha256"]})
        return {"rows": sum(len(t[0]) for t in texts.values()), "meta": {"metrics": metrics}}

    return run_stage("steer", home, steer_key_section(profile), inputs, build, force)


@task(name="steering-readout", cache_policy=NO_CACHE)
def readout_task(model_path: str, pairs_path: str, out_dir: str, settings: SteeringSection,
                 tokenizer_path: str | None = None) -> dict[str, Any]:
    """The standalone readout: any model folder, pairs from a JSONL file or a corpus artifact, into out_dir."""
    from corpus.concepts import corpus_concepts, read_paired_jsonl
    from models.activations import hf_token_ids, load_reader, native_token_ids

    corpus_file = corpus_rows_file(Path(pairs_path))
    if corpus_file is not None:
        texts = corpus_concepts(read_rows(corpus_file), settings.max_pairs)
    else:
        texts = read_paired_jsonl(Path(pairs_path), settings.max_pairs)
    model, info = load_reader(model_path, resolve_device(settings.device))
    if info["kind"] == "tinymars":
        from corpus.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_path or tokenizer_of_model(Path(model_path)))
        encode = partial(native_token_ids, tok, seq_len=info["max_seq_len"])
        described = {"name": Path(model_path).name, "arch": info["arch"], "weights_sha256": info["weights_sha256"]}
    else:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(tokenizer_path or model_path, local_files_only=True)
        encode = partial(hf_token_ids, hf_tok, max_len=info.get("max_seq_len"))
        described = {"name": Path(model_path).name, "arch": "hf", "config_sha256": info["config_sha256"]}
    out = Path(out_dir)
    metrics = write_readout(model, encode, texts, settings, out, described)
    logger().info(f"[steering] readout + {QUALITY} written to {out}")
    return {"out_dir": str(out), "concepts": list(texts), "metrics": metrics}


def corpus_rows_file(pairs: Path) -> Path | None:
    """The corpus.jsonl behind `pairs` (a corpus artifact folder or its file), or None for a pairs JSONL."""
    if pairs.is_dir():
        return pairs / "corpus.jsonl"
    with open(pairs, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return None  # read_paired_jsonl reports it with the line number
    return pairs if isinstance(row, dict) and "capability" in row and "concept" not in row else None


def tokenizer_of_model(model_dir: Path) -> Path:
    """The tokenizer a model in our artifact store was trained with: model -> its pack -> its tokenizer.

    Follows the manifests' input content hashes, so it finds the exact tokenizer, not merely a recent one.
    """
    root = model_dir.resolve().parents[1]  # HOME/artifacts/train/<key> -> HOME/artifacts
    manifests = {stage: [json.loads(p.read_text()) for p in sorted((root / stage).glob("*/manifest.json"))]
                 for stage in ("pack", "tokenizer")}
    try:
        want = json.loads((model_dir / "manifest.json").read_text())["inputs"]["pack"]
        pack = next(m for m in manifests["pack"] if m["content_hash"] == want)
        tok = next(m for m in manifests["tokenizer"] if m["content_hash"] == pack["inputs"]["tokenizer"])
    except (OSError, KeyError, StopIteration, json.JSONDecodeError):
        raise ValueError(f"tokenizer: cannot trace {model_dir} to its tokenizer through the artifact store "
                         f"({root}); pass --tokenizer PATH/tokenizer.model") from None
    return root / "tokenizer" / tok["key"] / "tokenizer.model"
