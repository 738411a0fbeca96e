"""Where a stage's sampling shards run (`shards:` in the rejection-sft block of flows.yaml).

The stage cuts its prompts into shards and hands them to `StageContext.map_shards` without knowing
where they run. `runner: in-process` runs them one after another in the stage's process; `runner:
ray` runs each as a Prefect task (`rejection-sft-generate-shard-0`, ..., `rejection-sft-judge-shard-0`, ...) on
prefect-ray's `RayTaskRunner`: a
local Ray started for the stage (and stopped after), or an existing cluster by `address`. Each
shard task reserves `num_cpus`/`num_gpus` (prefect-ray's `remote_options`), so on an 8-GPU node
`{count: 8, runner: ray, num_gpus: 1}` runs one vLLM engine per GPU. The shards' Prefect task runs
report to the same Prefect API as the pipeline: its URL is passed to the Ray workers, which must be
able to reach it (a `127.0.0.1` API serves a local Ray only; use a shared server for a cluster).

Network: even a local Ray's processes (GCS, raylet, workers) listen on every interface, not only localhost
(measured with Ray 2.60; `_node_ip_address` does not change that); Ray 2.60 turns token authentication on by
default, which is what keeps others out. On a shared or untrusted network, firewall those ports."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import UserError, map_in_process

log = logging.getLogger(__name__)


@task(name="shard", cache_policy=NO_CACHE)
def shard_task(fn: Callable[[Any], Any], job: Any) -> Any:
    return fn(job)


def shard_mapper(shards, stage: str = "rejection-sft") -> Callable[..., list]:
    """The `map_shards` a stage gets for its `shards:` settings."""
    if shards is None or shards.runner == "in-process":
        return map_in_process
    return functools.partial(map_on_ray, shards, stage)


def _prefect_api_url() -> str:
    """The API this process reports to (the temporary server's when none is configured)."""
    from prefect.client.orchestration import get_client  # noqa: PLC0415

    return str(get_client(sync_client=True).api_url)


def ray_runner(shards, api_url: str):
    """prefect-ray's task runner for `shards` (raises a one-line UserError when ray is not installed)."""
    try:
        from prefect_ray import RayTaskRunner  # noqa: PLC0415
    except ImportError as exc:
        raise UserError(f"rejection-sft.shards.runner: ray needs the `ray` and `prefect-ray` packages ({exc}); "
                        "install them with `pip install -e '.[ray]'`") from None
    init_kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                                   "runtime_env": {"env_vars": {"PREFECT_API_URL": api_url}}}
    return RayTaskRunner(address=shards.address, init_kwargs=init_kwargs)


def map_on_ray(shards, stage: str, fn: Callable[[Any], Any], jobs: list,
               progress: Callable[[float], None] | None = None) -> list:
    """`fn(job)` for every job as Prefect tasks (`<stage>-<fn>-0`, `-1`, ...) on Ray; results in job order. The tasks
    are submitted straight to the task runner, so in the UI they are children of the stage's own task run, and
    only `fn` (a module-level function, pickled by reference) and the plain jobs travel to the workers."""
    from prefect_ray.context import remote_options  # noqa: PLC0415

    log.info("%s: %d shards on Ray (%s; %s CPU, %s GPU each)", stage, len(jobs), shards.address or "local",
             shards.num_cpus, shards.num_gpus)
    results = []
    with ray_runner(shards, _prefect_api_url()) as runner:
        with remote_options(num_cpus=shards.num_cpus, num_gpus=shards.num_gpus):
            label = getattr(fn, "__name__", "shard").replace("_", "-")  # generate-shard, judge-shard
            futures = [runner.submit(shard_task.with_options(name=f"{stage}-{label}-{i}"), {"fn": fn, "job": job})
                       for i, job in enumerate(jobs)]
        for future in futures:  # in job order: the merge never depends on which shard finished first
            results.append(future.result())
            if progress:
                progress(len(results) / len(futures))
    return results
