"""The domain vocabulary every layer shares: capabilities, channels, concepts, reserved token ids, arch spec keys.

One place for each name, so the profile schema, the corpus generators, the scorers and the
models cannot drift apart (they all import from here; nothing here imports them). Behaviour that
uses these names lives with its layer: encoding in `corpus.encode`, scoring in `scorers`, building
in `models.architectures`.
"""

from __future__ import annotations

from typing import Literal, get_args

# ---- capabilities (one per channel) --------------------------------------------------------------
CAPABILITIES = ("memory", "identity", "continuity", "affect", "time", "ethics")
Capability = Literal["memory", "identity", "continuity", "affect", "time", "ethics"]
assert get_args(Capability) == CAPABILITIES  # pydantic needs the Literal spelt out; it must match

# selection: three candidate items in the prompt, the channel marks one salient;
# register: a neutral prompt, the channel sets a pole (+/-) and the target's register follows it
SELECTION_CAPABILITIES = ("memory", "identity", "continuity")
REGISTER_CAPABILITIES = ("affect", "time", "ethics")
assert SELECTION_CAPABILITIES + REGISTER_CAPABILITIES == CAPABILITIES

# ---- metrics: the capabilities each objective metric is defined for ---------------------------------
# (the profile's pre-registered hypotheses and scorers.outcomes.applies both read this)
METRIC_CAPABILITIES = {
    "dominant": SELECTION_CAPABILITIES,  # the salient item is the uniquely most-referenced one
    "directional": REGISTER_CAPABILITIES,  # the + response out-scores the - response on the lexicon
    "gap": REGISTER_CAPABILITIES,
    "vader_gap": ("affect",),  # VADER measures affect only
    "conflict": REGISTER_CAPABILITIES,  # the response follows the channel, not the contradicting text
}
Metric = Literal["dominant", "directional", "gap", "vader_gap", "conflict"]
assert get_args(Metric) == tuple(METRIC_CAPABILITIES)

# ---- channels (a capability's state as the model reads it) -----------------------------------------
TEXT_CHANNELS = SELECTION_CAPABILITIES  # their state is a text, sentence-embedded by the channels stage
ETHICS_CATEGORIES = (
    "physical_safety", "medical", "mental_health", "medication", "nutrition", "fitness",
    "driving", "outdoor_adventure", "home_repair", "electrical", "fire", "food_safety",
    "finance", "investing", "gambling", "legal", "privacy", "cybersecurity",
    "workplace", "academic_integrity", "childcare", "pets", "travel", "alcohol",
)  # fmt: skip
NUMERIC_DIMS = {"affect": 2, "time": 16, "ethics": 24}  # default vector width of each numeric channel
MIN_DIMS = {"affect": 2, "time": 8, "ethics": len(ETHICS_CATEGORIES)}  # the smallest width each encodes into

# ---- concepts (steering) ---------------------------------------------------------------------------
CONCEPTS = REGISTER_CAPABILITIES  # the state capabilities with a signed pole: what a steering vector carries

# ---- tokenizer --------------------------------------------------------------------------------------
RESERVED_PIECES = 256 + 5  # byte-fallback pieces + pad, unk, bos, eos, <target>: a vocabulary must be larger

# ---- model spec keys (the profile validates them, models.architectures builds with them) ----------
DECODER_REQUIRED = ("n_layer", "n_head", "d_model")
VOCAB_ARCH_KEYS = {"vocab_graph": ("rank", "hops", "softcap"),
                   "vocab_conv": ("hops", "kernel", "fourier_basis", "op_width", "softcap")}
VOCAB_SPEC_KEYS = ("rank", "hops", "kernel", "fourier_basis", "op_width", "softcap")
assert set(VOCAB_SPEC_KEYS) == {k for keys in VOCAB_ARCH_KEYS.values() for k in keys}

# ---- orchestration names shared by tasks (which acquire) and deploy (which creates) ----------------
TEACHER_LIMIT = "tinymars-teacher"  # Prefect global concurrency limit on teacher requests across runs
