"""Stages 1 and 2 and the evaluator on a small world: real TRL training on CPU, loadable models,
resume after a killed run, evaluation metrics."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

import small
from stages import cold_start_sft, evaluate, reasoning_rl
from stages.common import StageContext
from test_generation import small_world

SFT_TEST = small.SFT
GRPO_TEST = small.GRPO


def make_ctx(tmp: Path, name: str, inputs: dict) -> StageContext:
    return StageContext(out_dir=tmp / name, work_dir=tmp / f"{name}.work", inputs=inputs,
                        pipeline=SimpleNamespace(base_model="world:base_model"), seed=0,
                        version_id=f"{name}-test", parents={k: f"{k}-test" for k in inputs})


def check_model_dir(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (path / f).is_file(), f
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and "<think>" in tok.get_vocab()
    AutoModelForCausalLM.from_pretrained(path)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    return small_world(tmp_path_factory)


@pytest.fixture(scope="module")
def cold_start(world_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage1")
    ctx = make_ctx(tmp, "cold-start", {"world": world_dir})
    metrics = cold_start_sft.run(cold_start_sft.Config(**SFT_TEST), ctx)
    return ctx, metrics


@pytest.mark.slow
def test_cold_start_writes_a_loadable_model_with_card(cold_start):
    ctx, metrics = cold_start
    check_model_dir(ctx.out_dir / "model")
    assert metrics["global_step"] == 4 and metrics["num_examples"] == 32
    assert [h["loss"] for h in metrics["history"] if "loss" in h], metrics["history"]
    json.dumps(metrics)  # JSON-able
    card = (ctx.out_dir / "model" / "README.md").read_text()
    assert "world:cold_start" in card and "world `world-test`" in card and "world:base_model" in card


class StopAfter:
    """A TrainerCallback that kills training (raises) after `step` optimizer steps."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= step and not control.should_save:
                    raise KeyboardInterrupt(f"killed after step {state.global_step}")

        return _Stop()


@pytest.mark.slow
def test_report_to_reaches_the_trainer(world_dir, tmp_path):
    """`report_to` passes through to TRL (it used to be forced to "none"): TensorBoard event files appear in
    the version folder (TRL's default, the work folder, is removed when the version is registered)."""
    ctx = make_ctx(tmp_path, "cold-start", {"world": world_dir})
    trainer = {**SFT_TEST["trainer"], "max_steps": 2, "report_to": "tensorboard"}
    cold_start_sft.run(cold_start_sft.Config(**{**SFT_TEST, "trainer": trainer}), ctx)
    assert list((ctx.out_dir / "logs" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_cold_start_resumes_from_checkpoint(world_dir, tmp_path, caplog):
    ctx = make_ctx(tmp_path, "cold-start", {"world": world_dir})
    cfg = cold_start_sft.Config(**SFT_TEST)
    with pytest.raises(KeyboardInterrupt):
        cold_start_sft.run(cfg, ctx, callbacks=[StopAfter(3)])
    assert (ctx.work_dir / "trainer" / "checkpoint-2").is_dir()
    assert not (ctx.out_dir / "model").exists()
    steps = []
    with caplog.at_level(logging.INFO, logger="stages.models"):  # last_checkpoint lives there
        metrics = cold_start_sft.run(cfg, ctx, callbacks=[Count(steps)])
    assert f"resuming from {ctx.work_dir / 'trainer' / 'checkpoint-2'}" in caplog.text
    assert metrics["global_step"] == 4
    assert steps == [3, 4]  # steps 1-2 came from the checkpoint, not retrained
    check_model_dir(ctx.out_dir / "model")


def Count(steps: list):  # noqa: N802
    """A TrainerCallback appending the global step after each optimizer step to `steps`."""
    from transformers import TrainerCallback

    class _Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    return _Count()


@pytest.mark.slow
def test_reasoning_rl_trains_with_rewards_and_callbacks(cold_start, world_dir, tmp_path):
    steps = []
    ctx = make_ctx(tmp_path, "reasoning-rl", {"world": world_dir, "cold-start": cold_start[0].out_dir})
    metrics = reasoning_rl.run(reasoning_rl.Config(**GRPO_TEST), ctx, callbacks=[Count(steps)])
    check_model_dir(ctx.out_dir / "model")
    assert steps == [1, 2] and metrics["global_step"] == 2
    logged = [h for h in metrics["history"] if "reward" in h]
    assert logged and all("rewards/accuracy_reward/mean" in h and "rewards/format_reward/mean" in h for h in logged)
    assert all("completions/mean_length" in h for h in logged)
    assert metrics["reward_weights"] == {"accuracy": 1.0, "format": 0.25, "language": 0.25}
    # the reward-hacking monitor runs in stage 2 too: a check at the start, quiet on a normal run
    assert metrics["monitor"]["checks"] >= 1 and metrics["monitor"]["alarms"] == [], metrics["monitor"]
    json.dumps(metrics)


@pytest.mark.slow
def test_evaluate_metrics(cold_start, world_dir):
    from stages.rewards import RewardsConfig

    cfg = evaluate.Config(**small.EVAL, num_samples=3)
    seen = []
    m = evaluate.evaluate(str(cold_start[0].out_dir / "model"), cfg, world_dir, RewardsConfig(), progress=seen.append)
    assert m["n_prompts"] == 6 and m["k"] == 2 and len(m["samples"]) == 3
    for key in ("pass@1", "greedy_accuracy", "format_rate"):
        assert 0.0 <= m[key] <= 1.0
    assert 0 < m["mean_completion_tokens"] <= 48
    assert {"prompt", "completion", "answer", "correct"} <= set(m["samples"][0])
    assert "mean_reward" in m and seen[-1] == 1.0
    json.dumps(m)


@pytest.mark.parametrize("module,bad", [
    (cold_start_sft, {"learning_rat": 1e-3}),
    (cold_start_sft, {"learning_rate": -1.0}),
    (cold_start_sft, {"output_dir": "/tmp/x"}),
    (reasoning_rl, {"num_generations": 0}),
    (reasoning_rl, {"bogus": 1}),
])
def test_trainer_args_are_validated(module, bad):
    with pytest.raises(ValueError):
        module.Config(trainer=bad)


def test_defaults_validate():
    cold_start_sft.Config()
    reasoning_rl.Config()
    evaluate.Config()


@pytest.mark.parametrize("logs, expected", [
    ({"loss": 0.53124, "learning_rate": 0.003, "epoch": 1.2}, "loss 0.531 · lr 0.003"),
    ({"loss": 0.1, "reward": 1.2105, "kl": 0.0021, "completions/mean_length": 77.06},
     "loss 0.1 · reward 1.21 · kl 0.0021 · completions/mean_length 77.1"),
    ({"train_runtime": 12.0, "train_loss": 0.4}, ""),
    (None, ""),
])
def test_live_metrics(logs, expected):
    from stages.models import live_metrics

    assert live_metrics(logs) == expected


def test_progress_callback_reports_metrics_while_training(caplog):
    """Each trainer log moves the progress artifact and shows the latest loss/reward in its description and in
    the run log (it used to show only `step N/M`)."""
    import logging
    from types import SimpleNamespace

    from stages.models import progress_callback

    class Rec:
        def __init__(self):
            self.seen = []

        def progress(self, fraction, message=""):
            self.seen.append((fraction, message))

    rec = Rec()
    cb = progress_callback(rec, "cold-start")
    with caplog.at_level(logging.INFO, logger="stages.models"):
        cb.on_log(None, SimpleNamespace(global_step=40, max_steps=320), None, logs={"loss": 0.5312, "learning_rate": 3e-3})
        cb.on_log(None, SimpleNamespace(global_step=320, max_steps=320), None, logs={"train_runtime": 99.0})
    assert rec.seen == [(0.125, "cold-start: step 40/320 · loss 0.531 · lr 0.003")]
    assert "cold-start: step 40/320 · loss 0.531 · lr 0.003" in caplog.text
