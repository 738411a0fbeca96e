"""The whole pipeline under Prefect's test harness on a small tiny world: every stage runs for real
(TRL, Prefect), versions chain back to the world, re-runs are cache hits, a config change re-runs
only the changed stage and what follows, and a failing stage leaves its upstream registered."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import drain_prefect
import yaml

from pipeline import flows
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.store import Store

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = "smoke"

# The shipped `tiny` pipeline, shrunk so that all stages together take a few minutes on 2 cores.
SMOKE = {
    "world": {"n_cold_start": 300, "n_rl_prompts": 64, "n_eval": 16, "n_general_sft": 24,
              "n_general_prompts": 16, "n_general_eval": 8, "n_preference": 64, "pretrain_steps": 60,
              "pretrain_corpus_lines": 2000, "pretrain_batch_size": 16, "pretrain_seq_len": 128, "judge": False},
    "eval": {"limit": 8, "k": 2, "max_new_tokens": 96},
    "stages": {
        # enough steps for the answer format (about 90% of completions), not for arithmetic
        "cold-start": {"trainer": {"max_steps": 60, "per_device_train_batch_size": 16, "save_steps": 30,
                                   "logging_steps": 10}},
        "reasoning-rl": {"trainer": {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4,
                                     "save_steps": 1, "logging_steps": 1}},
        # A few SFT steps teach no arithmetic: keep the correctness filter out of this mechanics test
        # (the tiny pipeline run checks quality).
        "rejection-sft": {"generation": {"backend": "transformers", "n": 2, "max_new_tokens": 128}, "judge": None,
                          "filters": {"order": ["length", "duplicate"], "min_chars": 1},
                          "trainer": {"max_steps": 3, "logging_steps": 1}},
        # a 4-step reward model cannot pass the reward-model guard: stage 4 continues without trusting it
        "reward-model": {"trainer": {"max_steps": 4, "logging_steps": 1}, "guard": {"on_fail": "zero-weight"}},
        "preference-rl": {"monitor": {"enabled": False}, "num_prompts": 16, "rm_guard": {"on_fail": "zero-weight"},
                          "trainer": {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4,
                                      "logging_steps": 1}},
    },
}


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, storage: Path, extra: dict | None = None) -> Path:
    shipped = yaml.safe_load((ROOT / "flows.yaml").read_text())
    smoke = deep_merge(deep_merge(shipped["pipelines"]["tiny"], SMOKE), extra or {})
    smoke["storage_root"] = str(storage)
    path.write_text(yaml.safe_dump({"default": PIPELINE, "pipelines": {PIPELINE: smoke}}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    """A real local Prefect server with its UI, started the way `r1flow ui` starts it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline import ui

    port = ui.free_port()
    proc = ui.start_server(port=port, home=tmp_path_factory.mktemp("prefect-home"))
    try:
        with temporary_settings({PREFECT_API_URL: ui.api_url(port)}):
            yield port
            drain_prefect()  # deliver queued logs and events before the server stops
    finally:
        ui.stop_server(proc)


@pytest.fixture(scope="module")
def env(tmp_path_factory, prefect):
    tmp = tmp_path_factory.mktemp("pipeline")
    storage = tmp / "store"
    cfg = write_config(tmp / "flows.yaml", storage)
    state = flows.pipeline_flow(config_file=str(cfg), pipeline=PIPELINE, return_state=True)
    return {"tmp": tmp, "storage": storage, "config": cfg, "rows": state.result(), "store": Store(storage),
            "port": prefect, "run_id": str(state.state_details.flow_run_id)}


def test_browser_shows_the_pipeline_summary_and_the_stage3_funnel(env, tmp_path):
    """Headless Chromium on the real UI: the pipeline run's summary table lists every stage's
    version; the rejection-sft run shows its funnel."""
    from test_ui_browser import chromium_page, find_artifacts_in_ui, open_artifact, stage_runs_of

    port, run_id = env["port"], env["run_id"]
    with chromium_page(tmp_path / "profile") as page:
        text = find_artifacts_in_ui(port, run_id, page, tmp_path / "pipeline-artifacts.png")
        assert f"{PIPELINE}-pipeline-summary" in text and f"{PIPELINE}-pipeline-runs" in text
        table = open_artifact(page, f"{PIPELINE}-pipeline-summary", tmp_path / "summary.png")
        for row in env["rows"]:
            assert row["version"] in table
        stage_runs = stage_runs_of(port, run_id)
        assert set(stage_runs) >= {r["stage"] for r in env["rows"]}
        text = find_artifacts_in_ui(port, stage_runs["rejection-sft"], page, tmp_path / "stage3-artifacts.png")
        for key in ("funnel", "eval", "summary", "lineage", "checkpoint"):
            assert f"{PIPELINE}-rejection-sft-{key}" in text, key
        funnel = open_artifact(page, f"{PIPELINE}-rejection-sft-funnel", tmp_path / "funnel.png")
        assert "generated" in funnel and "duplicate" in funnel


def test_first_run_trains_every_stage_and_versions_chain_to_the_world(env):
    rows, store = env["rows"], env["store"]
    assert [r["stage"] for r in rows] == ["world", "cold-start", "reasoning-rl", "rejection-sft", "reward-model",
                                          "preference-rl"]
    assert not any(r["cached"] for r in rows)
    world_id = rows[0]["version"]
    for r in rows[1:]:
        ancestors = [v.id for v in store.lineage(r["version"])["ancestors"]]
        assert world_id in ancestors, (r["stage"], ancestors)
    chain = {r["stage"]: r["version"] for r in rows}
    assert store.get(chain["reasoning-rl"]).parents["cold-start"] == chain["cold-start"]
    assert store.get(chain["preference-rl"]).parents["rejection-sft"] == chain["rejection-sft"]
    for stage in ("world", "cold-start", "reasoning-rl", "rejection-sft", "preference-rl"):
        ev = store.get(chain[stage]).metrics["eval"]
        assert 0.0 <= ev["pass@1"] <= 1.0 and ev["n_prompts"] == SMOKE["eval"]["limit"], (stage, ev)
    assert "eval" not in store.get(chain["reward-model"]).metrics  # a classifier, not a generator
    assert (store.get(chain["rejection-sft"]).path / "data" / "train.jsonl").is_file()
    assert store.verify() == []


def test_second_run_is_all_cache_hits(env):
    again = flows.pipeline_flow(config_file=str(env["config"]), pipeline=PIPELINE)
    assert [r["version"] for r in again] == [r["version"] for r in env["rows"]]
    assert all(r["cached"] for r in again)
    assert max(r["seconds"] for r in again) < 5


def test_single_stage_cache_hit_then_force(env):
    loaded = load_config(env["config"])
    cached = flows.run_stage_flow(loaded, PIPELINE, "reasoning-rl")
    rl = next(r for r in env["rows"] if r["stage"] == "reasoning-rl")
    assert cached["cached"] and cached["version"] == rl["version"]
    forced = flows.run_stage_flow(loaded, PIPELINE, "reasoning-rl", force=True)
    assert not forced["cached"] and forced["version"] != rl["version"]
    assert env["store"].get(forced["version"]).parents == env["store"].get(rl["version"]).parents


def test_changing_stage4_config_reruns_only_stage4(env):
    cfg = write_config(env["tmp"] / "flows-stage4.yaml", env["storage"],
                       {"stages": {"preference-rl": {"trainer": {"learning_rate": 2e-5}}}})
    rows = flows.pipeline_flow(config_file=str(cfg), pipeline=PIPELINE)
    before = {r["stage"]: r["version"] for r in env["rows"]}
    for r in rows:
        if r["stage"] == "preference-rl":
            assert not r["cached"] and r["version"] != before["preference-rl"]
        else:
            assert r["cached"] and r["version"] == before[r["stage"]], r


def test_failing_stage3_keeps_upstream_and_next_run_resumes_there(env, monkeypatch):
    cfg = write_config(env["tmp"] / "flows-stage3.yaml", env["storage"],
                       {"stages": {"rejection-sft": {"keep_per_prompt": 1}}})
    import stages.rejection_sft as stage3

    n_versions = len(env["store"].list())

    def broken(cfg, ctx):
        (ctx.out_dir / "partial.txt").write_text("half-written")
        raise RuntimeError("injected failure in stage 3")

    monkeypatch.setattr(stage3, "run", broken)
    with pytest.raises(flows.StageFailed, match="stage rejection-sft failed: RuntimeError: injected failure") as exc:
        flows.pipeline_flow(config_file=str(cfg), pipeline=PIPELINE)
    assert [r["stage"] for r in exc.value.rows] == ["world", "cold-start", "reasoning-rl"]
    assert all(r["cached"] for r in exc.value.rows)
    assert len(env["store"].list()) == n_versions  # nothing partial registered
    monkeypatch.undo()

    rows = flows.pipeline_flow(config_file=str(cfg), pipeline=PIPELINE)
    by_stage = {r["stage"]: r for r in rows}
    assert all(by_stage[s]["cached"] for s in ("world", "cold-start", "reasoning-rl", "reward-model"))
    assert not by_stage["rejection-sft"]["cached"] and not by_stage["preference-rl"]["cached"]


def test_cli_reads_the_store(env, capsys, tmp_path):
    base = ["--config", str(env["config"])]
    assert main([*base, "ls", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {v["stage"] for v in listed} >= {"world", "cold-start", "reasoning-rl", "rejection-sft", "preference-rl"}
    rl = next(r for r in env["rows"] if r["stage"] == "reasoning-rl")["version"]
    assert main([*base, "show", rl[:16], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == rl and "cold-start" in shown["parents"]
    assert main([*base, "lineage", rl]) == 0
    assert "world-" in capsys.readouterr().out
    summary = tmp_path / "summary.json"
    assert main([*base, "run", "--summary-json", str(summary)]) == 0
    data = json.loads(summary.read_text())
    assert [d["stage"] for d in data][0] == "world" and all({"stage", "version", "cached", "seconds"} <= d.keys() for d in data)
    assert main([*base, "show", "no-such-version"]) == 2
    assert "not found" in capsys.readouterr().err


def test_verify_reports_a_corrupted_file(env, capsys):
    base = ["--config", str(env["config"])]
    assert main([*base, "verify"]) == 0
    world = env["store"].get(env["rows"][0]["version"])
    victim = next(p for p in sorted(world.path.rglob("*.jsonl")))
    victim.write_text(victim.read_text() + "tampered\n")
    try:
        assert main([*base, "verify"]) == 1
        out = capsys.readouterr().out
        assert victim.name in out and "sha256 mismatch" in out
    finally:
        victim.write_text(victim.read_text().removesuffix("tampered\n"))


def test_retries_transient_failures_but_not_user_errors(env, monkeypatch):
    import stages.rejection_sft as stage3
    from stages.common import UserError

    cfg = write_config(env["tmp"] / "flows-retry.yaml", env["storage"],
                       {"stages": {"rejection-sft": {"keep_per_prompt": 3}},
                        "orchestration": {"retries": {"rejection-sft": 1}, "retry_delay_seconds": 0}})
    loaded = load_config(cfg)
    real, calls = stage3.run, []

    def flaky(cfg, ctx):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("engine died")
        return real(cfg, ctx)

    monkeypatch.setattr(stage3, "run", flaky)
    row = flows.run_stage_flow(loaded, PIPELINE, "rejection-sft")
    assert len(calls) == 2 and not row["cached"]

    def user_error(cfg, ctx):
        calls.append(1)
        raise UserError("dataset 'x': missing required column 'answer'")

    calls.clear()
    monkeypatch.setattr(stage3, "run", user_error)
    with pytest.raises(UserError, match="missing required column"):
        flows.run_stage_flow(loaded, PIPELINE, "rejection-sft", force=True)
    assert len(calls) == 1
