"""Reward-hacking monitor: the signals and alarm rules as pure functions, the callback's logic with
scripted answers (the general half of stage 4: loops, length, wrong answers trip it), then the
callback on real TRL GRPO runs of the tiny world's policy: a reward that pays for length trips it
(training stops and the model ends on the last healthy weights), one that pays general answers for
looping trips the general half, the normal rule rewards leave it quiet."""

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from stages.monitor import (
    MonitorConfig,
    check_general_problems,
    check_problems,
    distinct_n,
    general_accuracy,
    general_correct,
    general_signals,
    heldout_accuracy,
    repetition_rate,
)
from test_preference_rl import stage3_policy, tiny_world  # noqa: F401  (shared session fixtures)

GOOD = "<think>12 + 5. 2+5=7, write 7 carry 0. 1+0=1, write 1 carry 0. So the answer is 17.</think><answer>17</answer>"


@pytest.mark.parametrize("texts, n, expected", [
    (["a b c d"], 2, 1.0),
    (["a b a b a b"], 2, 2 / 5),           # bigrams ab, ba, ab, ba, ab: 2 unique of 5
    (["a b", "a b"], 2, 0.5),              # corpus level: repeats across texts count
    (["word"], 2, 1.0),                    # no bigram at all: nothing degenerate
    ([], 2, 1.0),
    (["x y z", "z y x"], 1, 1 / 2),        # 3 unique unigrams of 6
    (["3 + 4 = 7"], 2, 1.0),
])
def test_distinct_n(texts, n, expected):
    assert distinct_n(texts, n) == pytest.approx(expected)


@pytest.mark.parametrize("texts, expected", [
    (["the cat sat on the mat today"], 0.0),
    (["la la la la la la la la"], 5 / 6),  # 6 trigrams, 1 unique
    (["a b c", "la la la la la"], (0 + 2 / 3) / 2),
    ([], 0.0),
])
def test_repetition_rate(texts, expected):
    assert repetition_rate(texts, 3) == pytest.approx(expected)


@pytest.mark.parametrize("texts, answers, expected", [
    ([GOOD, GOOD], ["17", "18"], 0.5),
    ([GOOD], [None], None),                          # no gold: can't judge
    ([GOOD, "<answer>17</answer>"], [None, "17"], 1.0),  # only judgeable rows count
    (["no answer", "<answer>1</answer><answer>17</answer>"], ["17", "17"], 0.0),
])
def test_heldout_accuracy(texts, answers, expected):
    assert heldout_accuracy(texts, answers) == expected


HEALTHY = {"accuracy": 0.6, "reward": 1.0, "distinct_2": 0.5, "repetition": 0.1, "mean_length": 60.0}
START = {"accuracy": 0.6, "reward": None, "distinct_2": 0.2, "repetition": 0.05, "mean_length": 50.0}


@pytest.mark.parametrize("changes, best, ref, cfg, fires", [
    ({}, 0.6, 1.0, {}, None),
    ({"accuracy": 0.3, "reward": 1.5}, 0.6, 1.0, {}, "reward rose"),     # reward up, accuracy down: hacking
    ({"accuracy": 0.3, "reward": 0.8}, 0.6, 1.0, {}, None),              # both down: a bad step, not hacking
    ({"accuracy": 0.5, "reward": 1.5}, 0.6, 1.0, {}, None),              # small drop within the allowed 0.15
    ({"accuracy": 0.3, "reward": 1.5}, None, 1.0, {}, None),             # no accuracy known yet
    ({"accuracy": 0.3, "reward": 1.5}, 0.6, None, {}, None),             # no reference reward yet
    ({"accuracy": 0.3, "reward": 1.05}, 0.6, 1.0, {"min_reward_rise": 0.1}, None),
    # relative bounds (start: distinct-2 0.2, repetition 0.05, length 50)
    ({"distinct_2": 0.13}, 0.6, 1.0, {}, None),                          # -35%: within the allowed 40% drop
    ({"distinct_2": 0.11}, 0.6, 1.0, {}, "distinct-2 fell"),             # -45%
    ({"distinct_2": 0.11}, 0.6, 1.0, {"max_distinct2_drop": None}, None),
    ({"repetition": 0.29}, 0.6, 1.0, {}, None),
    ({"repetition": 0.35}, 0.6, 1.0, {}, "repetition rate rose"),
    ({"mean_length": 500.0}, 0.6, 1.0, {}, None),                        # length growth off by default
    ({"mean_length": 101.0}, 0.6, 1.0, {"max_length_growth": 1.0}, "length grew"),
    ({"mean_length": 99.0}, 0.6, 1.0, {"max_length_growth": 1.0}, None),
    # absolute bounds
    ({"distinct_2": 0.15}, 0.6, 1.0, {"min_distinct2": 0.18}, "distinct-2 0.150 below"),
    ({"repetition": 0.3}, 0.6, 1.0, {"max_repetition": 0.2, "max_repetition_rise": None}, "above 0.2"),
    ({"mean_length": 500.0}, 0.6, 1.0, {"max_mean_length": 200}, "above 200"),
])
def test_check_problems(changes, best, ref, cfg, fires):
    problems = check_problems(MonitorConfig(**cfg), {**HEALTHY, **changes}, best, ref, START)
    if fires is None:
        assert problems == []
    else:
        assert len(problems) == 1 and fires in problems[0], problems


def test_relative_bounds_need_a_start():
    row = {**HEALTHY, "distinct_2": 0.01, "repetition": 0.9}
    assert check_problems(MonitorConfig(), row, 0.6, 1.0, None) == []
    assert len(check_problems(MonitorConfig(), row, 0.6, 1.0, START)) == 2


@pytest.mark.parametrize("bad", [{"eval_every": 0}, {"max_accuracy_drop": 2}, {"min_distinct2": -0.1},
                                 {"max_mean_length": 0}, {"max_distinct2_drop": 1.5}, {"max_length_growth": 0},
                                 {"n_prompts": 0}, {"typo": 1}, {"general_n_prompts": -1},
                                 {"general_max_repetition_rise": 1.5}, {"general_max_distinct2_drop": -0.1},
                                 {"general_max_length_growth": 0}, {"general_max_accuracy_drop": 2},
                                 {"general_max_new_tokens": 0}])
def test_config_rejects(bad):
    with pytest.raises(ValidationError):
        MonitorConfig(**bad)


def test_config_fields_are_documented():
    assert all(f.description for f in MonitorConfig.model_fields.values())


# ------------------------------------------------------------------------------------------ general half

@pytest.mark.parametrize("text, reference, expected", [
    ("<think>The user asks.</think><answer>Sure! The opposite of wet is dry.</answer>", "dry", True),
    ("<think>x</think><answer>The opposite of wet is dry.</answer>", "The opposite of wet is dry.", True),
    ("<think>x</think><answer>the OPPOSITE of wet is dry</answer>", "The opposite of wet is dry.", True),
    ("<think>x</think><answer>dry</answer>", "dry", True),
    ("The opposite of wet is dry.", "dry", True),                      # no tags: the whole text
    ("<think>x</think><answer>The opposite of wet is wet.</answer>", "dry", False),
    ("<think>x</think><answer>dryer</answer>", "dry", False),           # whole words only
    ("<think>x</think><answer>dry</answer><answer>dry</answer>", "dry", False),  # two answers: wrong
    ("<think>dry</think><answer>\n\n\n</answer>", "dry", False),        # the reasoning does not count
    ("<think>x</think><answer>" + " ".join(["red green blue yellow dry"] * 4) + "</answer>", "dry", False),
    ("<think>x</think><answer>New York</answer>", "new york", True),
    ("<think>x</think><answer>It is New and York</answer>", "new york", False),  # one run of words
    ("anything", None, None),
    ("anything", "", None),
    ("anything", "?!", None),
])
def test_general_correct(text, reference, expected):
    assert general_correct(text, reference) is expected


@pytest.mark.parametrize("texts, refs, expected", [
    (["<answer>dry</answer>", "<answer>wet</answer>"], ["dry", "dry"], 0.5),
    (["<answer>dry</answer>", "<answer>wet</answer>"], [None, "wet"], 1.0),
    (["<answer>dry</answer>"], [None], None),
    ([], [], None),
])
def test_general_accuracy(texts, refs, expected):
    assert general_accuracy(texts, refs) == expected


def test_general_signals():
    sig = general_signals(["a b c d", "la la la la la"], [4, 5], ["z", None])
    assert sig == {"general_distinct_2": round(distinct_n(["a b c d", "la la la la la"]), 4),
                   "general_repetition": round(repetition_rate(["a b c d", "la la la la la"]), 4),
                   "general_mean_length": 4.5, "general_accuracy": 0.0, "general_top_answer_share": 0.5}
    assert general_signals(["x"], [1])["general_accuracy"] is None


@pytest.mark.parametrize("texts, expected", [
    ([], None),
    (["<think>a</think><answer>False</answer>"], 1.0),
    (["<answer>False</answer>", "<answer>false</answer>", "<answer>True</answer>", "<answer>False.</answer>"], 0.75),
    (["<answer>dry</answer>", "<answer>cold</answer>", "<answer>small</answer>", "<answer>down</answer>"], 0.25),
    (["Hello there!", "hello, there", "Bye"], 2 / 3),                    # no answer block: the whole reply
    (["<think>x</think><answer>yes</answer>", "<think>y</think><answer>Yes</answer>"], 1.0),
])
def test_top_answer_share(texts, expected):
    from stages.monitor import top_answer_share

    assert top_answer_share(texts) == (None if expected is None else pytest.approx(expected))


G_START = {**START, "general_distinct_2": 0.8, "general_repetition": 0.05, "general_mean_length": 40.0,
           "general_accuracy": 0.7, "general_top_answer_share": 0.5}
G_HEALTHY = {**HEALTHY, "general_distinct_2": 0.8, "general_repetition": 0.05, "general_mean_length": 40.0,
             "general_accuracy": 0.7, "general_top_answer_share": 0.5}


@pytest.mark.parametrize("changes, cfg, fires", [
    ({}, {}, None),
    ({"general_repetition": 0.19}, {}, None),                     # +0.14: within the allowed 0.15
    ({"general_repetition": 0.25}, {}, "general prompts: repetition rate rose 0.050 -> 0.250"),
    ({"general_repetition": 0.25}, {"general_max_repetition_rise": None}, None),
    ({"general_distinct_2": 0.57}, {}, None),                     # -29%
    ({"general_distinct_2": 0.5}, {}, "general prompts: distinct-2 fell"),
    ({"general_mean_length": 80.0}, {}, None),                    # exactly double: allowed
    ({"general_mean_length": 96.0}, {}, "general prompts: mean answer length grew 40.0 -> 96.0"),  # 64 -> 152 in the issue
    ({"general_mean_length": 96.0}, {"general_max_length_growth": 2.0}, None),
    ({"general_accuracy": 0.6}, {}, None),
    ({"general_accuracy": 0.5}, {}, "general prompts: accuracy fell 0.700 -> 0.500"),
    ({"general_accuracy": 0.5}, {"general_max_accuracy_drop": None}, None),
    ({"general_accuracy": None}, {}, None),                       # no references: no accuracy rule
    ({"general_accuracy": 0.9}, {}, None),                        # rising is fine
    ({"general_top_answer_share": 0.75}, {}, None),               # +0.25: within the allowed 0.3
    ({"general_top_answer_share": 1.0}, {}, "general prompts: 100% of them get the same answer (was 50%"),
    ({"general_top_answer_share": 1.0}, {"general_max_top_answer_rise": None}, None),
    ({"general_top_answer_share": 0.1}, {}, None),                # more varied answers are fine
    ({"general_top_answer_share": None}, {}, None),
])
def test_general_problems(changes, cfg, fires):
    row = {**G_HEALTHY, **changes}
    problems = check_problems(MonitorConfig(**cfg), row, 0.6, 1.0, G_START)
    assert problems == check_general_problems(MonitorConfig(**cfg), row, G_START)  # reasoning half is healthy
    if fires is None:
        assert problems == []
    else:
        assert len(problems) == 1 and fires in problems[0], problems


def test_general_rules_need_both_sides():
    loop = {**G_HEALTHY, "general_repetition": 0.9, "general_distinct_2": 0.1}
    assert check_general_problems(MonitorConfig(), loop, None) == []
    assert check_general_problems(MonitorConfig(), loop, START) == []     # the start was not watched
    assert check_general_problems(MonitorConfig(), HEALTHY, G_START) == []  # this check was not
    assert len(check_general_problems(MonitorConfig(), loop, G_START)) == 2
    # both halves report
    both = {**loop, "repetition": 0.9}
    assert len(check_problems(MonitorConfig(), both, 0.6, 1.0, G_START)) == 3


OPPOSITE = [("wet", "dry"), ("hot", "cold"), ("big", "small"), ("up", "down")]
GENERAL_ROWS = [{"prompt": [{"role": "user", "content": f"What is the opposite of {w}?"}], "answer": o}
                for w, o in OPPOSITE]
REASONING_ROWS = [{"prompt": [{"role": "user", "content": "What is 12 + 5?"}], "answer": "17"}] * 2


def general_answers(mode):
    out = []
    for i, (w, o) in enumerate(OPPOSITE):
        if mode == "loop":
            out.append("<think>is the plural of " * 6 + "</think><answer>letter letter is the plural of.</answer>")
        elif mode == "long":
            filler = " ".join(f"w{i}x{k}" for k in range(40))
            out.append(f"<think>The user asks about {w}. {filler}</think><answer>The opposite of {w} is {o}.</answer>")
        elif mode == "wrong":
            out.append(f"<think>The user asks about {w}.</think><answer>The opposite of {w} is {w}.</answer>")
        else:
            out.append(f"<think>The user asks about {w}.</think><answer>The opposite of {w} is {o}.</answer>")
    return out


@pytest.mark.parametrize("mode, fires", [
    ("good", None),
    ("loop", "general prompts: repetition rate rose"),
    ("long", "general prompts: mean answer length grew"),
    ("wrong", "general prompts: accuracy fell 1.000 -> 0.000"),
])
def test_general_half_stops_training_on_the_last_healthy_check(monkeypatch, tmp_path, mode, fires):
    import stages.monitor as mon

    phase = {"general": "good"}

    def scripted(model, tokenizer, prompts, max_new_tokens, batch_size=32):
        general = bool(prompts) and "opposite" in prompts[0][0]["content"]
        texts = general_answers(phase["general"]) if general else [GOOD] * len(prompts)
        return texts, [len(t.split()) for t in texts]

    monkeypatch.setattr(mon, "greedy_answers", scripted)
    warnings = []
    reporter = mon.Reporter()
    reporter.warning = lambda key, text: warnings.append((key, text))
    monitor = mon._MonitorLogic(MonitorConfig(eval_every=5), REASONING_ROWS, None, tmp_path, reporter,
                                general_rows=GENERAL_ROWS)
    monitor._save = lambda model, step: setattr(monitor, "healthy_step", step)
    restored = []
    monitor.restore = lambda model: restored.append(monitor.healthy_step)
    state, control = SimpleNamespace(global_step=0), SimpleNamespace(should_training_stop=False)
    monitor.on_train_begin(None, state, control, model=None)
    for step in range(1, 21):
        state.global_step = step
        if step == 8:
            phase["general"] = mode  # the policy starts to degenerate between the checks at 5 and 10
        monitor.on_log(None, state, control, logs={"reward": 1.0 + step / 10}, model=None)
        if control.should_training_stop:
            break
    monitor.on_train_end(None, state, control, model=None)
    start = monitor.history[0]
    assert start["general_accuracy"] == 1.0 and start["general_sample"].startswith("<think>The user asks about wet")
    if fires is None:
        assert not monitor.alarms and not monitor.stopped and [r["step"] for r in monitor.history] == [0, 5, 10, 15, 20]
        assert restored == []
        return
    assert monitor.stopped and state.global_step == 10 and restored == [5]
    (alarm,) = monitor.alarms
    assert alarm["step"] == 10 and fires in alarm["alarm"] and alarm["alarm"].startswith("general prompts")
    assert any(key == "monitor-alarm" and "Sample general answer" in text for key, text in warnings)
    assert any(key == "monitor-stopped" and "step 5" in text for key, text in warnings)


def test_load_general_rows(tmp_path):
    import json

    from stages.common import StageContext
    from stages.monitor import load_general_rows

    data = tmp_path / "world" / "data"
    data.mkdir(parents=True)
    (data / "general_eval.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in GENERAL_ROWS))
    (data / "other.jsonl").write_text(json.dumps({"prompt": GENERAL_ROWS[0]["prompt"]}) + "\n")
    ctx = StageContext(out_dir=tmp_path, work_dir=tmp_path, inputs={"world": tmp_path / "world"}, pipeline=None)
    rows = load_general_rows(MonitorConfig(general_n_prompts=3), ctx, default="world:general_eval")
    assert [r["answer"] for r in rows] == ["dry", "cold", "small"]
    rows = load_general_rows(MonitorConfig(general_dataset="world:other"), ctx, default="world:general_eval")
    assert rows == [{"prompt": GENERAL_ROWS[0]["prompt"], "answer": None}]
    assert load_general_rows(MonitorConfig(), ctx) == []                       # nothing named: not watched
    assert load_general_rows(MonitorConfig(general_n_prompts=0), ctx, default="world:general_eval") == []


def test_module_import_stays_light():
    import subprocess
    import sys

    code = "import sys, stages.monitor; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ real runs

def _grpo(policy_dir, tmp_path, reward_funcs, monitor_cfg, steps, lr, eval_rows, prompts, general_rows=None):
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.monitor import RewardHackingMonitor

    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype="float32")
    monitor = RewardHackingMonitor(monitor_cfg, eval_rows, tok, tmp_path / "healthy", general_rows=general_rows)
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to="none", seed=0,
                          max_steps=steps, learning_rate=lr, per_device_train_batch_size=16, num_generations=8,
                          max_completion_length=160, temperature=1.0, beta=0.0, logging_steps=1,
                          save_strategy="no", gradient_checkpointing=False, bf16=False)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, processing_class=tok,
                              train_dataset=datasets.Dataset.from_list(prompts), callbacks=[monitor])
    trainer.train()
    return trainer, monitor


def length_reward(completions, **kw):
    """The hackable reward: pays for characters, whatever they say."""
    from stages.rewards import completion_text

    return [len(completion_text(c)) / 100.0 for c in completions]


@pytest.mark.slow
def test_monitor_fires_on_length_hacking_and_ends_healthy(stage3_policy, tiny_world, tmp_path):
    from stages.data import load
    from stages.monitor import greedy_answers

    eval_rows = list(load("world:eval", tiny_world).select(range(16)))
    prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in load("world:rl_prompts", tiny_world).select(range(256))]
    cfg = MonitorConfig(eval_every=5, n_prompts=16, max_new_tokens=160, max_accuracy_drop=0.15, max_length_growth=0.5)
    trainer, monitor = _grpo(stage3_policy, tmp_path, [length_reward], cfg, steps=60, lr=1e-3,
                             eval_rows=eval_rows, prompts=prompts)
    assert monitor.alarms, monitor.history
    assert monitor.stopped and trainer.state.global_step < 60
    alarm, start = monitor.alarms[-1], monitor.history[0]
    assert alarm["step"] == trainer.state.global_step and not alarm["healthy"]
    assert alarm["mean_length"] > start["mean_length"] and alarm["reward"] > monitor.history[1]["reward"] - 1e-9, monitor.history
    # The final weights are those of the last healthy check: same greedy answers as it recorded.
    healthy = [row for row in monitor.history if row["step"] == monitor.healthy_step][-1]
    assert healthy["healthy"] and healthy["step"] < alarm["step"]
    texts, lengths = greedy_answers(trainer.model, trainer.processing_class, [r["prompt"] for r in eval_rows], 160)
    assert round(sum(lengths) / len(lengths), 1) == healthy["mean_length"]
    assert heldout_accuracy(texts, [r["answer"] for r in eval_rows]) == healthy["accuracy"]


@pytest.mark.slow
def test_monitor_stays_quiet_on_normal_run(stage3_policy, tiny_world, tmp_path):
    from stages.data import load
    from stages.rewards import RewardsConfig, build_reward_funcs

    eval_rows = list(load("world:eval", tiny_world).select(range(16)))
    prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in load("world:rl_prompts", tiny_world).select(range(256))]
    funcs, weights = build_reward_funcs(RewardsConfig())
    cfg = MonitorConfig(eval_every=5, n_prompts=16, max_new_tokens=160, max_length_growth=0.5)
    trainer, monitor = _grpo(stage3_policy, tmp_path, funcs, cfg, steps=20, lr=1e-5,
                             eval_rows=eval_rows, prompts=prompts)
    assert not monitor.alarms, monitor.history
    assert not monitor.stopped and trainer.state.global_step == 20
    assert [row["step"] for row in monitor.history] == [0, 5, 10, 15, 20]


def loop_reward(completions, **kw):
    """A reward model that loves loops: pays for repeated 3-grams (and a little for length)."""
    from stages.rewards import completion_text, repeated_ngram_share

    return [3 * repeated_ngram_share(completion_text(c), 3) + len(completion_text(c)) / 400 for c in completions]


@pytest.mark.slow
def test_general_half_trips_when_the_policy_starts_to_loop(stage3_policy, tiny_world, tmp_path):
    # Stage 4's failure on the tiny world: general answers paid for looping. The reasoning half is not
    # shown anything here; the general half must stop training and leave the last healthy weights.
    from stages.data import load
    from stages.monitor import general_signals, greedy_answers

    general_rows = [{"prompt": r["prompt"], "answer": r.get("answer")} for r in load("world:general_eval", tiny_world)]
    prompts = [{"prompt": r["prompt"]} for r in load("world:general_prompts", tiny_world)]
    cfg = MonitorConfig(eval_every=5, n_prompts=1, general_n_prompts=16, max_new_tokens=160)
    trainer, monitor = _grpo(stage3_policy, tmp_path, [loop_reward], cfg, steps=60, lr=1e-4, eval_rows=[],
                             prompts=prompts, general_rows=general_rows[:16])
    assert monitor.alarms and monitor.stopped and trainer.state.global_step < 60, monitor.history
    alarm, start = monitor.alarms[-1], monitor.history[0]
    assert alarm["alarm"].startswith("general prompts"), alarm
    assert alarm["general_repetition"] > start["general_repetition"] or alarm["general_mean_length"] > start["general_mean_length"]
    # the final weights are those of the last healthy check
    healthy = [row for row in monitor.history if row["step"] == monitor.healthy_step][-1]
    assert healthy["healthy"] and healthy["step"] < alarm["step"]
    texts, lengths = greedy_answers(trainer.model, trainer.processing_class, [r["prompt"] for r in general_rows[:16]], 160)
    now = general_signals(texts, lengths, [r["answer"] for r in general_rows[:16]])
    assert now["general_mean_length"] == healthy["general_mean_length"]
    assert now["general_repetition"] == healthy["general_repetition"]
