"""Residual-stream activations at chosen layers, pooled per text: the raw material of steering vectors.

Works on our registry models (native ChannelDecoder with every channel zeroed, i.e. the text-only
path; baseline) and on any local Hugging Face causal LM. Layer i is the residual stream after block
i. Texts are right-padded: both model kinds are causal, so padding after a text never changes its
positions, and pooling reads only real tokens ("last": the last real token; "mean": the mean over
real tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from corpus.concepts import split_text
from models.adapter import _decoder_blocks, _text_config

POOLINGS = ("last", "mean")


class _Enough(Exception):
    """Raised from a hook once the deepest requested layer is read: the rest of the forward is waste."""


def is_native(model: nn.Module) -> bool:
    """Our own decoders (registry models) take (idx, channels); a HF model takes input_ids/attention_mask."""
    return hasattr(model, "encode_channels") and hasattr(model, "blocks")


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """Our ChannelDecoder/baseline blocks, or a HF causal LM's decoder layers, in depth order."""
    if is_native(model):
        return list(model.blocks)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__}: neither one of our decoders nor a Hugging Face model")
    return list(_decoder_blocks(model, _text_config(config).num_hidden_layers))


def check_layers(layers: list[int], n_layer: int) -> list[int]:
    bad = [i for i in layers if not 0 <= i < n_layer]
    if not layers or bad:
        raise ValueError(f"layers: {bad or 'empty'} not in 0..{n_layer - 1} (the model has {n_layer} blocks)")
    return list(layers)


def _pad(token_ids: list[list[int]], device: str) -> tuple[Tensor, Tensor]:
    width = max(len(ids) for ids in token_ids)
    idx = torch.zeros(len(token_ids), width, dtype=torch.long)
    valid = torch.zeros(len(token_ids), width, dtype=torch.bool)
    for r, ids in enumerate(token_ids):
        idx[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        valid[r, : len(ids)] = True
    return idx.to(device), valid.to(device)


def pool(hidden: Tensor, valid: Tensor, pooling: str) -> Tensor:
    """hidden [B,T,H], valid [B,T] -> [B,H] float32 over real tokens only."""
    hidden = hidden.float()
    if pooling == "last":
        last = valid.long().sum(1) - 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    if pooling == "mean":
        w = valid.to(hidden.dtype)[..., None]
        return (hidden * w).sum(1) / w.sum(1)
    raise ValueError(f"pooling: unknown '{pooling}'; allowed: {', '.join(POOLINGS)}")


@torch.no_grad()
def collect_activations(model: nn.Module, token_ids: list[list[int]], layers: list[int], pooling: str = "last",
                        batch_size: int = 16, device: str = "cpu") -> Tensor:
    """[n_texts, len(layers), hidden] float32 on the CPU; channels zeroed for our native model."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: unknown '{pooling}'; allowed: {', '.join(POOLINGS)}")
    if not token_ids or any(len(ids) == 0 for ids in token_ids):
        raise ValueError("token_ids: needs at least one text, and every text at least one token")
    blocks = residual_blocks(model)
    layers = check_layers(layers, len(blocks))
    model.eval()
    caught: dict[int, Tensor] = {}
    deepest = max(layers)

    def hook_for(i: int):
        def grab(module: nn.Module, args: object, output: object) -> None:
            caught[i] = output[0] if isinstance(output, tuple) else output
            if i == deepest:
                raise _Enough

        return grab

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in sorted(set(layers))]
    order = sorted(range(len(token_ids)), key=lambda r: len(token_ids[r]))  # similar lengths: little padding
    out = []
    try:
        for start in range(0, len(order), batch_size):
            idx, valid = _pad([token_ids[r] for r in order[start: start + batch_size]], device)
            caught.clear()
            try:
                if is_native(model):
                    model(idx)  # channels=None: the encoder sees zeros (the ablated, text-only path)
                else:
                    model(input_ids=idx, attention_mask=valid.long(), use_cache=False)
            except _Enough:
                pass
            out.append(torch.stack([pool(caught[i], valid, pooling) for i in layers], dim=1).cpu())
    finally:
        for h in handles:
            h.remove()
    pooled = torch.empty(len(order), len(layers), out[0].size(-1))
    pooled[torch.tensor(order)] = torch.cat(out)
    return pooled


# ---- texts and models ---------------------------------------------------------------------------
def native_token_ids(tok: Any, texts: list[str], seq_len: int) -> list[list[int]]:
    """Our tokenizer in the training layout: `[bos] prompt <target> target` (a baseline stops at <target>)."""
    out = []
    for text in texts:
        prompt, target = split_text(text)
        out.append((tok.prompt_ids(prompt) + (tok.encode(target) if target is not None else []))[:seq_len])
    return out


def hf_token_ids(hf_tok: Any, texts: list[str], max_len: int | None) -> list[list[int]]:
    """A Hugging Face tokenizer on the plain text (its own special tokens), cut to the model's context."""
    return [list(hf_tok(text)["input_ids"])[:max_len] for text in texts]


def load_reader(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """One of our trained model folders (model.json) or a local HF causal LM folder (config.json), frozen.

    The description names the model by content (weights / config sha256), never by absolute path.
    """
    folder = Path(path).expanduser()
    if (folder / "model.json").is_file():
        from models.checkpoint import load_model

        model = load_model(folder, device)
        meta = json.loads((folder / "model.json").read_text())
        info = {"kind": "tinymars", "arch": meta["build"]["arch"], "weights_sha256": meta.get("weights_sha256"),
                "n_layer": len(model.blocks), "width": model.cfg.d_model, "max_seq_len": model.cfg.seq_len}
    elif (folder / "config.json").is_file():
        from models.adapter import load_base

        model, info = load_base(folder)
        info = {**info, "kind": "hf"}
        model = model.to(device)
    else:
        raise ValueError(f"model: {folder} is neither one of our trained model folders (model.json) nor a local "
                         "Hugging Face model folder (config.json); point --model at one of them")
    model.requires_grad_(False)
    return model.eval(), info
