"""Apply the deployments of deploy/prefect.yaml to the current Prefect API (`tinymars deploy`).

deploy/prefect.yaml is the single source of truth. We read it and apply each deployment with
Prefect's RunnerDeployment API rather than `prefect deploy --all`: in Prefect 3.8.8 the CLI (and
`flow.deploy`) fail after creating each deployment, on a worker query the server rejects
(`limit`/`offset` sent as null → HTTP 422). The result on the server is the same: code from
this checkout (a set_working_directory pull step), the YAML's pools, parameters, schedules,
tags and concurrency limits.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import yaml

from tinymars.domain import TEACHER_LIMIT

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deploy" / "prefect.yaml"
TEACHER_LIMIT_DEFAULT = 32          # concurrent teacher requests across all runs; change with `prefect gcl update`


def load_config(path: Path = PREFECT_YAML) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def pool_names(config: dict[str, Any]) -> list[str]:
    return sorted({d["work_pool"]["name"] for d in config["deployments"] if d.get("work_pool")})


async def ensure_pools(names: list[str], pool_type: str = "process") -> list[str]:
    """Create the missing work pools; returns the names created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    async with get_client() as client:
        for name in names:
            try:
                await client.read_work_pool(name)
            except ObjectNotFound:
                await client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
                created.append(name)
    return created


async def ensure_concurrency_limit(name: str, limit: int) -> bool:
    """Create a global concurrency limit if missing (the teacher calls of all runs share it)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            return True


def build_deployments(config: dict[str, Any], home: str, names: set[str], with_pools: bool = True) -> list:
    """RunnerDeployments for the named YAML deployments, `{{ $TINYMARS_* }}` placeholders resolved."""
    from prefect.flows import Flow
    from prefect.schedules import Cron
    from prefect.utilities.templating import apply_values

    os.environ["TINYMARS_ROOT"] = str(ROOT)
    os.environ["TINYMARS_HOME"] = str(Path(home).resolve())
    out = []
    for d in config["deployments"]:
        if d["name"] not in names:
            continue
        pool = d.get("work_pool") or {}
        source = Flow.from_source(source=str(ROOT), entrypoint=d["entrypoint"]) if with_pools else None
        flow = source or _local_flow(d["entrypoint"])
        schedules = [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                     for s in d.get("schedules") or []]
        kwargs: dict[str, Any] = dict(
            name=d["name"], parameters=apply_values(d.get("parameters") or {}, {}), schedules=schedules,
            description=d.get("description"), tags=d.get("tags"), concurrency_limit=d.get("concurrency_limit"),
        )
        if with_pools:
            kwargs |= dict(work_pool_name=pool.get("name"), work_queue_name=pool.get("work_queue_name"),
                           job_variables=pool.get("job_variables") or {})
        out.append(flow.to_deployment(**kwargs))
    return out


def _local_flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(str(ROOT / entrypoint))


def apply_deployments(home: str, names: list[str] | None = None) -> list[str]:
    """Create pools and apply the deployments; returns the `flow/deployment` names applied."""
    config = load_config()
    wanted = set(names or [d["name"] for d in config["deployments"]])
    asyncio.run(ensure_pools(pool_names(config)))
    asyncio.run(ensure_concurrency_limit(TEACHER_LIMIT, TEACHER_LIMIT_DEFAULT))
    applied = []
    for dep in build_deployments(config, home, wanted):
        dep.apply()
        applied.append(f"{dep.flow_name}/{dep.name}")
    return applied
