"""Stage 4 (preference-rl): reward routing, prompt mixing, DPO pair building, config checks, and
real runs on a small tiny world (GRPO and DPO modes).

The session fixtures here (`tiny_world`, `stage3_policy`, `tiny_reward_model`) are shared with
test_monitor.py and test_reward_model.py. They are built once and cached under pytest's cache dir,
keyed by the source of the modules that make them, so a re-run reuses them."""

import json
import math
from pathlib import Path

import pytest
from conftest import source_cache
from pydantic import ValidationError

from stages.common import StageContext, UserError
from stages.rm_guard import CANARY_NAMES
from stages.preference_rl import (
    GENERAL,
    REASONING,
    Config,
    Routed,
    answer_view,
    build_pairs,
    general_report,
    guard_rows,
    guarded_weights,
    length_controlled,
    length_only_rise,
    prompt_mix,
    stage4_summary,
    total_rewards,
)


def user(text):
    return [{"role": "user", "content": text}]


def chat(text):
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------------------------------ fixtures

SMALL_WORLD = dict(n_cold_start=800, n_rl_prompts=400, n_eval=64, n_general_sft=300, n_general_prompts=120,
                   n_general_eval=24, n_preference=600, pretrain_steps=150, pretrain_corpus_lines=6000, judge=False)
SFT_ARGS = dict(num_train_epochs=6, per_device_train_batch_size=32, learning_rate=3e-3, lr_scheduler_type="cosine",
                warmup_steps=10, logging_steps=20, save_strategy="no", gradient_checkpointing=False, bf16=False,
                max_length=256)


def _cache_dir(request, name: str, *sources: str, recipe: object = None) -> Path:
    """A pytest-cache folder for stage-4 test assets, keyed by their sources and the recipes."""
    return source_cache(request, f"stage4-{name}", sources, (SMALL_WORLD, SFT_ARGS) + ((recipe,) if recipe else ()))


@pytest.fixture(scope="session")
def tiny_world(request) -> Path:
    """A small tiny world (data + pretrained base model), built once."""
    from stages.tiny import world

    out = _cache_dir(request, "world", "stages/tiny/world.py") / "world"
    if not (out / "base_model" / "config.json").is_file():
        ctx = StageContext(out_dir=out, work_dir=out.parent / "work", inputs={}, pipeline=None, seed=0)
        world.run(world.Config(**SMALL_WORLD), ctx)
    return out


@pytest.fixture(scope="session")
def stage3_policy(request, tiny_world) -> Path:
    """A stand-in for the stage-3 model: the base model fine-tuned (TRL SFTTrainer, completion-only
    loss) on the world's cold-start and general SFT data."""
    import datasets
    import trl

    out = _cache_dir(request, "policy", "stages/tiny/world.py") / "model"
    if (out / "config.json").is_file():
        return out
    from stages.data import load

    rows = list(load("world:cold_start", tiny_world)) + list(load("world:general_sft", tiny_world))
    train = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    args = trl.SFTConfig(output_dir=str(out.parent / "trainer"), use_cpu=True, report_to="none", seed=0, **SFT_ARGS)
    trainer = trl.SFTTrainer(model=str(tiny_world / "base_model"), args=args, train_dataset=train)
    trainer.train()
    trainer.save_model(str(out))
    return out


# The reward models below are trained with synthetic negatives (stages/rm_guard.py) at 0.5 per pair, and
# record a failing guard instead of stopping (`zero-weight`), so the tests can look at what it found.
RM_CONFIG = dict(synthetic_negatives=0.5, guard={"on_fail": "zero-weight"})
# The small test world's reward model ranks the good answer above every degenerate canary, but cannot
# tell the answer to another question from the right one (measured: the reference wins on 19 of 40
# prompts); runs that are not about the guard show it the other five canaries.
BAD_RM_CONFIG = dict(guard={"on_fail": "zero-weight"})
TRUSTED_CANARIES = {"canaries": [n for n in CANARY_NAMES if n != "other-question"]}


@pytest.fixture(scope="session")
def tiny_reward_model(request, tiny_world) -> Path:
    """The reward-model stage run on the tiny world's preference pairs; returns its version folder."""
    from stages import reward_model

    out = _cache_dir(request, "rm", "stages/tiny/world.py", "stages/reward_model.py", "stages/rm_guard.py",
                     recipe=RM_CONFIG) / "version"
    if not (out / "metrics.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(out_dir=out, work_dir=out.parent / "work", inputs={"world": tiny_world}, pipeline=None, seed=0)
        metrics = reward_model.run(reward_model.Config(**RM_CONFIG), ctx)
        (out / "metrics.json").write_text(json.dumps(metrics))
    return out


@pytest.fixture(scope="session")
def loop_loving_reward_model(request, tiny_world) -> Path:
    """A reward model trained on the tiny world's pairs with chosen and rejected swapped where the
    rejected answer is `repetitive` or `overlong`: it prefers loops and length. Its version folder."""
    from stages import reward_model
    from stages.data import load

    out = _cache_dir(request, "bad-rm", "stages/tiny/world.py", "stages/reward_model.py", "stages/rm_guard.py",
                     recipe=BAD_RM_CONFIG) / "version"
    if not (out / "metrics.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for r in load("world:preference", tiny_world):
            if r["rejected_kind"] in ("repetitive", "overlong"):
                r = {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
            rows.append(r)
        data = out.parent / "swapped.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        ctx = StageContext(out_dir=out, work_dir=out.parent / "work", inputs={"world": tiny_world}, pipeline=None, seed=0)
        metrics = reward_model.run(reward_model.Config(dataset=str(data), **BAD_RM_CONFIG), ctx)
        (out / "metrics.json").write_text(json.dumps(metrics))
    return out


# ------------------------------------------------------------------------------------------ routing

def record(name, calls):
    def func(completions, **columns):
        calls.append((name, list(completions), {k: v for k, v in columns.items() if isinstance(v, list)}))
        return [float(len(c)) for c in completions]
    func.__name__ = name
    return func


@pytest.mark.parametrize("kinds", [
    [REASONING, GENERAL, REASONING, GENERAL],
    [REASONING] * 4,
    [GENERAL] * 4,
    [GENERAL, GENERAL, REASONING, REASONING],
])
def test_routed_rewards_reach_only_their_rows(kinds):
    calls = []
    rule, rm = Routed(record("rule", calls), REASONING), Routed(record("rm", calls), GENERAL)
    completions = ["a", "bb", "ccc", "dddd"]
    answers = ["1", None, "3", None]
    r_rule = rule(completions, kind=kinds, answer=answers, prompts=["p0", "p1", "p2", "p3"], trainer_state=object())
    r_rm = rm(completions, kind=kinds, answer=answers, prompts=["p0", "p1", "p2", "p3"])
    for i, k in enumerate(kinds):
        if k == REASONING:
            assert r_rule[i] == len(completions[i]) and r_rm[i] is None
        else:
            assert r_rm[i] == len(completions[i]) and r_rule[i] is None
    # each function saw only its rows, with the per-row columns sliced to match
    for name, seen, columns in calls:
        want = [i for i, k in enumerate(kinds) if k == (REASONING if name == "rule" else GENERAL)]
        assert seen == [completions[i] for i in want]
        assert columns["prompts"] == [f"p{i}" for i in want]
        assert columns["answer"] == [answers[i] for i in want]
    assert {name for name, _, _ in calls} == {n for n, k in (("rule", REASONING), ("rm", GENERAL)) if k in kinds}


def test_routed_keeps_name_and_needs_kind():
    from stages.rewards import build_reward_funcs, RewardsConfig

    funcs, _ = build_reward_funcs(RewardsConfig())
    routed = Routed(funcs[0], REASONING)
    assert routed.__name__ == "accuracy_reward"
    with pytest.raises(UserError, match="kind"):
        routed(["x"], answer=["1"])


def test_routed_rule_rewards_score_reasoning_rows():
    from stages.rewards import RewardsConfig, build_reward_funcs

    funcs, weights = build_reward_funcs(RewardsConfig(weights={"accuracy": 1.0, "format": 0.5}))
    routed = [Routed(f, REASONING) for f in funcs]
    completions = [chat("<think>r</think><answer>5</answer>"), chat("<think>r</think><answer>Paris</answer>"),
                   chat("<think>r</think><answer>6</answer>")]
    columns = {"kind": [REASONING, GENERAL, REASONING], "answer": ["5", None, "5"], "language": ["en", None, "en"]}
    totals = total_rewards(routed, weights, [user("q")] * 3, completions, columns)
    assert totals == [1.5, 0.0, 0.5]
    assert routed[0](completions, **columns) == [1.0, None, 0.0]


@pytest.mark.parametrize("text, expected", [
    ("<think>long reasoning</think><answer>The capital is Paris.</answer>", "The capital is Paris."),
    ("no tags at all", "no tags at all"),
    ("<think>r</think><answer>a</answer><answer>b</answer>", "<think>r</think><answer>a</answer><answer>b</answer>"),
    (chat("<think>x</think><answer>42</answer>"), "42"),
])
def test_answer_view(text, expected):
    assert answer_view(text) == expected


# ------------------------------------------------------------------------------------------ mixing and pairs

REASON_ROWS = [{"prompt": user(f"r{i}"), "answer": i, "language": "en"} for i in range(40)]
GENERAL_ROWS = [{"prompt": user(f"g{i}")} for i in range(10)]


@pytest.mark.parametrize("share, num, n_general, n_total", [
    (0.5, None, 10, 20),     # limited by the 10 general rows
    (0.2, None, 10, 50),     # 10 general are 20% of 50
    (0.0, None, 0, 40),
    (1.0, None, 10, 10),
    (0.25, 16, 4, 16),
    (0.5, 60, 30, 60),       # more than available: rows repeat, evenly
])
def test_prompt_mix(share, num, n_general, n_total):
    rows = prompt_mix(REASON_ROWS, GENERAL_ROWS, share, num, seed=0)
    assert len(rows) == n_total
    assert sum(r["kind"] == GENERAL for r in rows) == n_general
    for r in rows:
        if r["kind"] == GENERAL:
            assert r["answer"] is None and r["prompt"][0]["content"].startswith("g")
        else:
            assert isinstance(r["answer"], str) and r["prompt"][0]["content"].startswith("r")
    if n_general and n_general <= len(GENERAL_ROWS):
        assert len({r["prompt"][0]["content"] for r in rows if r["kind"] == GENERAL}) == n_general
    assert rows == prompt_mix(REASON_ROWS, GENERAL_ROWS, share, num, seed=0)


def test_prompt_mix_errors():
    with pytest.raises(UserError, match="general_prompts"):
        prompt_mix(REASON_ROWS, [], 0.5, None, 0)
    with pytest.raises(UserError, match="prompts"):
        prompt_mix([], GENERAL_ROWS, 0.5, None, 0)


@pytest.mark.parametrize("scores, min_margin, expect", [
    ([0.0, 1.0, 0.5, -1.0], 0.5, ("b", "d")),
    ([1.0, 1.0, 1.0, 1.0], 0.0, None),        # all tied: no preference, even at margin 0
    ([0.2, 0.1, 0.3, 0.25], 0.5, None),       # spread below the margin
    ([2.0, -2.0, 0.0, 0.0], 4.0, ("a", "b")), # exactly the margin counts
])
def test_build_pairs(scores, min_margin, expect):
    row = {"prompt": user("q"), "kind": GENERAL}
    pairs = build_pairs([row], [["a", "b", "c", "d"]], [scores], min_margin)
    if expect is None:
        assert pairs == []
    else:
        (pair,) = pairs
        assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == expect
        assert pair["prompt"] == row["prompt"] and pair["kind"] == GENERAL
        assert pair["margin"] == pytest.approx(max(scores) - min(scores))


def test_build_pairs_skips_identical_texts():
    assert build_pairs([{"prompt": user("q"), "kind": GENERAL}], [["same", "same"]], [[1.0, 0.0]], 0.5) == []


# ------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("bad, where", [
    ({"mode": "ppo"}, "mode"),
    ({"trainer": {"learning_rate": -1}}, "learning_rate"),
    ({"trainer": {"not_a_field": 1}}, "not_a_field"),
    ({"trainer": {"reward_weights": [1.0]}}, "reward_weights"),
    ({"trainer": {"output_dir": "x"}}, "output_dir"),
    ({"dpo_trainer": {"num_generations": 4}}, "num_generations"),  # a GRPO field is not a DPO field
    ({"general_share": 1.5}, "general_share"),
    ({"helpfulness_weight": -1}, "helpfulness_weight"),
    ({"dpo": {"generation": {"n": 1}}}, "n must be"),
    ({"dpo": {"generation": {"temperature": 0}}}, "temperature"),
    ({"rewards": {"weights": {"bogus": 1.0}}}, "bogus"),
    ({"monitor": {"eval_every": 0}}, "eval_every"),
    ({"monitor": {"general_max_length_growth": -1}}, "general_max_length_growth"),
    ({"rm_guard": {"on_fail": "warn"}}, "on_fail"),
    ({"rm_guard": {"canaries": ["flattery"]}}, "unknown canary"),
    ({"rm_guard": {"min_pass_share": 2}}, "min_pass_share"),
    ({"unknown": 1}, "unknown"),
])
def test_config_rejects(bad, where):
    with pytest.raises(ValidationError, match=where):
        Config(**bad)


def test_config_accepts_both_trainers():
    cfg = Config(mode="dpo", trainer={"max_steps": 3, "num_generations": 4}, dpo_trainer={"beta": 0.2})
    assert cfg.mode == "dpo" and cfg.dpo_trainer == {"beta": 0.2}


def test_missing_upstream_is_a_user_error(tmp_path):
    from stages import preference_rl

    ctx = StageContext(out_dir=tmp_path / "out", work_dir=tmp_path / "w", inputs={}, pipeline=None)
    with pytest.raises(UserError, match="rejection-sft"):
        preference_rl.run(Config(), ctx)


# ------------------------------------------------------------------------------------------ guard and report

@pytest.mark.parametrize("guard, weights, expected", [
    (None, {}, (1.0, 1.0)),                                                       # guard off
    ({"passed": True, "action": "trusted"}, {"helpfulness_weight": 0.5}, (0.5, 1.0)),
    ({"passed": False, "action": "zero-weight"}, {}, (0.0, 0.0)),
    ({"passed": False, "action": "zero-weight"}, {"harmlessness_weight": 3.0}, (0.0, 0.0)),
    ({"passed": False, "action": "stop"}, {}, (1.0, 1.0)),                         # (stopped before training)
])
def test_guarded_weights(guard, weights, expected):
    assert guarded_weights(Config(**weights), guard) == expected


@pytest.mark.parametrize("before, after, delta, controlled, only_length", [
    # score = 0.1 x length in both models: the whole rise is length
    (([1.0, 2.0, 3.0], [10, 20, 30]), ([4.0, 5.0, 6.0], [40, 50, 60]), 3.0, 0.0, True),
    # same lengths, better scores: all of it survives the control
    (([1.0, 2.0, 3.0], [10, 20, 30]), ([2.0, 3.0, 4.0], [10, 20, 30]), 1.0, 1.0, False),
    # longer and better at matched length (+1 at every length, slope 0.1)
    (([1.0, 2.0, 3.0], [10, 20, 30]), ([3.0, 4.0, 5.0], [20, 30, 40]), 2.0, 1.0, False),
    # shorter answers and a lower score that is all length: at matched length no change
    (([4.0, 5.0, 6.0], [40, 50, 60]), ([1.0, 2.0, 3.0], [10, 20, 30]), -3.0, 0.0, False),
    # no spread of lengths within either model: slope 0, no control possible
    (([1.0, 1.0], [10, 10]), ([2.0, 2.0], [20, 20]), 1.0, 1.0, False),
    # mostly length: 2.5 of a 3.0 rise
    (([1.0, 2.0, 3.0], [10, 20, 30]), ([4.0, 5.0, 6.0], [35, 45, 55]), 3.0, 0.5, True),
])
def test_length_controlled(before, after, delta, controlled, only_length):
    lc = length_controlled(before[0], before[1], after[0], after[1])
    assert lc["delta"] == pytest.approx(delta, abs=1e-4)
    assert lc["delta_length_controlled"] == pytest.approx(controlled, abs=1e-4)
    assert lc["delta_from_length"] == pytest.approx(delta - controlled, abs=1e-4)
    assert length_only_rise(lc) is only_length


def _scored(mean, scores, lengths, rep=0.1, d2=0.8, acc=None):
    return {"mean": mean, "scores": scores, "lengths": lengths, "mean_tokens": sum(lengths) / len(lengths),
            "repetition": rep, "distinct_2": d2, "general_accuracy": acc}


def test_general_report_makes_a_length_only_rise_visible():
    before = _scored(2.0, [1.0, 2.0, 3.0], [10, 20, 30], acc=0.5)
    after = _scored(5.0, [4.0, 5.0, 6.0], [40, 50, 60], rep=0.4, d2=0.3, acc=0.25)
    report = general_report(before, after)
    assert report["length_only_rise"] is True
    assert report["before"] == {"rm_score": 2.0, "rm_score_length_controlled": 2.0, "mean_tokens": 20.0,
                                "repetition": 0.1, "distinct_2": 0.8, "general_accuracy": 0.5}
    assert report["after"]["rm_score"] == 5.0 and report["after"]["rm_score_length_controlled"] == pytest.approx(2.0)
    assert report["change"] == pytest.approx({"rm_score": 3.0, "rm_score_length_controlled": 0.0, "mean_tokens": 30.0,
                                              "repetition": 0.3, "distinct_2": -0.5, "general_accuracy": -0.25})
    summary = stage4_summary({"heldout_general": report, "rm_guard": None})
    assert summary == {"rm_score_delta": 3.0, "rm_score_delta_length_controlled": 0.0, "general_mean_tokens": 50.0,
                       "general_repetition": 0.4, "general_distinct_2": 0.3, "general_accuracy": 0.25,
                       "rm_length_only_rise": True, "rm_guard": "off"}


def test_general_report_without_references():
    report = general_report(_scored(1.0, [1.0, 1.0], [5, 6]), _scored(1.5, [1.5, 1.5], [5, 6]))
    assert report["change"]["general_accuracy"] is None and not report["length_only_rise"]
    assert "general_accuracy" not in stage4_summary({"heldout_general": report})


@pytest.mark.parametrize("guard, shown", [
    ({"passed": True, "action": "trusted"}, "passed"),
    ({"passed": False, "action": "zero-weight", "failed_canaries": ["padded", "gibberish"]},
     "FAILED: zero-weight (padded, gibberish)"),
])
def test_summary_says_what_the_guard_did(guard, shown):
    assert stage4_summary({"rm_guard": guard})["rm_guard"] == shown


def _guard_ctx(tmp_path, general_rows):
    world = tmp_path / "world"
    (world / "data").mkdir(parents=True)
    (world / "data" / "general_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in general_rows))
    (world / "data" / "pairs.jsonl").write_text(json.dumps({"prompt": user("q"), "chosen": chat("a"), "rejected": chat("b")}) + "\n")
    return StageContext(out_dir=tmp_path / "out", work_dir=tmp_path / "w", inputs={"world": world}, pipeline=None)


def test_guard_rows_sources(tmp_path):
    ctx = _guard_ctx(tmp_path, [{"prompt": user("g")}])
    rm_version = tmp_path / "rm-version"
    (rm_version / "model").mkdir(parents=True)
    # the held-out pairs the reward-model stage wrote next to its model
    (rm_version / "heldout_pairs.jsonl").write_text(json.dumps({"prompt": user("h"), "chosen": chat("held")}) + "\n")
    assert guard_rows(Config(), ctx, str(rm_version / "model"))[0]["chosen"] == chat("held")
    # rm_guard.dataset wins
    rows = guard_rows(Config(rm_guard={"dataset": "world:pairs"}), ctx, str(rm_version / "model"))
    assert rows[0]["chosen"] == chat("a")
    # a named reward model with nothing next to it and no `chosen` in eval_general: say what to set
    with pytest.raises(UserError, match="rm_guard.dataset"):
        guard_rows(Config(), ctx, "org/some-reward-model")
    with pytest.raises(UserError, match="chosen"):
        guard_rows(Config(rm_guard={"dataset": "world:general_eval"}), ctx, "org/some-reward-model")


def test_guard_rows_fall_back_to_eval_general_with_chosen(tmp_path):
    ctx = _guard_ctx(tmp_path, [{"prompt": "plain?", "chosen": [{"role": "user", "content": "plain?"},
                                                                {"role": "assistant", "content": "yes"}]}])
    rows = guard_rows(Config(), ctx, "org/some-reward-model")
    assert rows[0]["prompt"] == user("plain?") and rows[0]["chosen"][-1]["content"] == "yes"


def test_guard_runs_before_any_model_is_loaded(tmp_path, monkeypatch):
    # A failing guard stops the stage before training: the policy is never touched.
    import stages.reward_model as reward_model
    import stages.rm_guard as rm_guard
    from stages import preference_rl

    stage3 = tmp_path / "stage3" / "model"
    stage3.mkdir(parents=True)
    (stage3 / "config.json").write_text("{}")
    rm_version = tmp_path / "rm"
    (rm_version / "model").mkdir(parents=True)
    (rm_version / "heldout_pairs.jsonl").write_text("".join(
        json.dumps({"prompt": user(f"What is {i}?"), "chosen": chat(f"<think>t</think><answer>{i}</answer>")}) + "\n"
        for i in range(6)))
    monkeypatch.setattr(reward_model, "load_reward_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(rm_guard, "rm_scorer", lambda *a, **k: lambda prompts, texts: [len(t) / 10 for t in texts])
    ctx = StageContext(out_dir=tmp_path / "out", work_dir=tmp_path / "w", pipeline=None,
                       inputs={"rejection-sft": stage3.parent, "reward-model": rm_version})
    with pytest.raises(UserError, match=r"preference-rl: reward-model guard failed.*padded"):
        preference_rl.run(Config(), ctx)


# ------------------------------------------------------------------------------------------ real runs

def _stage_ctx(tmp_path, world, policy, rm_version) -> StageContext:
    stage3 = tmp_path / "stage3"
    stage3.mkdir()
    (stage3 / "model").symlink_to(policy)
    return StageContext(out_dir=tmp_path / "out", work_dir=tmp_path / "work",
                        inputs={"world": world, "rejection-sft": stage3, "reward-model": rm_version},
                        pipeline=None, seed=0)


@pytest.mark.slow
def test_rm_rewards_route_on_real_reward_model(tiny_world, tiny_reward_model):
    from stages.preference_rl import build_rewards
    from stages.reward_model import load_reward_model

    rm, tok = load_reward_model(str(tiny_reward_model / "model"))
    funcs, weights = build_rewards(Config(), rm, tok)
    assert [f.__name__ for f in funcs] == ["accuracy_reward", "format_reward", "helpfulness_reward", "harmlessness_reward"]
    prompts = [user("What is 12 + 5?"), user("What is the capital of France?")]
    completions = [chat("<think>12 + 5. 2+5=7, write 7 carry 0.</think><answer>17</answer>"),
                   chat("<think>The user asks about France.</think><answer>The capital of France is Paris.</answer>")]
    columns = {"kind": [REASONING, GENERAL], "answer": ["17", None], "language": ["en", None]}
    out = [f(completions, prompts=prompts, **columns) for f in funcs]
    assert out[0] == [1.0, None] and out[1] == [1.0, None]
    assert out[2][0] is None and out[3][0] is None
    assert isinstance(out[2][1], float) and isinstance(out[3][1], float)


@pytest.mark.slow
def test_dpo_mode_runs_on_tiny_world(tiny_world, stage3_policy, tiny_reward_model, tmp_path):
    from stages import preference_rl

    cfg = Config(mode="dpo", dpo={"num_prompts": 48, "generation": {"n": 4, "temperature": 1.0}, "min_margin": 0.3},
                 dpo_trainer={"num_train_epochs": 1, "per_device_train_batch_size": 8}, rm_guard=TRUSTED_CANARIES,
                 monitor={"eval_every": 2, "n_prompts": 8, "max_new_tokens": 128, "general_n_prompts": 4})
    ctx = _stage_ctx(tmp_path, tiny_world, stage3_policy, tiny_reward_model)
    metrics = preference_rl.run(cfg, ctx)
    assert (ctx.out_dir / "model" / "model.safetensors").is_file()
    pairs = [json.loads(line) for line in (ctx.out_dir / "dpo_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == metrics["dpo_pairs"]["pairs"] > 0
    assert all(p["margin"] >= 0.3 for p in pairs)
    assert any("rewards/margins" in row for row in metrics["history"])
    assert isinstance(metrics["heldout_rm_score_before"], float) and isinstance(metrics["heldout_rm_score_after"], float)
    assert metrics["monitor"]["checks"] >= 2


@pytest.mark.slow
def test_grpo_mode_runs_with_routed_rewards(tiny_world, stage3_policy, tiny_reward_model, tmp_path):
    from stages import preference_rl

    cfg = Config(num_prompts=64, trainer={"max_steps": 4, "per_device_train_batch_size": 16, "num_generations": 8},
                 rm_guard=TRUSTED_CANARIES, monitor={"eval_every": 2, "n_prompts": 8, "max_new_tokens": 128,
                                                     "general_n_prompts": 4})
    ctx = _stage_ctx(tmp_path, tiny_world, stage3_policy, tiny_reward_model)
    metrics = preference_rl.run(cfg, ctx)
    # the guard ran on the reward-model stage's held-out pairs and trusted the model
    assert metrics["rm_guard"]["passed"] and metrics["rm_guard"]["action"] == "trusted"
    assert metrics["reward_model_weights"] == {"helpfulness": 1.0, "harmlessness": 1.0}
    assert metrics["summary"]["rm_guard"] == "passed"
    # the monitor watched the general half too
    assert all(row["general_mean_length"] > 0 and "general_repetition" in row for row in metrics["monitor"]["history"])
    # honest report: score, length-controlled score, length, repetition, distinct-2, with samples
    report = metrics["heldout_general"]
    for side in ("before", "after"):
        assert set(report[side]) == {"rm_score", "rm_score_length_controlled", "mean_tokens", "repetition",
                                     "distinct_2", "general_accuracy"}
        assert len(metrics["heldout_general_samples"][side]) == 5
        assert {"repetition", "distinct_2", "mean_tokens"} <= set(metrics["heldout_rm_detail"][side])
    assert report["before"]["rm_score"] == metrics["heldout_rm_score_before"]
    assert metrics["heldout_rm_score_delta_length_controlled"] == report["delta_length_controlled"]
    assert {"rm_score_delta", "rm_score_delta_length_controlled", "general_mean_tokens", "general_repetition",
            "general_distinct_2", "rm_length_only_rise", "rm_guard"} <= set(metrics["summary"])
    assert (ctx.out_dir / "model" / "model.safetensors").is_file()
    logged = [row for row in metrics["history"] if "reward" in row]
    assert len(logged) == 4
    # both halves of the routed reward were applied during training
    def applied(key):  # TRL logs NaN for a step where no row of that kind came up
        return any(isinstance(row.get(key), float) and math.isfinite(row[key]) for row in logged)
    assert applied("rewards/accuracy_reward/mean") and applied("rewards/helpfulness_reward/mean")
    assert metrics["train_prompts"] == {REASONING: 32, GENERAL: 32}


@pytest.mark.slow
def test_stage_ends_on_healthy_checkpoint_when_monitor_stops_it(tiny_world, stage3_policy, tiny_reward_model, tmp_path):
    # A bound no text can meet: the first check after the start raises an alarm, training stops and
    # the version's model is the last healthy one -- here the starting (stage-3) weights themselves.
    from safetensors.torch import load_file

    from stages import preference_rl

    cfg = Config(num_prompts=64, trainer={"max_steps": 8, "learning_rate": 1e-3}, rm_guard=TRUSTED_CANARIES,
                 monitor={"eval_every": 2, "n_prompts": 8, "max_new_tokens": 96, "min_distinct2": 0.99,
                          "general_n_prompts": 4})
    ctx = _stage_ctx(tmp_path, tiny_world, stage3_policy, tiny_reward_model)
    metrics = preference_rl.run(cfg, ctx)
    mon = metrics["monitor"]
    assert mon["stopped_early"] and mon["healthy_step"] == 0 and mon["alarms"][0]["step"] == 2
    assert [row["step"] for row in mon["history"]] == [0, 2]
    final, start = load_file(str(ctx.out_dir / "model" / "model.safetensors")), load_file(str(stage3_policy / "model.safetensors"))
    assert final.keys() == start.keys() and all(final[k].equal(start[k]) for k in start)


@pytest.mark.slow
def test_guard_stops_stage4_with_a_reward_model_that_loves_loops_and_length(tiny_world, stage3_policy,
                                                                            loop_loving_reward_model, tmp_path):
    from stages import preference_rl

    ctx = _stage_ctx(tmp_path, tiny_world, stage3_policy, loop_loving_reward_model)
    # the good answers of the world's pairs as references (this model's own held-out pairs are swapped)
    with pytest.raises(UserError) as err:
        preference_rl.run(Config(rm_guard={"dataset": "world:preference"}), ctx)
    message = str(err.value)
    assert message.startswith("preference-rl: reward-model guard failed"), message
    assert "repetition-loop" in message and "padded" in message
    assert not (ctx.out_dir / "model").exists()


@pytest.mark.slow
def test_zero_weight_trains_without_the_reward_model_and_says_so(tiny_world, stage3_policy, loop_loving_reward_model,
                                                                 tmp_path):
    from stages import preference_rl

    cfg = Config(num_prompts=32, trainer={"max_steps": 2, "per_device_train_batch_size": 16, "num_generations": 8},
                 rm_guard={"dataset": "world:preference", "on_fail": "zero-weight"}, monitor={"enabled": False})
    ctx = _stage_ctx(tmp_path, tiny_world, stage3_policy, loop_loving_reward_model)
    metrics = preference_rl.run(cfg, ctx)
    assert (ctx.out_dir / "model" / "model.safetensors").is_file()
    guard = metrics["rm_guard"]
    assert not guard["passed"] and guard["action"] == "zero-weight"
    assert {"repetition-loop", "padded"} <= set(guard["failed_canaries"])
    assert metrics["reward_model_weights"] == {"helpfulness": 0.0, "harmlessness": 0.0}
    assert metrics["summary"]["rm_guard"].startswith("FAILED: zero-weight (")
    # the report still scores with the reward model (as configured), to show what it would have paid
    assert metrics["heldout_rm_score_before"] != 0.0
