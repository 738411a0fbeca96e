"""Rewards: a table of tricky cases, the open-r1 / TRL rewards (tests ported from open-r1's),
TRL's calling convention, config validation (weights' sign), and rewards of the user's own."""

import functools
import hashlib
import json
import math
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

import small
from stages.common import UserError
from stages.rewards import (
    PENALTIES,
    REWARD_FUNCS,
    RewardsConfig,
    accuracy_reward,
    build_reward_funcs,
    completion_text,
    cosine_scaled_reward,
    extract_answer,
    format_problem,
    format_reward,
    kimi_length_reward,
    language_consistency_reward,
    language_share,
    length_penalty,
    parse_math,
    reasoning_steps_reward,
    reasoning_text,
    repeated_ngram_share,
    repetition_penalty,
    score_completion,
    soft_overlong_punishment_reward,
    tag_count_reward,
    verify_answer,
)

ROOT = Path(__file__).resolve().parent.parent


def chat(text):
    return [{"role": "assistant", "content": text}]


GOOD = "<think>2 plus 3 is 5</think><answer>5</answer>"


@pytest.mark.parametrize("text, expected", [
    ("<think>r</think><answer>42</answer>", "42"),
    ("<think>r</think><answer>  \\frac{1}{2} \n</answer>", "\\frac{1}{2}"),
    ("<think>r</think> so \\boxed{7}", "7"),
    ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # last boxed, nested braces balanced
    ("\\boxed {x^{2}}", "x^{2}"),
    ("<answer>3</answer> and \\boxed{4}", "3"),  # the answer block wins over boxed
    ("<answer>\\boxed{9}</answer>", "\\boxed{9}"),
    ("<answer>1</answer><answer>2</answer>", None),  # two answer blocks: ambiguous
    ("<answer>  </answer>", None),
    ("<answer>5", None),  # unclosed
    ("\\boxed{unbalanced", None),
    ("no answer at all", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("gold, answer, expected", [
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "0.5", True),
    ("1/2", "0.5", True),
    ("-1", "x = -1", True),
    ("x = -1", "-1", True),
    ("2^{10}", "1024", True),  # bare LaTeX gold is parsed as math, not as "2"
    ("2^{10}", "2", False),
    ("\\sqrt{2}", "\\sqrt{2}", True),
    ("42", "The answer is 42", True),
    ("42", "43", False),
    ("12", "1 2", False),
    (42, "42.0", True),  # gold from a JSON number column
    ("3", "\\boxed{3}", True),
    ("1,000", "1000", True),
    ("seven", "seven", True),  # word gold: normalised word match
    ("seven", " seven ", True),
    ("seven", "eight", False),  # a wrong word answer is wrong (a learning signal), not unjudged
    ("7", "seven", False),  # unparseable answer
    ("7", None, False),
    ("", "3", None),
    (None, "3", None),
    ("nonsense words", "nonsense wordz", False),
    # word answers: case, surrounding punctuation / whitespace and LaTeX text wrappers ignored
    ("Yes", "No", False),
    ("Yes", "yes", True),
    ("Yes", " YES. ", True),
    ("Yes", "\\text{Yes}", True),
    ("Yes", "$\\boxed{\\text{yes}}$", True),
    ("blue", "red", False),
    ("blue", "**Blue**", True),
    ("blue", "blue!", True),
    ("New York", "new   york", True),
    ("New York", "York", False),
    ("red or blue", "\\text{red} or \\text{Blue}", True),
    ("Yes", None, False),
    ("Yes", "1", False),
    ("是", "是", True),  # one CJK character is a word
    ("(B)", "B", True),  # single letters are math symbols (math-verify), not words
    # gold that is neither math nor words: can't judge, and an answer echoing it is not rewarded
    ("x @@ ###", "x @@ ###", None),
    ("x @@ ###", "7", None),
    ("\\frac{1}{", "\\frac{1}{", None),
    ("\\frac{1}{", "1", None),
    ("?", "?", None),
    ("?", "Yes", None),
    ("#5", "#5", None),
])
def test_verify_answer(gold, answer, expected):
    assert verify_answer(gold, answer) is expected


def test_verify_answer_outside_main_thread():
    """Prefect runs tasks in worker threads, where math-verify's signal timeout would raise."""
    results = []
    thread = threading.Thread(target=lambda: results.append(
        (verify_answer("\\frac{3}{4}", "0.75"), verify_answer("3", "4"))))
    thread.start()
    thread.join()
    assert results == [(True, False)]


@pytest.mark.parametrize("completion, gold, expected", [
    (GOOD, "5", 1.0),
    ("<think>r</think><answer>6</answer>", "5", -1.0),
    ("<think>r</think><answer>\\frac{1}{2}</answer>", "0.5", 1.0),
    ("<think>r</think> final: \\boxed{5}", "5", 1.0),  # boxed counts for accuracy (not for format)
    ("<think>r</think><answer>5</answer><answer>6</answer>", "5", -1.0),  # two answers: not rewarded
    ("<think>r</think><answer>5</answer><answer>5</answer>", "5", -1.0),
    ("<think>r</think><answer>5", "5", -1.0),
    ("", "5", -1.0),
    (GOOD, "not math at all", -1.0),  # word gold, numeric answer: wrong
    (GOOD, "x @@ ###", None),  # gold neither math nor words: None, never positive
    (GOOD, None, None),
    ("<think>r</think><answer>No</answer>", "Yes", -1.0),
    ("<think>r</think><answer>yes</answer>", "Yes", 1.0),
])
def test_accuracy_reward(completion, gold, expected):
    assert accuracy_reward([completion], answer=[gold], wrong=-1.0) == [expected]
    assert accuracy_reward([chat(completion)], answer=[gold], wrong=-1.0) == [expected]


def test_accuracy_reward_needs_answer_column():
    with pytest.raises(UserError, match="answer"):
        accuracy_reward([GOOD])


@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),
    ("  <think>a\nb</think>\n\n<answer>5</answer>\n", 1.0),
    ("<think></think><answer>5</answer>", 1.0),  # empty reasoning is allowed by the format
    ("<think>r</think><answer>5</answer><answer>6</answer>", 0.0),
    ("<think>r</think><answer>5</answer> and more", 0.0),
    ("intro <think>r</think><answer>5</answer>", 0.0),
    ("<think>r</think> middle <answer>5</answer>", 0.0),
    ("<think>r<answer>5</answer>", 0.0),  # unclosed think
    ("<think>r</think><answer>5", 0.0),  # unclosed answer
    ("<answer>5</answer><think>r</think>", 0.0),  # wrong order
    ("</think>r<think><answer>5</answer>", 0.0),
    ("<think>r</think><answer> </answer>", 0.0),  # empty answer
    ("<answer>5</answer>", 0.0),
    ("\\boxed{5}", 0.0),
    ("", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]
    assert format_reward([chat(completion)]) == [expected]
    assert (format_problem(completion) is None) == (expected == 1.0)


@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),
    ("<think>r</think>", 0.5),
    ("<think>r</think><answer>5</answer><answer>6</answer>", 0.5),
    ("<think>r<answer>5</answer>", 0.75),
    ("plain text", 0.0),
    ("", 0.0),
])
def test_tag_count_reward(completion, expected):
    assert tag_count_reward([completion]) == [expected]


@pytest.mark.parametrize("text, language, expected", [
    ("we add the ones digits", "en", 1.0),
    ("we add 然后 the digits", "en", 4 / 6),  # a CJK run counts one word per character
    ("我们计算 sum", "zh", 4 / 5),
    ("12 + 34 = 46, 5 * 6 = 30", "en", 1.0),  # digits and punctuation are not words: no words -> 1.0
    ("", "zh", 1.0),
    ("\\frac{x}{y} is the ratio", "en", 1.0),
    ("设 x 为 3", "zh", 1.0),  # single-letter variables and LaTeX commands are not words
    ("сумма equals", "ru", 0.5),
    ("これは テスト です", "ja", 1.0),
    ("la somme des chiffres", "fr", 1.0),
    ("any words", None, None),
])
def test_language_share(text, language, expected):
    share = language_share(text, language)
    assert share is None if expected is None else share == pytest.approx(expected)


def test_language_share_unknown_language():
    with pytest.raises(UserError, match="'xx'"):
        language_share("text", "xx")


def test_language_consistency_reward_uses_reasoning_and_per_row_language():
    mixed = "<think>first we add 然后进位 the tens</think><answer>5</answer>"
    chinese_answer = "<think>we add the digits</think><answer>五 是 答案</answer>"  # only the reasoning counts
    rewards = language_consistency_reward([mixed, chinese_answer], language=["en", None], default_language="en")
    assert rewards == [pytest.approx(5 / 9), 1.0]
    assert language_consistency_reward([chat(mixed)], language=["zh"]) == [pytest.approx(4 / 9)]
    assert language_consistency_reward([mixed], default_language="zh") == [pytest.approx(4 / 9)]


@pytest.mark.parametrize("text, expected", [
    ("<think>a b</think><answer>c</answer>", "a b"),
    ("<think>a b<answer>c</answer>", "a b c"),  # unclosed think: to the end, tags removed
    ("no tags <answer>c</answer>", "no tags"),
])
def test_reasoning_text(text, expected):
    assert " ".join(reasoning_text(text).split()) == expected


@pytest.mark.parametrize("length, expected", [(0, 0.0), (100, 0.0), (150, -0.5), (200, -1.0), (500, -1.0)])
def test_length_penalty(length, expected):
    assert length_penalty(["x" * length], max_chars=100, buffer=100) == [pytest.approx(expected)]


@pytest.mark.parametrize("text, n, expected", [
    ("one two three four", 2, 0.0),
    ("a b a b a b", 2, 1 - 2 / 5),
    ("go go go go go", 1, 0.8),
    ("short", 3, 0.0),
    ("", 3, 0.0),
    ("我我我我", 1, 0.75),  # CJK characters are tokens of their own
])
def test_repetition(text, n, expected):
    assert repeated_ngram_share(text, n) == pytest.approx(expected)
    assert repetition_penalty([text], ngram=n) == [pytest.approx(-expected)]


def test_completion_text_forms():
    assert completion_text("x") == "x"
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "a\nb"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]) == "hi"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"


BUILT_INS = [name for name in REWARD_FUNCS if name != "task"]  # `task` needs stages.tasks: tested apart


def test_rewards_take_trl_keywords():
    """TRL calls f(prompts=, completions=, completion_ids=, trainer_state=, log_extra=, log_metric=,
    **dataset_columns) (trl/trainer/grpo_trainer.py, _calculate_rewards)."""
    extra = dict(prompts=[[{"role": "user", "content": "q"}]] * 2, completion_ids=[[1], [2]],
                 trainer_state=None, log_extra=None, log_metric=None, answer=["5", "5"], language=["en", "en"])
    cfg = RewardsConfig(weights={name: 1.0 for name in BUILT_INS}, cosine_max_tokens=10, overlong_max_tokens=10)
    funcs, weights = build_reward_funcs(cfg)
    for func in funcs:
        out = func(completions=[chat(GOOD), chat("junk")], **extra)
        assert len(out) == 2 and all(v is None or isinstance(v, float) for v in out), func.__name__
    assert weights == [1.0] * len(BUILT_INS)
    assert pickle.loads(pickle.dumps(funcs))[BUILT_INS.index("soft_overlong")](
        [GOOD], completion_ids=[[0] * 9]) == [pytest.approx(-0.5)]


def test_trl_log_names():
    """TRL logs rewards/<get_callable_name(func)>/mean."""
    from trl.trainer.utils import get_callable_name

    cfg = RewardsConfig(weights={name: 1.0 for name in BUILT_INS}, cosine_max_tokens=10, overlong_max_tokens=10)
    assert [get_callable_name(f) for f in build_reward_funcs(cfg)[0]] == [
        "accuracy_reward", "format_reward", "tag_count_reward", "language_consistency_reward", "length_penalty",
        "repetition_penalty", "reasoning_steps_reward", "cosine_scaled_reward", "kimi_length_reward",
        "soft_overlong_punishment_reward"]


def test_build_reward_funcs_binds_options_and_names():
    cfg = RewardsConfig(weights={"accuracy": 2.0, "language": 0.5, "length": 1.0}, accuracy_wrong=-1.0,
                        language="zh", max_chars=10, length_buffer=10)
    funcs, weights = build_reward_funcs(cfg)
    assert weights == [2.0, 0.5, 1.0]
    assert [f.__name__ for f in funcs] == ["accuracy_reward", "language_consistency_reward", "length_penalty"]
    assert all(isinstance(f, functools.partial) for f in funcs)  # TRL unwraps partials for the name
    assert pickle.loads(pickle.dumps(funcs))[0](["<answer>5</answer>"], answer=["5"]) == [1.0]  # for workers
    accuracy, language, length = funcs
    assert accuracy(["<answer>4</answer>"], answer=["5"]) == [-1.0]
    assert language(["<think>我们 add</think>"]) == [pytest.approx(2 / 3)]  # config default: zh
    assert language(["<think>我们 add</think>"], language=["en"]) == [pytest.approx(1 / 3)]  # column wins
    assert length(["x" * 15]) == [pytest.approx(-0.5)]


def test_score_completion_total():
    cfg = RewardsConfig(weights={"accuracy": 1.0, "format": 0.5, "tag_count": 0.1})
    assert score_completion(GOOD, cfg, answer="5") == {
        "accuracy": 1.0, "format": 1.0, "tag_count": 1.0, "total": pytest.approx(1.6)}
    bad_gold = score_completion(GOOD, cfg, answer="@@ ##", prompt="ignored")
    assert bad_gold["accuracy"] is None and bad_gold["total"] == pytest.approx(0.6)
    only_accuracy = RewardsConfig(weights={"accuracy": 1.0})
    assert score_completion(GOOD, only_accuracy, answer=None) == {"accuracy": None, "total": 0.0}


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": {"acuracy": 1.0}}, "unknown reward 'acuracy'"),
    ({"weights": {}}, "at least one reward"),
    ({"weights": {"format": float("nan")}}, "finite"),
    ({"language": "klingon"}, "unknown language 'klingon'"),
    ({"max_chars": 0}, "max_chars"),
    ({"repetition_ngram": 0}, "repetition_ngram"),
    ({"unknown_field": 1}, "unknown_field"),
])
def test_rewards_config_errors(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        RewardsConfig(**kwargs)


def test_rewards_config_documents_every_field():
    from stages.rewards import CustomReward

    assert all(field.description for field in RewardsConfig.model_fields.values())
    assert all(field.description for field in CustomReward.model_fields.values())


def test_reward_docs_list_every_reward_and_option():
    """docs/REWARDS.md: one table row per reward (config name, TRL log name), every option named."""
    doc = (ROOT / "docs" / "REWARDS.md").read_text()
    table = doc.split("## Built-in rewards")[1].split("\n\n")[1]
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines() if line.startswith("| `")}
    for name, func in REWARD_FUNCS.items():
        assert name in rows and f"`{func.__name__}`" in rows[name], name
    for option in set(RewardsConfig.model_fields) - {"weights", "custom"}:
        assert f"`{option}`" in doc, option


# --------------------------------------------------------------------------------------------------
# Issue 15's bugs, each failing on the code before the fix

@pytest.mark.parametrize("gold", ["x @@ ###", "\\frac{1}{", "?"])
def test_gold_neither_math_nor_words_is_not_graded(gold):
    """It used to be graded 0.0 / `wrong` (parse_math wrapped it in $...$ and math-verify's string
    fallback "parsed" it), and an answer echoing it scored 1.0."""
    completions = ["<think>r</think><answer>7</answer>", f"<think>r</think><answer>{gold}</answer>"]
    assert accuracy_reward(completions, answer=[gold, gold]) == [None, None]
    assert accuracy_reward(completions, answer=[gold, gold], wrong=-1.0) == [None, None]
    assert parse_math(gold) == ()
    cfg = RewardsConfig(weights={"accuracy": 1.0})
    assert score_completion(completions[1], cfg, answer=gold) == {"accuracy": None, "total": 0.0}


def test_parse_math_keeps_real_math():
    assert parse_math("2^{10}") and parse_math("x = -1") and parse_math("\\frac{1}{2}") and parse_math("A, C")
    assert parse_math("Yes") == () and parse_math("...") == ()


def test_negative_weights_are_refused_naming_each_reward():
    """open-r1 writes penalties negative (max_penalty=-1); here that weight would make a looping
    completion total +1.25 and a clean one 0. Refused, one problem per bad weight."""
    from pipeline.config import validation_problems

    with pytest.raises(ValidationError) as info:
        RewardsConfig(weights={"repetition": -1.0, "length": -0.5, "accuracy": -1.0, "format": 0.5})
    lines = validation_problems(info.value, ("rewards",))
    assert len(lines) == 3, lines
    repetition, length, accuracy = lines
    assert "'repetition' is a penalty" in repetition and "bonus" in repetition and "weight 1.0" in repetition
    assert "'length' is a penalty" in length
    assert "weights must be >= 0" in accuracy and "'accuracy'" in accuracy


@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_penalties_are_never_positive(name):
    cfg = RewardsConfig(weights={name: 1.0}, max_chars=10, length_buffer=10, overlong_max_tokens=10)
    texts = ["", GOOD, "go " * 40, "<think>" + "a b c " * 30 + "</think><answer>5</answer>"]
    (func,), _ = build_reward_funcs(cfg)
    values = func(texts, completion_ids=[[0] * len(completion_text(t).split()) for t in texts])
    assert all(v <= 0 for v in values) and min(values) < 0


def test_positive_penalty_weights_rank_a_loop_below_a_clean_completion():
    cfg = RewardsConfig(weights={"repetition": 1.0, "length": 0.5}, max_chars=50, length_buffer=50)
    loop = "<think>" + "we add we add " * 20 + "</think><answer>5</answer>"
    clean = score_completion(GOOD, cfg)["total"]
    assert score_completion(loop, cfg)["total"] < clean - 0.5 and clean <= 0.0


# --------------------------------------------------------------------------------------------------
# reasoning_steps (open-r1's reasoning_steps_reward; cases from open-r1's tests)

@pytest.mark.parametrize("content, expected", [
    ("Step 1: First step\nStep 2: Second step\nStep 3: Third step", 1.0),
    ("First, we do this.\nSecond, we do that.\nFinally, we conclude.", 1.0),
    ("Step 1: Only step", 1 / 3),
    ("First, we do this.\nFinally, we conclude.", 2 / 3),
    ("Just plain text without any clear steps", 0.0),
    # open-r1's docstring: numbered lists at the start of a line (open-r1's regex only sees the first)
    ("<think>\n1. add the ones\n2. carry\n3. add the tens</think><answer>5</answer>", 1.0),
    ("items:\n- one\n* two", 2 / 3),
])
def test_reasoning_steps_reward(content, expected):
    assert reasoning_steps_reward([[{"content": content}]]) == [pytest.approx(expected)]
    assert reasoning_steps_reward([content]) == [pytest.approx(expected)]


def test_reasoning_steps_target_option():
    cfg = RewardsConfig(weights={"reasoning_steps": 1.0}, reasoning_steps_target=2)
    (func,), _ = build_reward_funcs(cfg)
    assert func(["Step 1: a", "Step 1: a Step 2: b Step 3: c"]) == [0.5, 1.0]


# --------------------------------------------------------------------------------------------------
# cosine (open-r1's / TRL's cosine-scaled reward with r1flow's answer check)

COSINE = dict(cosine_max_tokens=100, min_value_wrong=-1.0, max_value_wrong=-0.5, min_value_correct=0.5,
              max_value_correct=1.0)


@pytest.mark.parametrize("content, gold, length, expected", [
    # open-r1's cases; its lengths are characters, the content padded to 20 is already 22 long
    (r"\boxed{\frac{63}{400}}", r"\frac{63}{400}", 22, 0.943),
    (r"\boxed{\frac{63}{400}}", r"\frac{63}{400}", 80, 0.547),
    (r"\boxed{\frac{64}{400}}", r"\frac{63}{400}", 22, -0.942),
    (r"\boxed{\frac{64}{400}}", r"\frac{63}{400}", 80, -0.547),
    ("<think>r</think><answer>5</answer>", "5", 0, 1.0),  # r1flow's format
    ("<think>r</think><answer>5</answer>", "5", 100, 0.5),
    ("<think>r</think><answer>5</answer>", "5", 500, 0.5),  # clamped past the end (cos is periodic)
    ("<think>r</think><answer>6</answer>", "5", 0, -1.0),
    ("<think>r</think><answer>6</answer>", "5", 500, -0.5),
    ("<think>r</think><answer>No</answer>", "Yes", 50, -0.75),  # word answers judged as by accuracy
    ("<think>r</think><answer>5</answer>", "x @@ ###", 50, None),  # can't judge
])
def test_cosine_scaled_reward(content, gold, length, expected):
    out = cosine_scaled_reward([[{"content": content}]], answer=[gold], completion_ids=[[7] * length], **COSINE)
    assert out == [None] if expected is None else out == [pytest.approx(expected, abs=5e-3)]


def test_cosine_orders_short_and_long():
    texts = ["<think>r</think><answer>5</answer>", "<think>r</think><answer>6</answer>"] * 2
    ids = [[0] * 10, [0] * 10, [0] * 60, [0] * 60]
    short_right, short_wrong, long_right, long_wrong = cosine_scaled_reward(
        texts, answer=["5"] * 4, completion_ids=ids, **COSINE)
    assert short_right > long_right > long_wrong > short_wrong


def test_cosine_matches_trl_where_the_answer_checks_agree():
    """TRL's get_cosine_scaled_reward judges with its own accuracy_reward (which reads r1flow's
    `<answer>5</answer>` as wrong and bare gold `2^{10}` as 2), so r1flow keeps its answer check and
    takes TRL's formula: on boxed LaTeX answers, where both checks agree, the numbers are TRL's."""
    from trl.rewards import get_cosine_scaled_reward

    trl_cosine = get_cosine_scaled_reward(max_len=100)
    for content, gold in [(r"\boxed{\frac{1}{3}}", r"\frac{1}{3}"), (r"\boxed{\frac{1}{2}}", r"\frac{1}{3}")]:
        for length in (0, 1, 33, 50, 99, 100, 150):
            ids = [[1] * length]
            assert cosine_scaled_reward([[{"content": content}]], answer=[gold], completion_ids=ids, **COSINE) == \
                [pytest.approx(trl_cosine([[{"content": content}]], [gold], ids)[0])]


def test_cosine_length_from_num_tokens_or_unknown():
    text = ["<think>r</think><answer>5</answer>"]
    assert cosine_scaled_reward(text, answer=["5"], num_tokens=[100], **COSINE) == [pytest.approx(0.5)]
    assert cosine_scaled_reward(text, answer=["5"], **COSINE) == [None]
    cfg = RewardsConfig(weights={"cosine": 1.0}, cosine_max_tokens=100)
    assert score_completion(text[0], cfg, answer="5", num_tokens=0)["cosine"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# kimi_length (Kimi 1.5's group-relative length reward, open-r1's len_reward; open-r1's cases)

def boxed(content):
    return [{"content": content}]


def test_kimi_same_length_responses():
    completions = [boxed(r"\boxed{\frac{63}{400}}"), boxed(r"\boxed{\frac{64}{400}}")]
    assert kimi_length_reward(completions, answer=[r"\frac{63}{400}"] * 2) == [0.0, 0.0]


def test_kimi_different_lengths_correct_answers():
    completions = [boxed(r"\boxed{\frac{63}{400}}"), boxed(r"\boxed{\frac{63}{400}}  " + "x" * 10)]
    rewards = kimi_length_reward(completions, answer=[r"\frac{63}{400}"] * 2)
    assert rewards[0] > rewards[1] and rewards[0] == pytest.approx(0.5)


def test_kimi_different_lengths_incorrect_answers():
    completions = [boxed(r"\boxed{\frac{64}{400}}"), boxed(r"\boxed{\frac{64}{400}}  " + "x" * 10)]
    rewards = kimi_length_reward(completions, answer=[r"\frac{63}{400}"] * 2)
    assert rewards[0] <= 0.0 and rewards[1] <= 0.0
    assert rewards[0] > rewards[1]  # the shorter wrong answer is penalised less
    assert rewards == [0.0, -0.5]


def test_kimi_mixed_correctness():
    completions = [boxed(r"\boxed{\frac{63}{400}}"), boxed(r"\boxed{\frac{63}{400}}  " + "x" * 10),
                   boxed(r"\boxed{\frac{64}{400}}"), boxed(r"\boxed{\frac{64}{400}}  " + "x" * 10)]
    rewards = kimi_length_reward(completions, answer=[r"\frac{63}{400}"] * 4)
    assert rewards[0] > 0.0
    assert rewards[2] > rewards[1] and rewards[1] >= rewards[3]
    assert rewards[2] <= 0.0 and rewards[3] <= 0.0
    assert rewards[0] > rewards[1] and rewards[2] > rewards[3]


def test_kimi_unparseable_gold_is_none():
    """open-r1 counts an unparseable gold as correct; r1flow can't judge it (None, skipped)."""
    completions = [boxed(r"\boxed{answer}"), boxed(r"\boxed{answer} " + "x" * 10)]
    assert kimi_length_reward(completions, answer=["@@ ##"] * 2) == [None, None]


def test_kimi_groups_by_prompt_and_counts_tokens():
    right, wrong = "<answer>5</answer>", "<answer>6</answer>"
    prompts = [[{"role": "user", "content": "a"}]] * 3 + [[{"role": "user", "content": "b"}]] * 2
    rewards = kimi_length_reward([right, right, wrong, right, right], answer=["5"] * 5, prompts=prompts,
                                 completion_ids=[[0] * 10, [0] * 30, [0] * 20, [0] * 100, [0] * 200])
    assert rewards == [pytest.approx(0.5), pytest.approx(-0.5), pytest.approx(0.0),  # prompt a: 10..30 tokens
                       pytest.approx(0.5), pytest.approx(-0.5)]  # prompt b: its own 100..200
    assert score_completion(right, RewardsConfig(weights={"kimi_length": 1.0}), answer="5")["kimi_length"] == 0.0


# --------------------------------------------------------------------------------------------------
# soft_overlong (DAPO, computed by TRL's get_soft_overlong_punishment; open-r1's cases, on tokens)

@pytest.mark.parametrize("length, expected", [(50, 0.0), (80, 0.0), (90, -0.5), (100, -1.0), (110, -1.0)])
def test_soft_overlong_punishment(length, expected):
    from trl.rewards import get_soft_overlong_punishment

    ids = [[3] * length]
    out = soft_overlong_punishment_reward(["x"], completion_ids=ids, overlong_max_tokens=100, overlong_cache_tokens=20)
    assert out == [pytest.approx(expected)]
    assert out == get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)(ids)


def test_soft_overlong_counts_tokens_not_characters():
    cfg = RewardsConfig(weights={"soft_overlong": 1.0}, overlong_max_tokens=100)  # cache: 100 // 5
    (func,), _ = build_reward_funcs(cfg)
    assert func(["x" * 5000, "x"], completion_ids=[[0] * 10, [0] * 90]) == [0.0, pytest.approx(-0.5)]
    assert func(["x"], num_tokens=[100]) == [-1.0]
    assert func(["x"]) == [None]  # length unknown: can't judge
    assert score_completion("x", cfg, num_tokens=85)["soft_overlong"] == pytest.approx(-0.25)


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": {"cosine": 1.0}}, "cosine_max_tokens"),
    ({"weights": {"soft_overlong": 1.0}}, "overlong_max_tokens"),
    ({"overlong_max_tokens": 10, "overlong_cache_tokens": 10}, "below overlong_max_tokens"),
    ({"cosine_min_value_correct": -2.0}, "ordered"),
    ({"reasoning_steps_target": 0}, "reasoning_steps_target"),
])
def test_new_reward_options_are_validated(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        RewardsConfig(**kwargs)


# --------------------------------------------------------------------------------------------------
# task (the task's own verifier, stages.tasks, imported lazily)

def test_rewards_import_without_stages_tasks():
    code = "import sys, stages.rewards as r; assert 'stages.tasks' not in sys.modules; print(r.task_reward.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "task_reward", out.stderr


def test_task_reward_delegates_to_stages_tasks(monkeypatch):
    tasks = pytest.importorskip("stages.tasks")
    seen = {}

    def fake(completions, task=None, task_entry=None, **kw):
        seen.update(task=task, task_entry=task_entry, prompts=kw.get("prompts"))
        return [0.5] * len(completions)

    monkeypatch.setattr(tasks, "task_reward", fake)
    (func,), weights = build_reward_funcs(RewardsConfig(weights={"task": 2.0}))
    assert func.__name__ == "task_reward" and weights == [2.0]
    assert func([GOOD], task=["basic_arithmetic"], task_entry=["{}"], prompts=["q"]) == [0.5]
    assert seen == {"task": ["basic_arithmetic"], "task_entry": ["{}"], "prompts": ["q"]}
    assert RewardsConfig(weights={"task": 1.0}).dataset_columns() == ["task", "task_entry"]


# --------------------------------------------------------------------------------------------------
# Rewards of the user's own

USER_REWARDS = '''
def brevity(completions, limit=300, **kwargs):
    """1.0 for a completion of at most `limit` characters, else 0.0."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [1.0 if len(t) <= limit else 0.0 for t in texts]


def by_difficulty(completions, difficulty, scale=1.0, **kwargs):
    return [None if d is None else scale * d for d in difficulty]


NOT_CALLABLE = 3


def no_kwargs(completions):
    return [0.0] * len(completions)


def no_completions(texts, **kwargs):
    return [0.0] * len(texts)


async def asynchronous(completions, **kwargs):
    return [0.0] * len(completions)


def wrong_length(completions, **kwargs):
    return [0.0]
'''


def write_rewards(folder: Path, name: str = "my_rewards.py", text: str = USER_REWARDS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def custom(function: str, weight: float = 0.2, **args) -> dict:
    return {"function": function, "weight": weight, "args": args}


def test_user_reward_from_a_file(tmp_path):
    from trl.trainer.utils import get_callable_name

    path = write_rewards(tmp_path)
    cfg = RewardsConfig(weights={"accuracy": 1.0}, custom={"brevity": custom(f"{path}:brevity", limit=20)})
    funcs, weights = build_reward_funcs(cfg)
    assert weights == [1.0, 0.2] and cfg.named_weights() == {"accuracy": 1.0, "brevity": 0.2}
    assert [get_callable_name(f) for f in funcs] == ["accuracy_reward", "brevity"]  # TRL: rewards/brevity/mean
    brevity = funcs[1]
    trl_keywords = dict(prompts=["q", "q"], completion_ids=[[1], [2]], trainer_state=None, log_extra=None,
                        log_metric=None, answer=["5", "5"])
    assert brevity(completions=[chat(GOOD), chat("x" * 30)], **trl_keywords) == [0.0, 0.0]
    assert brevity(completions=["short", "x" * 30], **trl_keywords) == [1.0, 0.0]
    assert pickle.loads(pickle.dumps(brevity))(["short"]) == [1.0]  # loads the file again (e.g. in a worker)
    assert score_completion("short", cfg, answer="5") == {"accuracy": 0.0, "brevity": 1.0, "total": 0.2}
    dumped = cfg.model_dump(mode="json")["custom"]["brevity"]
    assert dumped == {"function": f"{path}:brevity", "weight": 0.2, "args": {"limit": 20},
                      "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_user_reward_relative_path_and_config_dir(tmp_path, monkeypatch):
    write_rewards(tmp_path / "project" / "rewards")
    monkeypatch.chdir(tmp_path / "project")
    cfg = RewardsConfig(weights={}, custom={"brevity": custom("rewards/my_rewards.py:brevity")})
    assert build_reward_funcs(cfg)[0][0](["ok"]) == [1.0]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match="not found"):
        RewardsConfig(weights={}, custom={"brevity": custom("rewards/my_rewards.py:brevity")})
    # a loader that knows the config file's folder passes it as validation context
    cfg = RewardsConfig.model_validate({"weights": {}, "custom": {"brevity": custom("rewards/my_rewards.py:brevity")}},
                                       context={"config_dir": tmp_path / "project"})
    assert build_reward_funcs(cfg)[0][0](["ok"]) == [1.0]


def test_user_reward_from_a_module(tmp_path, monkeypatch):
    write_rewards(tmp_path / "pkg_r1flow_test", "scoring.py")
    (tmp_path / "pkg_r1flow_test" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RewardsConfig(weights={}, custom={"hard": custom("pkg_r1flow_test.scoring:by_difficulty", 1.0, scale=2.0)})
    (func,), weights = build_reward_funcs(cfg)
    assert func(["a", "b"], difficulty=[0.5, None]) == [1.0, None] and weights == [1.0]
    assert cfg.dataset_columns() == ["difficulty"]  # parameters not bound by args are dataset columns
    assert cfg.custom["hard"].source_sha256 == hashlib.sha256(
        (tmp_path / "pkg_r1flow_test" / "scoring.py").read_bytes()).hexdigest()


def test_user_reward_source_is_part_of_the_version_id(tmp_path):
    """The stage's identity is its config's model_dump(mode="json"): the file's sha256 is in it."""
    from stages import reasoning_rl

    path = write_rewards(tmp_path)
    rewards = {"custom": {"brevity": {**custom(f"{path}:brevity"), "source_sha256": "given values are replaced"}}}
    before = reasoning_rl.Config(rewards=rewards).model_dump(mode="json")
    assert before == reasoning_rl.Config(rewards=rewards).model_dump(mode="json")
    assert before["rewards"]["custom"]["brevity"]["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_text(USER_REWARDS.replace("limit=300", "limit=200"))
    after = reasoning_rl.Config(rewards=rewards).model_dump(mode="json")
    assert after != before and after["rewards"]["custom"]["brevity"]["function"] == f"{path}:brevity"


def test_user_reward_edited_after_validation_is_refused(tmp_path):
    path = write_rewards(tmp_path)
    cfg = RewardsConfig(weights={}, custom={"brevity": custom(f"{path}:brevity")})
    path.write_text(USER_REWARDS + "\n# edited\n")
    (func,), _ = build_reward_funcs(cfg)
    with pytest.raises(UserError, match="changed since the config was validated"):
        func(["x"])


def test_user_reward_bad_return_value(tmp_path):
    path = write_rewards(tmp_path)
    (func,), _ = build_reward_funcs(RewardsConfig(weights={}, custom={"bad": custom(f"{path}:wrong_length")}))
    with pytest.raises(UserError, match="reward 'bad': returned 1 values for 2 completions"):
        func(["a", "b"])


@pytest.mark.parametrize("name, spec, message", [
    ("brevity", custom("my_rewards.py"), "expected `package.module:function`"),
    ("brevity", custom("missing.py:brevity"), "missing.py not found"),
    ("brevity", custom("my_rewards.py:nope"), "has no attribute 'nope'"),
    ("brevity", custom("no_such_module_r1flow:f"), "cannot import 'no_such_module_r1flow'"),
    ("brevity", custom("broken.py:f"), "cannot import .*ZeroDivisionError"),
    ("brevity", custom("my_rewards.py:NOT_CALLABLE"), "is not callable"),
    ("brevity", custom("my_rewards.py:no_kwargs"), r"must take \*\*kwargs"),
    ("brevity", custom("my_rewards.py:no_completions"), "must take a `completions` parameter"),
    ("brevity", custom("my_rewards.py:asynchronous"), "async"),
    ("brevity", custom("my_rewards.py:brevity", limt=3), "argument 'limt' is not a parameter .*limit"),
    ("brevity", custom("my_rewards.py:brevity", prompts=3), "argument 'prompts' is passed by TRL"),
    ("brevity", custom("my_rewards.py:brevity", weight=-0.2), "weights must be >= 0"),
    ("brevity", custom("my_rewards.py:brevity", weight=float("inf")), "finite"),
    ("accuracy", custom("my_rewards.py:brevity"), "taken by a built-in"),
    ("accuracy_reward", custom("my_rewards.py:brevity"), "taken by a built-in"),
    ("my-reward", custom("my_rewards.py:brevity"), "letters, digits and _"),
])
def test_user_reward_errors_are_one_line_naming_the_reward(tmp_path, monkeypatch, name, spec, message):
    from pipeline.config import validation_problems

    write_rewards(tmp_path)
    write_rewards(tmp_path, "broken.py", "1 / 0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError) as info:
        RewardsConfig(custom={name: spec})
    lines = validation_problems(info.value, ("rewards",))
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert f"custom reward {name!r}" in lines[0]
    assert __import__("re").search(message, lines[0]), lines[0]


def test_at_least_one_reward_counts_custom_ones(tmp_path):
    path = write_rewards(tmp_path)
    assert RewardsConfig(weights={}, custom={"brevity": custom(f"{path}:brevity")}).named_weights() == {"brevity": 0.2}
    with pytest.raises(ValidationError, match="at least one reward"):
        RewardsConfig(weights={}, custom={})


TRAINING_REWARD = '''
import json


def brevity(completions, limit=40, log=None, answer=None, completion_ids=None, **kwargs):
    """1.0 for completions of at most `limit` characters; records what TRL passed."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"n": len(texts), "answers": answer is not None,
                                "token_counts": [len(ids) for ids in completion_ids]}) + "\\n")
    return [1.0 if len(t) <= limit else 0.0 for t in texts]
'''


@pytest.mark.slow
def test_user_reward_in_a_reasoning_rl_run(tmp_path, tmp_path_factory):
    """A user's reward file runs in the tiny pipeline's reasoning-rl (2 GRPO steps from the small
    world's base model) and TRL logs it under its own name."""
    from stages import reasoning_rl
    from test_generation import small_world
    from test_stage_ml import make_ctx

    world_dir = small_world(tmp_path_factory)
    path = write_rewards(tmp_path / "project", "user_rewards.py", TRAINING_REWARD)
    calls = tmp_path / "calls.jsonl"
    rewards = {"weights": {"accuracy": 1.0, "format": 0.25},
               "custom": {"brevity": custom(f"{path}:brevity", 0.5, limit=40, log=str(calls))}}
    cfg = reasoning_rl.Config(**{**small.GRPO, "model": "world:base_model",
                                 "monitor": {"enabled": False}, "rewards": rewards})
    metrics = reasoning_rl.run(cfg, make_ctx(tmp_path, "reasoning-rl", {"world": world_dir}))
    logged = [h for h in metrics["history"] if "reward" in h]
    assert logged and all("rewards/brevity/mean" in h and "rewards/accuracy_reward/mean" in h for h in logged)
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(seen) == metrics["global_step"] == 2
    assert all(s["answers"] and s["n"] == 8 and all(0 < t <= 24 for t in s["token_counts"]) for s in seen)
    assert all(math.isfinite(h["rewards/brevity/mean"]) for h in logged)
