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
    "conflict_pair": REGISTER_CAPABILITIES,  # both conflict rows of a prompt follow the channel (vs an arm only)
}
Metric = Literal["dominant", "directional", "gap", "vader_gap", "conflict", "conflict_pair"]
assert get_args(Metric) == tuple(METRIC_CAPABILITIES)

# ---- eval arms beyond the profile's: follow-up turns add MARS's turn 0 answered with the channel cut --------
CUT_ARM = "mars_cut"  # turn >= 1 only: MARS's own conversation, channels zeroed (the persistence contrast)

# ---- verdicts: what "chance" means and the smallest effect a pre-registered test is meant to detect ------
# (docs/methods.md, "Minimal effects"). Every effect is measured as its excess over the null value on its
# test's own scale, so one number per hypothesis says what "an effect worth finding" is, fixed before the run:
# - share: of the units where two values differ (decided prompts), the share favouring the claim; null 1/2.
# - rate: a rate against its chance value (dominant 1/3, conflict 1/2).
# - dz: a standardised mean (mean / sd of the per-prompt values or differences); null 0.
CHANCE = {"dominant": 1.0 / 3.0, "conflict": 0.5}
# conflict_pair has no valid chance level: a model that ignores the channel but defies the prompt's text with a
# probability g that varies by prompt makes both rows "follow the channel" with probability E[g^2] >= 1/4
# (bench/calibration.py measured a 9% false-positive rate at alpha 0.01 against 1/4). It is tested against an arm.
CHANCE_UNDEFINED = ("conflict_pair",)
EffectScale = Literal["share", "rate", "dz"]
MIN_EFFECT_DEFAULT: dict[str, float] = {"share": 0.15, "rate": 0.15, "dz": 0.5}


def effect_scale(metric: str, beats: str) -> EffectScale:
    """The scale a hypothesis's effect (and its minimal effect) is measured on; `beats` is an arm or 'chance'."""
    if metric in ("gap", "vader_gap"):
        return "dz"
    if beats != "chance" or metric == "directional":
        return "share"
    return "rate"


def min_effect_bound(metric: str, beats: str) -> float:
    """The largest minimal effect that can exist on that scale (exclusive): shares and rates end at 1."""
    scale = effect_scale(metric, beats)
    if scale == "dz":
        return 5.0
    return 0.5 if scale == "share" else 1.0 - CHANCE[metric]

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


def crosstalk_arm(channel: str, state: str) -> str:
    """The arm label of a crosstalk generation: `channel` held at its state 'a' or 'b' (models/scorers.crosstalk)."""
    return f"x:{channel}:{state}"
