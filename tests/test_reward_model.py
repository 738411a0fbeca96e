"""Reward-model stage: config checks, loading errors, and the real tiny-world reward model trained
with TRL's RewardTrainer (held-out pairwise accuracy, scoring that does not depend on batching)."""

import json

import pytest
from pydantic import ValidationError

from stages.common import UserError
from stages.reward_model import Config, length_balance, length_balance_markdown, load_reward_model, pairwise_accuracy, score
from test_preference_rl import (  # noqa: F401  (shared session fixtures)
    loop_loving_reward_model,
    stage3_policy,
    tiny_reward_model,
    tiny_world,
)


@pytest.mark.parametrize("bad, where", [
    ({"trainer": {"no_such_field": 1}}, "no_such_field"),
    ({"trainer": {"seed": 3}}, "seed"),
    ({"trainer": {"learning_rate": 0}}, "learning_rate"),
    ({"heldout_fraction": 0}, "heldout_fraction"),
    ({"heldout_fraction": 1}, "heldout_fraction"),
    ({"score_batch_size": 0}, "score_batch_size"),
    ({"synthetic_negatives": -0.5}, "synthetic_negatives"),
    ({"guard": {"on_fail": "ignore"}}, "on_fail"),
    ({"guard": {"n_prompts": 0}}, "n_prompts"),
    ({"extra": True}, "extra"),
])
def test_config_rejects(bad, where):
    with pytest.raises(ValidationError, match=where):
        Config(**bad)


def test_config_accepts_reward_config_fields():
    cfg = Config(trainer={"center_rewards_coefficient": 0.01, "num_train_epochs": 1}, dataset={"path": "x.jsonl"})
    assert cfg.trainer["center_rewards_coefficient"] == 0.01


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no model folder"):
        load_reward_model(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_causal_lm_is_not_a_reward_model(tiny_world):  # noqa: F811
    # A causal LM loads as a 2-label classifier with a random head: refuse it instead of scoring noise.
    with pytest.raises(UserError, match="num_labels=1"):
        load_reward_model(str(tiny_world / "base_model"))


@pytest.mark.slow
def test_reward_model_learns_the_tiny_world_preferences(tiny_reward_model):  # noqa: F811
    metrics = json.loads((tiny_reward_model / "metrics.json").read_text())
    assert metrics["heldout_pairwise_accuracy"] >= 0.8, metrics
    assert metrics["n_heldout_pairs"] > 0 and metrics["n_train_pairs"] > metrics["n_heldout_pairs"]
    assert set(metrics["heldout_accuracy_by_kind"]) == {"wrong", "other-question", "overlong", "no_format", "rude",
                                                               "repetitive", "truncated"}
    assert metrics["history"] and "loss" in metrics["history"][0]
    model_dir = tiny_reward_model / "model"
    assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("*.bin"))


@pytest.mark.slow
def test_loads_and_scores_chosen_above_rejected(tiny_world, tiny_reward_model):  # noqa: F811
    from stages.data import load

    rm, tok = load_reward_model(str(tiny_reward_model / "model"))
    pairs = load("world:preference", tiny_world).select(range(60))
    result = pairwise_accuracy(rm, tok, pairs)
    assert result["pairwise_accuracy"] >= 0.8 and result["mean_margin"] > 0
    # a held-out general prompt (general_eval), answered in the world's chosen style and rudely
    prompt = [{"role": "user", "content": "Excuse me. Can you do math?"}]
    polite = "<think>The user asks what I can do.</think><answer>I can add numbers for you.</answer>"
    rude = "<think>Ugh.</think><answer>Figure it out yourself. I do not care, go away.</answer>"
    good, bad = score(rm, tok, [prompt, prompt], [polite, rude])
    assert good > bad


@pytest.mark.slow
def test_scores_do_not_depend_on_batching_or_message_form(tiny_world, tiny_reward_model):  # noqa: F811
    from stages.data import load

    rm, tok = load_reward_model(str(tiny_reward_model / "model"))
    pairs = load("world:preference", tiny_world).select(range(12))
    prompts = list(pairs["prompt"])
    texts = [c[0]["content"] for c in pairs["rejected"]]  # very different lengths: padding matters
    one_by_one = score(rm, tok, prompts, texts, batch_size=1)
    batched = score(rm, tok, prompts, texts, batch_size=12)
    as_messages = score(rm, tok, prompts, list(pairs["rejected"]), batch_size=5)
    assert batched == pytest.approx(one_by_one, abs=1e-4)
    assert as_messages == pytest.approx(one_by_one, abs=1e-4)
    with pytest.raises(ValueError):
        score(rm, tok, prompts, texts[:3])


def _pair(chosen, rejected, kind=None):
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": chosen}],
           "rejected": rejected}
    return {**row, "rejected_kind": kind} if kind else row


@pytest.mark.parametrize("pairs, expected", [
    ([_pair("long answer", "x"), _pair("ab", "abcd")], {"all": {"pairs": 2, "mean_chosen_chars": 6.5,
                                                               "mean_rejected_chars": 2.5, "chosen_longer_share": 0.5}}),
    ([_pair("aaaa", "a", "rude"), _pair("aaaa", "aa", "rude"), _pair("a", "aaaaaaaa", "overlong")],
     {"all": {"pairs": 3, "mean_chosen_chars": 3.0, "mean_rejected_chars": 3.7, "chosen_longer_share": 0.6667},
      "overlong": {"pairs": 1, "mean_chosen_chars": 1.0, "mean_rejected_chars": 8.0, "chosen_longer_share": 0.0},
      "rude": {"pairs": 2, "mean_chosen_chars": 4.0, "mean_rejected_chars": 1.5, "chosen_longer_share": 1.0}}),
    ([], {"all": {"pairs": 0, "mean_chosen_chars": 0.0, "mean_rejected_chars": 0.0, "chosen_longer_share": 0.0}}),
])
def test_length_balance(pairs, expected):
    balance = length_balance(pairs)
    assert balance == expected
    table = length_balance_markdown(balance)
    assert table.count("\n") == len(expected) + 1 and "| all |" in table


def test_config_fields_are_documented():
    assert all(f.description for f in Config.model_fields.values())
    assert Config().guard.enabled and Config().guard.on_fail == "stop" and Config().synthetic_negatives == 0.0


@pytest.mark.slow
def test_reward_model_stage_runs_the_guard_on_its_output(tiny_reward_model):  # noqa: F811
    from stages.rm_guard import CANARY_NAMES

    metrics = json.loads((tiny_reward_model / "metrics.json").read_text())
    assert metrics["n_synthetic_pairs"] == metrics["n_train_pairs"] // 2
    guard = metrics["rm_guard"]
    assert set(guard["win_share"]) == set(CANARY_NAMES) and guard["n_prompts"] == 40
    assert guard["passed"] == (not guard["failed_canaries"])
    assert metrics["summary"]["rm_guard"] == ("passed" if guard["passed"] else "FAILED")
    # the degenerate canaries score below the held-out chosen answer (measured: on every prompt)
    for name in ("repetition-loop", "punctuation-run", "newline-run", "padded", "gibberish"):
        assert guard["win_share"][name] >= 0.9, guard
    # the length balance of the training pairs is reported (the tiny world balances it: `overlong` and
    # `repetitive` rejections are longer than the chosen answer, `no_format` and `truncated` ones shorter)
    balance = metrics["length_balance"]
    assert balance["all"]["pairs"] == metrics["n_train_pairs"] and balance["overlong"]["chosen_longer_share"] == 0.0
    heldout = (tiny_reward_model / "heldout_pairs.jsonl").read_text().splitlines()
    assert len(heldout) == metrics["n_heldout_pairs"] and "chosen" in json.loads(heldout[0])


@pytest.mark.slow
def test_guard_fails_a_reward_model_that_loves_loops_and_length(loop_loving_reward_model):  # noqa: F811
    metrics = json.loads((loop_loving_reward_model / "metrics.json").read_text())
    guard = metrics["rm_guard"]
    assert not guard["passed"] and guard["action"] == "zero-weight"
    assert "repetition-loop" in guard["failed_canaries"], guard


@pytest.mark.slow
def test_failing_guard_stops_the_reward_model_stage(tiny_world, tmp_path):  # noqa: F811
    # Two training steps leave the score head random: it cannot rank the reference above all canaries.
    from stages import reward_model
    from stages.common import StageContext

    ctx = StageContext(out_dir=tmp_path / "out", work_dir=tmp_path / "work", inputs={"world": tiny_world},
                       pipeline=None, seed=0)
    with pytest.raises(UserError) as err:
        reward_model.run(Config(trainer={"max_steps": 2}), ctx)
    assert str(err.value).startswith("reward-model: reward-model guard failed") and "reference won" in str(err.value)
    assert "guard.on_fail: stop" in str(err.value)
