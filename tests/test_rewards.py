"""Rule rewards: a table of tricky cases, TRL's calling convention, and config validation."""

import functools
import pickle
import threading

import pytest
from pydantic import ValidationError

from stages.common import UserError
from stages.rewards import (
    RewardsConfig,
    accuracy_reward,
    build_reward_funcs,
    completion_text,
    extract_answer,
    format_problem,
    format_reward,
    language_consistency_reward,
    language_share,
    length_penalty,
    reasoning_text,
    repeated_ngram_share,
    repetition_penalty,
    score_completion,
    tag_count_reward,
    verify_answer,
)


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
    ("seven", "seven", True),  # non-math gold: exact string equality
    ("seven", " seven ", True),
    ("seven", "eight", None),  # unparseable gold: can't judge, never positive
    ("7", "seven", False),  # unparseable answer
    ("7", None, False),
    ("", "3", None),
    (None, "3", None),
    ("nonsense words", "nonsense wordz", None),
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
    (GOOD, "not math at all", None),  # unparseable gold: None, never positive
    (GOOD, None, None),
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


def test_rewards_take_trl_keywords():
    """TRL passes prompts, completion_ids, trainer_state, log_extra... and every dataset column."""
    extra = dict(prompts=[[{"role": "user", "content": "q"}]] * 2, completion_ids=[[1], [2]],
                 trainer_state=None, log_extra=None, log_metric=None, answer=["5", "5"], language=["en", "en"])
    cfg = RewardsConfig(weights={name: 1.0 for name in
                                 ("accuracy", "format", "tag_count", "language", "length", "repetition")})
    funcs, weights = build_reward_funcs(cfg)
    for func in funcs:
        out = func(completions=[chat(GOOD), chat("junk")], **extra)
        assert len(out) == 2 and all(v is None or isinstance(v, float) for v in out)
    assert weights == [1.0] * 6


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
    bad_gold = score_completion(GOOD, cfg, answer="unknowable", prompt="ignored")
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
    assert all(field.description for field in RewardsConfig.model_fields.values())
