"""Generate eval responses for each arm on the same held-out rows.

Arms (the prompt rows are identical across arms; only what carries the state changes):
- `mars`: the real channel state, the plain prompt.
- `ablated`: channels zeroed, the plain prompt (the text-only path of the same model).
- `text`: channels zeroed, the same state written into the prompt
  (`corpus.encode.state_as_prompt_text`): does the channel do what a few prompt tokens do?
- `steer`: channels zeroed, the plain prompt, the state added to the residual stream by activation
  addition (models.steer_hook): does the channel do what a steering vector does? Only rows of the
  directional concepts (affect / time / ethics) are generated: a selection state has no direction.

Follow-up turns (persistence): turn k's prompt is turn k-1's prompt, its response and a fixed
follow-up line, with the arm's channel still set; the scorer asks whether the effect survives.
Only MARS and ABLATED get follow-up turns; TEXT would pay the longest prompts for a question the
channel-vs-text table already answers at turn 0. From turn 1 on a third follow-up arm, `mars_cut`
(tinymars.domain.CUT_ARM), continues MARS's own conversation (its turn-0 answer in the prompt) with the
channel zeroed: MARS vs MARS_CUT at turn 1 see the same text, so their difference is the state the
channel carries, not what copying the conversation carries.

Plain torch, no Prefect: a notebook can call `generate_arms` on any trained model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from corpus.encode import state_as_prompt_text
from models.distributed import Runtime
from models.generate import GREEDY, Sampling, generate
from models.steer_hook import SteerArm
from tinymars.domain import CUT_ARM
from tinymars.progress import ProgressCallback

ARMS = ("mars", "ablated", "text", "steer")
FOLLOWUP_ARMS = ("mars", "ablated")


def select_eval_rows(rows: list[dict[str, Any]], max_prompts_per_capability: int | None) -> list[int]:
    """Indices of held-out rows (conflict rows included), at most N prompts per capability and kind."""
    chosen: list[int] = []
    prompts: dict[tuple[str, str], list[str]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row["split"] != "heldout":
            continue
        group = prompts[(row["capability"], row["kind"])]
        if row["prompt_id"] not in group:
            if max_prompts_per_capability is not None and len(group) >= max_prompts_per_capability:
                continue
            group.append(row["prompt_id"])
        chosen.append(i)
    return chosen


def channel_tensor(mats: dict[str, np.ndarray], names: list[str], dim: int, index: list[int]) -> torch.Tensor:
    """Stack the named channel matrices for the chosen rows into `[N, C, D]` (zero padded)."""
    out = torch.zeros(len(index), len(names), dim)
    for c, name in enumerate(names):
        m = torch.from_numpy(mats[name][index])
        out[:, c, : m.shape[1]] = m
    return out


def arm_prompt(row: dict[str, Any], arm: str) -> str:
    """The prompt text an arm sends: the row's prompt, preceded by the written state for `text` (`steer`: plain)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; allowed: {', '.join(ARMS)}")
    if arm != "text":
        return row["prompt"]
    states = [state_as_prompt_text(cap, state) for cap, state in sorted(row["channel_state"].items())]
    return " ".join([*states, row["prompt"]])


def followup_prompt(prompt: str, response: str, followup: str) -> str:
    """The next turn's prompt: the conversation so far, then the follow-up line."""
    return " ".join(part for part in (prompt, response.strip(), followup) if part)


@torch.no_grad()
def generate_arms(
    model: torch.nn.Module,
    tok: Any,
    rows: list[dict[str, Any]],
    mats: dict[str, np.ndarray],
    names: list[str],
    dim: int,
    index: list[int],
    arms: list[str],
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[str], None] = lambda _: None,
    *,
    sampling: Sampling = GREEDY,
    fixed_shape: bool = False,
    followup_turns: int = 0,
    followup: str = "",
    steer: SteerArm | None = None,
    runtime: Runtime | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[dict[str, Any]]:
    """One record per (row, arm, turn): the response and everything a scorer needs to re-score it offline.

    The `steer` arm needs `steer` (models.steer_hook.load_steer_arm) and answers only the rows it covers.
    `runtime` (models.generate.eval_runtime): the device's autocast; the model must already be on that device.
    `on_progress(done, total, turn=..., arm=...)` follows the responses generated, batch by batch.
    """
    if "steer" in arms and steer is None:
        raise ValueError("arm 'steer' needs the steering readout (steer=load_steer_arm(...))")
    model.eval()
    real = channel_tensor(mats, names, dim, index)
    answered = {arm: [j for j, i in enumerate(index) if arm != "steer" or steer.covers(rows[i])] for arm in arms}
    texts = {arm: [arm_prompt(rows[i], arm) for i in index] for arm in arms}
    records = []
    # every turn's responses: turn 0 answers each arm, later turns the follow-up arms and the cut arm (= mars)
    later = [len(answered[a]) for a in arms if a in FOLLOWUP_ARMS] + ([len(answered["mars"])] if "mars" in arms else [])
    total, done = sum(len(answered[a]) for a in arms) + followup_turns * sum(later), 0
    for turn in range(followup_turns + 1):
        turn_arms = arms if turn == 0 else [a for a in arms if a in FOLLOWUP_ARMS]
        if turn == 1 and "mars" in arms:  # the cut arm branches off MARS's turn-0 conversation
            answered[CUT_ARM], texts[CUT_ARM] = answered["mars"], list(texts["mars"])
        if turn >= 1 and "mars" in arms:
            turn_arms = [*turn_arms, CUT_ARM]
        ids = {arm: [tok.prompt_ids(t) for t in texts[arm]] for arm in turn_arms}
        # one prompt length for every arm of a turn: with fixed shapes, one compiled graph serves them all
        prompt_len = max((len(p) for arm in turn_arms for p in ids[arm]), default=1)
        for arm in turn_arms:
            sel = answered[arm]
            chans = (real if arm == "mars" else torch.zeros_like(real))[sel]
            plan = steer.steering([rows[index[j]]["channel_state"] for j in sel]) if arm == "steer" else None
            progress(f"turn {turn}: generating {len(sel)} responses for arm {arm}")

            def batch_done(n: int, turn: int = turn, arm: str = arm) -> None:
                nonlocal done
                done += n
                if on_progress is not None:
                    on_progress(done, total, turn=turn, arm=arm)

            outs = generate(model, [ids[arm][j] for j in sel], chans, max_new_tokens, tok.eos_id, tok.pad_id,
                            batch_size=batch_size, sampling=sampling, fixed_shape=fixed_shape, prompt_len=prompt_len,
                            steer=plan, runtime=runtime, on_batch=batch_done)
            for j, new in zip(sel, outs, strict=True):
                i = index[j]
                response = tok.decode(new)
                records.append(_record(rows[i], arm, turn, texts[arm][j], response, len(ids[arm][j]), len(new)))
                texts[arm][j] = followup_prompt(texts[arm][j], response, followup)
    return records


def _record(row: dict[str, Any], arm: str, turn: int, prompt: str, response: str, prompt_tokens: int,
            response_tokens: int) -> dict[str, Any]:
    return {
        "row_id": row["row_id"],
        "prompt_id": row["prompt_id"],
        "capability": row["capability"],
        "kind": row["kind"],
        "arm": arm,
        "turn": turn,
        "channel": "real" if arm == "mars" else "zeroed",
        "pole": row.get("pole"),
        "text_pole": row.get("text_pole"),
        "salient_item": row.get("salient_item"),
        "items": row.get("items") or [],
        "channel_state": row["channel_state"],
        "prompt": prompt,
        "response": response,
        "prompt_tokens": prompt_tokens,
        "response_tokens": response_tokens,
    }
