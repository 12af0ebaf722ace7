"""Steering flow: a concept readout + quality report for any model folder, outside an iteration.

    tinymars steer --model HOME/artifacts/train/<key> --pairs HOME/artifacts/corpus/<key> --out readout/
    tinymars steer --model ~/models/Qwen3-0.6B --pairs my_pairs.jsonl --out readout/ --layers 8,12,16

Composition only: the readout task does the work (tasks.steering.write_readout, the same path as
the iteration's steer stage) and writes readout.safetensors, readout.json and quality.json.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.steering import readout_task
from tinymars.profile import SteeringSection


@flow(name="steering", log_prints=True)
def steering(model: str, pairs: str, out_dir: str, settings: dict[str, Any] | None = None,
             tokenizer: str | None = None) -> dict[str, Any]:
    """`settings` are steering-section fields (layers, pooling, method, methods, max_pairs, device, ...)."""
    return readout_task(model, pairs, out_dir, SteeringSection.model_validate(settings or {}), tokenizer)
