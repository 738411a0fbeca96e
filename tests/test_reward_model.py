"""Reward-model stage: config checks, loading errors, and the real tiny-world reward model trained
with TRL's RewardTrainer (held-out pairwise accuracy, scoring that does not depend on batching)."""

import json

import pytest
from pydantic import ValidationError

from stages.common import UserError
from stages.reward_model import Config, load_reward_model, pairwise_accuracy, score
from test_preference_rl import stage3_policy, tiny_reward_model, tiny_world  # noqa: F401  (shared session fixtures)


@pytest.mark.parametrize("bad, where", [
    ({"trainer": {"no_such_field": 1}}, "no_such_field"),
    ({"trainer": {"seed": 3}}, "seed"),
    ({"trainer": {"learning_rate": 0}}, "learning_rate"),
    ({"heldout_fraction": 0}, "heldout_fraction"),
    ({"heldout_fraction": 1}, "heldout_fraction"),
    ({"score_batch_size": 0}, "score_batch_size"),
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
    assert set(metrics["heldout_accuracy_by_kind"]) == {"wrong", "rude", "repetitive", "overlong", "irrelevant", "no_format"}
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
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    polite = "<think>The user asks: What is the capital of France? The capital of France is Paris.</think>" \
             "<answer>Sure! The capital of France is Paris.</answer>"
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
