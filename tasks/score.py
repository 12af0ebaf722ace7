"""Score stage: every figure and verdict of the evaluation, from the generate artifact alone (no model).

Pure and cheap, so changing alpha, a hypothesis or the bootstrap re-runs only this stage and the report.
The artifact:
- `settings.json`: the scoring settings the profile pre-registered (`EvalSection.scoring()`);
- `scores.json`: `scorers.evaluate.score_all(generations, settings, measurements)`, which the report renders.

Key: the scoring settings, the scorer code (all of scorers/), the numeric libraries' versions and the
generate artifact's content hash. `tinymars score` recomputes `scores.json` offline from the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import artifact_of, run_stage
from tinymars.profile import Profile

SETTINGS = "settings.json"
SCORES = "scores.json"


@task(name="score", cache_policy=NO_CACHE)
def score_task(profile: Profile, home: str, generation: dict[str, Any], force: bool = False,
               model: str | None = None) -> dict[str, Any]:
    settings = scoring_settings(profile, model)
    inputs = {"generate": artifact_of(generation)}

    def build(out: Path) -> dict[str, Any]:
        from scorers.evaluate import headline_metrics, score_all
        from scorers.io import CROSSTALK, read_generations, write_json

        records = read_generations(inputs["generate"].file("generations.jsonl"))
        measurements = json.loads(inputs["generate"].file("measurements.json").read_text())
        scores = score_all(records, settings, measurements)
        if CROSSTALK in inputs["generate"].files:  # verified against the manifest like every input file
            crosstalk = inputs["generate"].file(CROSSTALK)
            from scorers.crosstalk import crosstalk_matrix

            scores["crosstalk"] = crosstalk_matrix(records, read_generations(crosstalk),
                                                   list(measurements["gates"].get("channel_names", [])),
                                                   settings["alpha"])
        write_json(out / SETTINGS, settings)
        write_json(out / SCORES, scores)
        return {"meta": {"metrics": headline_metrics(scores)}}

    return run_stage("score", home, settings, inputs, build, force,
                     name=None if model is None else f"score:{model}")


def scoring_settings(profile: Profile, model: str | None = None) -> dict[str, Any]:
    """The scoring settings; a model that reads a channel subset is held only to the hypotheses it can meet
    (capability `all`, or one it reads, and a metric defined for one it reads)."""
    from tinymars.domain import METRIC_CAPABILITIES

    settings = profile.eval.scoring()
    reads = set(profile.model_channels(model or profile.eval_model()))
    if reads != set(profile.channels.names):
        settings["hypotheses"] = [h for h in settings["hypotheses"]
                                  if (h["capability"] == "all" or h["capability"] in reads)
                                  and reads & set(METRIC_CAPABILITIES[h["metric"]])]
    return settings
