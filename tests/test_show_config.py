"""`r1flow show-config`: resolved settings with their sources (pipeline/show_config.py). Fast: nothing runs."""

from __future__ import annotations

import json

from pipeline.config import load_config
from pipeline.show_config import FLOWS, RUN_DEFAULT, RUNTIME, STAGE_DEFAULT, resolved_rows
from test_plan import FLOWS as FLOWS_FILE
from test_plan import QWEN, flows_with, run_cli


def by_setting(rows, stage):
    return {r["setting"]: r for r in rows if r["stage"] == stage}


def test_tiny_schedule_is_named_as_r1flow_default_next_to_trl_default():
    rows = by_setting(resolved_rows(load_config(FLOWS_FILE), "tiny", "cold-start"), "cold-start")
    steps = rows["trainer.max_steps (trl.SFTConfig)"]
    assert (steps["value"], steps["from"], steps["TRL default"]) == ("320", STAGE_DEFAULT, "-1")
    assert rows["trainer.seed (trl.SFTConfig)"]["from"] == RUNTIME
    assert rows["dataset"] == {"stage": "cold-start", "setting": "dataset", "value": "world:cold_start",
                               "from": FLOWS, "TRL default": ""}
    # TRL arguments equal to TRL's default and not written by the user are left out
    assert "trainer.num_train_epochs (trl.SFTConfig)" not in rows


def test_a_value_written_in_flows_yaml_is_named_so(tmp_path):
    def edit(p):
        p["tiny"]["stages"]["cold-start"]["trainer"] = {"learning_rate": 1e-4, "num_train_epochs": 3.0}
        p["tiny"]["stages"]["reasoning-rl"]["rewards"]["weights"]["format"] = 0.25
    loaded = load_config(flows_with(tmp_path, edit))
    rows = resolved_rows(loaded, "tiny")
    cold = by_setting(rows, "cold-start")
    assert (cold["trainer.learning_rate (trl.SFTConfig)"]["value"], cold["trainer.learning_rate (trl.SFTConfig)"]["from"]) \
        == ("0.0001", FLOWS)
    # written by the user, though equal to TRL's default: still listed
    assert cold["trainer.num_train_epochs (trl.SFTConfig)"]["from"] == FLOWS
    assert cold["trainer.max_steps (trl.SFTConfig)"]["from"] == STAGE_DEFAULT  # merged under the user's block
    rl = by_setting(rows, "reasoning-rl")
    assert json.loads(rl["rewards.weights"]["value"]) == {"accuracy": 1.0, "format": 0.25}
    assert rl["rewards.weights"]["from"] == FLOWS and rl["rewards.language"]["from"] == STAGE_DEFAULT
    assert by_setting(rows, "pipeline")["seed"]["from"] == FLOWS


def test_preference_rl_run_defaults_are_named():
    rows = by_setting(resolved_rows(load_config(FLOWS_FILE), "tiny", "preference-rl"), "preference-rl")
    assert rows["trainer.max_steps (trl.GRPOConfig)"]["from"] == RUN_DEFAULT


def test_the_gpu_recipe_inherits_no_r1flow_trainer_default():
    """Every TRL argument of the Qwen recipe that differs from TRL's default is written in flows.yaml (or is the
    seed/device r1flow sets): nothing sized for the tiny world reaches a GPU run unseen."""
    rows = resolved_rows(load_config(FLOWS_FILE), QWEN)
    leaked = [(r["stage"], r["setting"], r["value"]) for r in rows
              if "(trl." in r["setting"] and r["from"] not in (FLOWS, RUNTIME)]
    assert leaked == []
    assert {r["stage"] for r in rows} >= {"pipeline", "cold-start", "reasoning-rl", "rejection-sft", "preference-rl"}


def test_cli_prints_a_table_and_names_a_bad_stage(capsys):
    code, out, err = run_cli(capsys, "--config", FLOWS_FILE, "show-config", "tiny", "cold-start")
    assert code == 0 and out.splitlines()[0].split() == ["stage", "setting", "value", "from", "TRL", "default"]
    assert "trainer.max_steps (trl.SFTConfig)" in out and "r1flow default" in out
    code, out, err = run_cli(capsys, "--config", FLOWS_FILE, "show-config", "tiny", "cold-strat")
    assert code == 2 and err.strip().splitlines() == [
        "error: STAGE 'cold-strat': not a stage (expected one of world, cold-start, reasoning-rl, rejection-sft, "
        "reward-model, preference-rl)"]
    code, out, err = run_cli(capsys, "--config", FLOWS_FILE, "show-config", "tiny", "--json")
    assert code == 0 and {"stage", "setting", "value", "from", "TRL default"} == set(json.loads(out)[0])
