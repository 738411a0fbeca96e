"""Deployments and work pools (pipeline/deploy.py): pool placement (fast), one-line errors (fast), and a real
local Prefect server with two process work pools and a worker on each: the deployed pipeline flow runs on the
`cpu` pool and its cold-start stage on the `gpu` pool through the stage's deployment; the versions they write
are the ones `r1flow ls` shows (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.deploy import placed_elsewhere, pools, stage_deployment
from stages.common import UserError
from test_launch import ROOT, flows_with
from test_pipeline import PIPELINE, SMOKE, deep_merge, prefect  # noqa: F401  (a real local server)

PREFECT = [sys.executable, "-m", "prefect"]


def _pipe(tmp_path, work_pools):
    def edit(p):
        p.setdefault("orchestration", {})["work_pools"] = work_pools

    return load_config(flows_with(tmp_path, edit)).get("tiny")[1]


def test_pools_default_to_the_pipelines_and_stages_on_another_pool_are_placed_elsewhere(tmp_path):
    pipe = _pipe(tmp_path, {"pipeline": "cpu", "rejection-sft": "gpu", "reasoning-rl": "gpu"})
    where = pools(pipe)
    assert where["pipeline"] == "cpu" and where["world"] == "cpu" and where["cold-start"] == "cpu"
    assert where["rejection-sft"] == "gpu" and where["reasoning-rl"] == "gpu"
    assert placed_elsewhere(pipe) == {"rejection-sft", "reasoning-rl"}
    assert pools(pipe, "other")["pipeline"] == "other" and pools(pipe, "other")["cold-start"] == "other"
    (tmp_path / "b").mkdir()
    assert placed_elsewhere(_pipe(tmp_path / "b", {})) == set()  # nothing configured: everything in one flow run
    assert stage_deployment("tiny", "cold-start") == "r1flow-stage/tiny-cold-start"


def test_unknown_work_pool_keys_are_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        _pipe(tmp_path, {"pipeline": "cpu", "rejection_sft": "gpu"})
    assert len(err.value.problems) == 1
    assert "orchestration" in err.value.problems[0], err.value.problems
    assert "work_pools.rejection_sft: unknown key (expected pipeline or a stage" in err.value.problems[0]


def test_deploy_needs_a_pool_and_a_server(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["-c", str(ROOT / "flows.yaml"), "deploy", "tiny"]) == 2
    assert "no work pool: pass --pool POOL or set orchestration.work_pools.pipeline" in capsys.readouterr().err
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):
        assert main(["-c", str(ROOT / "flows.yaml"), "deploy", "tiny", "--pool", "cpu"]) == 2
    assert "deployments live on a Prefect server" in capsys.readouterr().err


def test_the_kubernetes_gpu_job_template_defines_every_variable_it_uses_and_renders():
    """Prefect drops a variable that job_configuration does not reference (and cannot fill one it does not
    define): both directions are checked, then the template is rendered with its defaults as a worker would."""
    import json

    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads((ROOT / "configs" / "work-pools" / "kubernetes-gpu.json").read_text())
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    defined = set(template["variables"]["properties"])
    assert used == defined, (used - defined, defined - used)
    values = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    job = apply_values(template["job_configuration"], {**values, "gpus": 8})["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert mounts["r1flow-store"] == "/r1flow/runs" and claim == "r1flow-store"


# ------------------------------------------------------------------------------ a real server and workers (slow)

def _worker(pool: str, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([*PREFECT, "worker", "start", "--pool", pool, "--type", "process"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(ROOT))


RUN_AND_READ = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
run = run_deployment(sys.argv[1], timeout=1200, poll_interval=3)
with get_client(sync_client=True) as client:
    deployments = {d.id: d.name for d in client.read_deployments()}
    runs = [{"deployment": deployments.get(r.deployment_id), "pool": r.work_pool_name, "state": r.state.type.value}
            for r in client.read_flow_runs() if r.deployment_id]
print(json.dumps({"state": run.state.type.value, "message": run.state.message, "runs": runs}))
"""


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_process_pool_worker_runs_the_deployed_pipeline_and_a_stage_on_another_pool(tmp_path, prefect):
    """As a user would: `r1flow deploy`, a worker per pool, `run_deployment`, `r1flow ls`, each its own process (the
    test process never holds Prefect's deployment machinery: vLLM engines forked later in the suite inherit it)."""
    import json

    shipped = yaml.safe_load((ROOT / "flows.yaml").read_text())
    smoke = deep_merge(shipped["pipelines"]["tiny"], SMOKE)
    smoke["stages"] = {"cold-start": smoke["stages"]["cold-start"]}  # world + cold-start: the mechanics, in minutes
    smoke["storage_root"] = str(tmp_path / "shared-store")
    smoke["orchestration"] = {"work_pools": {"pipeline": "cpu", "cold-start": "gpu"}}
    cfg = tmp_path / "flows.yaml"
    cfg.write_text(yaml.safe_dump({"default": PIPELINE, "pipelines": {PIPELINE: smoke}}, sort_keys=False))

    from pipeline import ui

    env = {**os.environ, "PREFECT_API_URL": ui.api_url(prefect), "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    r1flow = [sys.executable, "-m", "pipeline.cli", "-c", str(cfg)]

    def run(cmd, **kw):
        return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT), **kw)

    for pool in ("cpu", "gpu"):
        assert run([*PREFECT, "work-pool", "create", pool, "--type", "process"]).returncode == 0
    out = run([*r1flow, "deploy", PIPELINE])
    assert out.returncode == 0, out.stderr[-2000:]
    for name in (f"r1flow-pipeline/{PIPELINE}", f"r1flow-stage/{PIPELINE}-world", f"r1flow-stage/{PIPELINE}-cold-start"):
        assert name in out.stdout, out.stdout

    workers = [_worker(p, env, tmp_path / f"worker-{p}.log") for p in ("cpu", "gpu")]
    try:
        out = run([sys.executable, "-c", RUN_AND_READ, f"r1flow-pipeline/{PIPELINE}"], timeout=1300)
        logs = {p: (tmp_path / f"worker-{p}.log").read_text(errors="replace")[-3000:] for p in ("cpu", "gpu")}
        assert out.returncode == 0, (out.stderr[-2000:], logs)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["state"] == "COMPLETED", (result, logs)
        by_deployment = {r["deployment"]: r for r in result["runs"]}
        assert by_deployment[f"{PIPELINE}-cold-start"] == {"deployment": f"{PIPELINE}-cold-start", "pool": "gpu",
                                                           "state": "COMPLETED"}
        assert by_deployment[PIPELINE]["pool"] == "cpu"
        assert f"{PIPELINE}-world" not in by_deployment  # the world ran inside the pipeline's own flow run
    finally:
        for w in workers:
            try:
                os.killpg(w.pid, 15)
            except ProcessLookupError:
                pass
            w.wait(timeout=30)

    # the versions written by the workers are the ones `r1flow ls` shows, and they chain
    listing = run([*r1flow, "ls"])
    assert listing.returncode == 0, listing.stderr[-2000:]
    from pipeline.store import Store
    store = Store(tmp_path / "shared-store")
    world, cold = store.list("world"), store.list("cold-start")
    assert len(world) == 1 and len(cold) == 1
    assert cold[0].parents["world"] == world[0].id
    assert world[0].id in listing.stdout and cold[0].id in listing.stdout
    assert cold[0].metrics["eval"]["format_rate"] >= 0  # evaluated on the gpu pool's worker, before registering
