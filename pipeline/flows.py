"""Prefect flows: one flow per stage, and the pipeline flow that chains them.

A stage run is a lookup first: its version id derives from (stage, resolved config, upstream
version ids, code version), so when the store already holds that id the stage is reported as cached
and nothing is recomputed. Otherwise the stage's `run(cfg, ctx)` writes into a staging folder, the
pipeline evaluates the produced model, and the version becomes visible only when all of it is done."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.config import STAGES, Loaded, load_config, stage_module
from pipeline.store import Store, Version
from stages.common import StageContext, UserError

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
# Source files whose content is part of each stage's version id (the "code version").
CODE_DEPS: dict[str, list[str]] = {
    "world": ["world", "judge", "common"],
    "cold-start": ["cold_start_sft", "data", "common"],
    "reasoning-rl": ["reasoning_rl", "rewards", "monitor", "data", "common"],
    "rejection-sft": ["rejection_sft", "generation", "filters", "judge", "rewards", "data", "common"],
    "reward-model": ["reward_model", "data", "common"],
    "preference-rl": ["preference_rl", "reward_model", "rewards", "monitor", "generation", "data", "common"],
}
# Stages whose output is a generative model evaluated on the held-out prompts (world: its base model).
EVALUATED = {"world": "base_model", "cold-start": "model", "reasoning-rl": "model", "rejection-sft": "model",
             "preference-rl": "model"}
STAGES_DIR = Path(__file__).resolve().parent.parent / "stages"
SUMMARY_KEYS = ("pass@1", "greedy_accuracy", "format_rate", "mean_completion_tokens", "rm_score")


def code_version(stage: str) -> str:
    digest = hashlib.sha256()
    for name in CODE_DEPS[stage]:
        file = STAGES_DIR / f"{name}.py"
        if file.exists():
            digest.update(name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def identity_config(pipe, stage: str) -> dict[str, Any]:
    """The part of the pipeline config a stage's output depends on (eval settings are not: they only
    describe the version and are stored with its eval metrics)."""
    return {
        "stage": pipe.stage_config(stage).model_dump(mode="json"),
        "seed": pipe.seed,
        "device": pipe.device,
        "base_model": pipe.base_model,
        "trust_remote_code": pipe.trust_remote_code,
    }


def resolve_upstream(store: Store, pipe, stage: str, given: dict[str, str] | None, from_id: str | None) -> dict[str, str]:
    """Upstream version ids for `stage`: those given (pipeline run), else `--from` plus that version's
    ancestors, else the latest version of each upstream stage."""
    needed = [s for s in UPSTREAM[stage] if s in pipe.enabled_stages()]
    chosen: dict[str, str] = dict(given or {})
    if from_id:
        v = store.require(from_id)
        if v.stage not in needed:
            raise UserError(f"--from {from_id}: is a {v.stage} version; {stage} starts from: {', '.join(needed) or 'nothing'}")
        chosen[v.stage] = v.id
        for anc in store.lineage(v.id)["ancestors"]:
            if anc.stage in needed:
                chosen.setdefault(anc.stage, anc.id)
    for s in needed:
        if s not in chosen:
            latest = store.latest(s)
            if latest is None:
                raise UserError(f"{stage}: needs a {s} version and the store has none; run `r1flow stage {s}` (or `r1flow run`) first")
            chosen[s] = latest.id
    return {s: chosen[s] for s in needed}


def _eval_model_dir(stage: str, out_dir: Path) -> Path | None:
    if stage not in EVALUATED:
        return None
    path = out_dir / EVALUATED[stage]
    return path if (path / "config.json").is_file() else None


def _summary_row(stage: str, version: Version, cached: bool, seconds: float) -> dict[str, Any]:
    ev = version.metrics.get("eval", {})
    return {"stage": stage, "version": version.id, "cached": cached, "seconds": round(seconds, 1),
            **{k: ev[k] for k in SUMMARY_KEYS if k in ev}}


def execute_stage(loaded: Loaded, pipeline: str, stage: str, upstream: dict[str, str] | None = None,
                  from_id: str | None = None, force: bool = False, reporter_factory=None) -> dict[str, Any]:
    """Run (or reuse) one stage. Plain Python; the Prefect flows below wrap it."""
    log = logging.getLogger("r1flow")
    _, pipe = loaded.get(pipeline)
    stage_cfg = pipe.stage_config(stage)
    if stage_cfg is None:
        raise UserError(f"{stage}: not configured in pipeline {pipeline!r} ({loaded.path})")
    store = Store(loaded.storage_root(pipeline))
    parents = resolve_upstream(store, pipe, stage, upstream, from_id)
    ident = identity_config(pipe, stage)
    if force:  # a forced re-run is a new version (training is not bit-reproducible anyway)
        ident["rerun"] = datetime.now(timezone.utc).isoformat()
    code = code_version(stage)
    vid = Store.make_id(stage, ident, parents, code)
    start = time.monotonic()
    existing = store.get(vid)
    if existing is not None:
        log.info("%s: cached version %s (same config, upstream and code)", stage, vid)
        return _summary_row(stage, existing, True, time.monotonic() - start)

    reporter = reporter_factory(pipeline, stage) if reporter_factory else None
    with store.create(stage, ident, parents, code, info={"pipeline": pipeline}) as pending:
        ctx = StageContext(
            out_dir=pending.path, work_dir=store.work_dir(vid),
            inputs={s: store.require(v).path for s, v in parents.items()},
            pipeline=pipe, seed=pipe.seed, device=pipe.device, version_id=vid, parents=parents,
            **({"reporter": reporter} if reporter else {}),
        )
        log.info("%s: training version %s from %s", stage, vid, parents or "nothing")
        metrics = stage_module(stage).run(stage_cfg, ctx)
        pending.metrics.update(metrics or {})
        model_dir = _eval_model_dir(stage, pending.path)
        if model_dir is not None:
            from stages.evaluate import evaluate  # noqa: PLC0415

            log.info("%s: evaluating %s on held-out prompts", stage, model_dir.name)
            pending.metrics["eval"] = evaluate(str(model_dir), pipe.eval, ctx.inputs.get("world", pending.path if stage == "world" else None))
            pending.metrics["eval_config"] = pipe.eval.model_dump(mode="json")
            if "heldout_rm_score_after" in pending.metrics:  # stage 4 scores held-out general prompts
                pending.metrics["eval"]["rm_score"] = pending.metrics["heldout_rm_score_after"]
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
        if keys:
            png = plot_curves(history, keys, Path(tempfile.mkdtemp(prefix="r1flow-curves-")) / "curves.png")
            reporter.image("curves", png, description=f"training curves of {version.id}")
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
               from_version: str | None, force: bool) -> dict[str, Any]:
    return execute_stage(load_config(config_file), pipeline, stage, upstream, from_version, force, _prefect_reporter)


@flow(name="r1flow-stage", flow_run_name="{stage}", log_prints=False)
def stage_flow(config_file: str, pipeline: str, stage: str, upstream: dict[str, str] | None = None,
               from_version: str | None = None, force: bool = False) -> dict[str, Any]:
    """One stage as a Prefect flow; runs alone (`r1flow stage`) or nested in the pipeline flow. Its work
    is one task, retried per `orchestration.retries` when it fails for a reason other than user error."""
    _, pipe = load_config(config_file).get(pipeline)
    orch = pipe.orchestration
    work = stage_task.with_options(name=stage, retries=orch.retries.get(stage, 0),
                                   retry_delay_seconds=orch.retry_delay_seconds)
    row = work(config_file, pipeline, stage, upstream, from_version, force)
    get_run_logger().info("%s: %s version %s", stage, "cached" if row["cached"] else "new", row["version"])
    return row


def run_stage_flow(loaded: Loaded, pipeline: str, stage: str, **kwargs) -> dict[str, Any]:
    return stage_flow(config_file=str(loaded.path), pipeline=pipeline, stage=stage, **kwargs)


class StageFailed(Exception):
    def __init__(self, stage: str, error: BaseException, rows: list[dict]):
        first = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        super().__init__(f"stage {stage} failed: {type(error).__name__}: {first[:300]}")
        self.stage, self.rows = stage, rows


@flow(name="r1flow-pipeline", flow_run_name="{pipeline}", log_prints=False)
def pipeline_flow(config_file: str, pipeline: str, force: list[str] | None = None,
                  start_at: str | None = None) -> list[dict[str, Any]]:
    """All enabled stages in order, each reusing its cached version when inputs are unchanged.
    `force` names stages to re-run; `start_at` re-runs that stage and everything after it."""
    loaded = load_config(config_file)
    _, pipe = loaded.get(pipeline)
    force = set(force or [])
    stages = pipe.enabled_stages()
    if start_at:
        force |= set(stages[stages.index(start_at):])
    produced: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    run_ids: dict[str, str] = {}
    for stage in stages:
        upstream = {s: produced[s] for s in UPSTREAM[stage] if s in produced}
        state = stage_flow(config_file=str(loaded.path), pipeline=pipeline, stage=stage, upstream=upstream,
                           force=stage in force, return_state=True)
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


__all__ = ["STAGES", "execute_stage", "pipeline_flow", "stage_flow", "run_stage_flow", "resolve_upstream", "StageFailed"]
