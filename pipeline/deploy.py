"""`r1flow deploy PIPELINE`: Prefect deployments for a pipeline and each of its stages, on work pools.

One deployment runs the whole pipeline (`r1flow-pipeline/<pipeline>`) and one each stage
(`r1flow-stage/<pipeline>-<stage>`), all from this project folder (`Flow.from_source`, no image build) with the
flows file's absolute path as a parameter. `orchestration.work_pools` in flows.yaml names the pool of the
pipeline flow (`pipeline`, default for every stage) and of any stage; `--pool` overrides the pipeline's. When
the deployed pipeline flow runs, a stage placed on another pool than the pipeline's runs through its own
deployment (`run_deployment`, as a subflow: a GPU worker picks it up) and the pipeline flow waits for it; the
other stages run inside the pipeline's flow run, as with `r1flow run`.

What a worker needs: this project installed (the same checkout path, or set the deployment's working
directory), the flows file at the same path, and the store root (`storage_root`) on storage every worker
shares: a stage writes its version there and the pipeline flow reads it back. The store writes versions
atomically by renaming a finished staging folder inside the root, so the shared filesystem must give atomic
`rename` within one directory and visible-after-close writes (local disks, NFS v4, Lustre, EFS do; object-store
mounts such as s3fs do not)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.common import UserError

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_FLOW, STAGE_FLOW = "r1flow-pipeline", "r1flow-stage"
ENTRYPOINTS = {PIPELINE_FLOW: "pipeline/flows.py:pipeline_flow", STAGE_FLOW: "pipeline/flows.py:stage_flow"}


def stage_deployment(pipeline: str, stage: str) -> str:
    return f"{STAGE_FLOW}/{pipeline}-{stage}"


def pools(pipe, pool: str | None = None) -> dict[str, str | None]:
    """{"pipeline": pool, stage: pool} for every enabled stage (a stage without its own pool: the pipeline's)."""
    configured = dict(pipe.orchestration.work_pools)
    main = pool or configured.get("pipeline")
    return {"pipeline": main, **{s: configured.get(s, main) for s in pipe.enabled_stages()}}


def placed_elsewhere(pipe) -> set[str]:
    """Stages whose work pool is not the pipeline flow's: a deployed pipeline runs them through their deployments."""
    where = pools(pipe)
    return {s for s, p in where.items() if s != "pipeline" and p != where["pipeline"]}


def _require_server() -> None:
    from prefect.settings import get_current_settings  # noqa: PLC0415

    if not get_current_settings().api.url:
        raise UserError("r1flow deploy: deployments live on a Prefect server; start one (`r1flow ui`, or `prefect "
                        "server start`) or set PREFECT_API_URL")


def _check_pools(names: set[str]) -> None:
    from prefect.client.orchestration import get_client  # noqa: PLC0415
    from prefect.exceptions import ObjectNotFound  # noqa: PLC0415

    missing = []
    with get_client(sync_client=True) as client:
        for name in sorted(names):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                missing.append(name)
    if missing:
        raise UserError(*(f"work pool {n!r} not found on the Prefect server; create it first, e.g. "
                          f"`prefect work-pool create {n} --type process` (configs/work-pools/ has job templates)"
                          for n in missing))


def deploy(loaded, pipeline: str, pool: str | None = None) -> list[dict[str, Any]]:
    """Create (or update) the pipeline's deployments; one row per deployment."""
    from prefect import Flow  # noqa: PLC0415

    from pipeline.cli import RUN_LOG_LOGGERS  # noqa: PLC0415

    name, pipe = loaded.get(pipeline)
    where = pools(pipe, pool)
    if not where["pipeline"]:
        raise UserError(f"r1flow deploy {name}: no work pool: pass --pool POOL or set orchestration.work_pools.pipeline "
                        "in the flows file")
    _require_server()
    _check_pools({p for p in where.values() if p})
    env = {"PREFECT_LOGGING_EXTRA_LOGGERS": RUN_LOG_LOGGERS}
    if pipe.data_mirror:
        env["R1FLOW_DATA_MIRROR"] = str(pipe.data_mirror)
    config_file = str(Path(loaded.path).resolve())
    rows = []
    flows = {f: Flow.from_source(source=str(ROOT), entrypoint=e) for f, e in ENTRYPOINTS.items()}
    targets = [(PIPELINE_FLOW, name, where["pipeline"], {"config_file": config_file, "pipeline": name})]
    targets += [(STAGE_FLOW, f"{name}-{s}", where[s], {"config_file": config_file, "pipeline": name, "stage": s})
                for s in pipe.enabled_stages()]
    for flow_name, dep_name, dep_pool, params in targets:
        flows[flow_name].deploy(name=dep_name, work_pool_name=dep_pool, parameters=params, build=False, push=False,
                                job_variables={"env": env}, print_next_steps=False, ignore_warnings=True,
                                tags=["r1flow", name], description=f"r1flow {name}: {params.get('stage', 'pipeline')}")
        rows.append({"deployment": f"{flow_name}/{dep_name}", "work pool": dep_pool,
                     "runs": "the whole pipeline" if flow_name == PIPELINE_FLOW else params["stage"]})
    return rows
