"""The training stage as a flow of its own, so it can be deployed to an accelerator work pool.

The iteration flow dispatches to it (`orchestration.train_dispatch: deployment`) and waits.
It hands its lineage records back through a JSON file in the shared home, not through Prefect
result storage, so the only thing both machines must share is the home folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks.train import train_task
from tinymars.artifacts import write_atomic
from tinymars.profile import Profile, as_profile


def handback_path(home: str, run_key: str) -> Path:
    return Path(home) / "dispatch" / f"{run_key}.json"


@flow(name="train", log_prints=True)
def train_models(
    profile: str | dict[str, Any] | Profile,
    home: str,
    pack: dict[str, Any],
    replay: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Train every model of the profile on a packed-data artifact; write the records for the caller."""
    prof = as_profile(profile, overrides)
    log = get_run_logger()
    log.info(f"training {len(prof.train.models)} model(s) for profile '{prof.name}' on {pack['artifact']['path']}")
    results = {spec.name: train_task(prof, home, pack, spec, replay, force=force) for spec in prof.train.models}
    run_key = str(flow_run.get_id() or "local")
    write_atomic(handback_path(home, run_key), json.dumps(results, sort_keys=True))
    return {"handback": str(handback_path(home, run_key))}
