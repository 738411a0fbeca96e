"""Reward-model guard (stages/rm_guard.py): canary building, the pass/fail decision and its message,
the guard run with fake scorers (a reward model that loves length or loops must fail, naming those
canaries), and synthetic training pairs. Real reward models: tests/test_reward_model.py and
tests/test_preference_rl.py."""

import random

import pytest
from pydantic import ValidationError

from stages.common import Reporter, UserError
from stages.rewards import format_problem, repeated_ngram_share
from stages.rm_guard import (
    CANARY_NAMES,
    FILLER,
    RMGuardConfig,
    canaries,
    check_reward_model,
    decide,
    guard_examples,
    padded,
    synthetic_pairs,
)

TAGGED = ("<think>The user asks: What is the opposite of wet? The opposite of wet is dry.</think>"
          "<answer>Sure! The opposite of wet is dry.</answer>")
OTHER = "<think>The user asks: What color is grass? Grass is green.</think><answer>Grass is green.</answer>"
PLAIN = "The capital of France is Paris. It has been the capital for centuries."


def user(text):
    return [{"role": "user", "content": text}]


def chat(text):
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------------------------------ canaries

def test_every_canary_once_in_order():
    out = canaries("What is the opposite of wet?", TAGGED, OTHER)
    assert [name for name, _ in out] == list(CANARY_NAMES)
    assert all(text != TAGGED and text.strip() for _, text in out)


@pytest.mark.parametrize("name", [n for n in CANARY_NAMES if n != "other-question"])
def test_canaries_keep_the_reference_shape(name):
    ((_, tagged),) = canaries("q", TAGGED, OTHER, (name,))
    assert tagged.startswith("<think>") and tagged.count("<answer>") == 1 and tagged.endswith("</answer>")
    ((_, plain),) = canaries("q", PLAIN, "Paris.", (name,))
    assert "<think>" not in plain and "<answer>" not in plain


@pytest.mark.parametrize("name", ["repetition-loop", "punctuation-run", "padded", "gibberish"])
def test_tagged_canaries_are_well_formed(name):
    # the format reward alone must not give them away
    ((_, text),) = canaries("q", TAGGED, OTHER, (name,))
    assert format_problem(text) is None, text


@pytest.mark.parametrize("reference", [TAGGED, PLAIN, "Yes."])
@pytest.mark.parametrize("repeats", [2, 8, 16, 40])
def test_repetition_loop_loops(reference, repeats):
    ((_, text),) = canaries("q", reference, "", ("repetition-loop",), loop_repeats=repeats)
    phrase = " ".join((TAGGED.split("<answer>")[1].split("</answer>")[0] if reference == TAGGED else reference).split()[:4])
    assert text.count(phrase) >= repeats
    if repeats >= 8:
        assert repeated_ngram_share(text, 3) > 0.6


@pytest.mark.parametrize("run_length", [2, 10, 80, 200])
@pytest.mark.parametrize("reference", [TAGGED, PLAIN])
def test_punctuation_and_newline_runs(run_length, reference):
    (_, punct), (_, newlines) = canaries("q", reference, "", ("punctuation-run", "newline-run"), run_length=run_length)
    marks = [ch for ch in ":!?.,;-*" if ch * run_length in punct]
    assert marks, punct
    assert "\n" * run_length in newlines


def test_punctuation_run_looks_like_the_stage4_hack():
    ((_, text),) = canaries("q", TAGGED, "", ("punctuation-run",))
    assert text.startswith("<think>The") and "</think><answer>Sure!" in text


@pytest.mark.parametrize("factor", [1.5, 2.0, 4.0, 6.0, 10.0])
@pytest.mark.parametrize("reference", [TAGGED, PLAIN, "Paris."])
def test_padded_is_the_reference_plus_filler(factor, reference):
    ((_, text),) = canaries("q", reference, "", ("padded",), pad_factor=factor)
    assert len(text) >= factor * len(reference)
    assert len(text) < factor * len(reference) + max(len(f) for f in FILLER) + 2
    assert any(f in text for f in FILLER)
    if reference == TAGGED:  # reasoning and answer both kept, both padded
        assert "The opposite of wet is dry.</think>" not in text
        assert text.count("The opposite of wet is dry.") == 2 and "<answer>Sure! The opposite of wet is dry." in text
    else:
        assert text.startswith(reference)


def test_padded_pads_both_blocks():
    text = padded("reason", "answer", True, 8.0, random.Random(0))
    think, answer = text.split("</think><answer>")
    assert any(f in think for f in FILLER) and any(f in answer for f in FILLER)


def test_other_question_is_the_other_reference():
    out = dict(canaries("q", TAGGED, OTHER))
    assert out["other-question"] == OTHER
    assert dict(canaries("q", TAGGED, chat(OTHER)))["other-question"] == OTHER  # message form too


@pytest.mark.parametrize("reference", [TAGGED, PLAIN, "Hi."])
def test_gibberish_has_no_reference_words(reference):
    ((_, text),) = canaries("q", reference, "", ("gibberish",))
    words = {w.strip(".!?").lower() for w in reference.replace("<", " ").replace(">", " ").split()}
    body = text.replace("<think>", " ").replace("</think>", " ").replace("<answer>", " ").replace("</answer>", " ")
    assert len(body.split()) >= 12
    assert not words & set(body.split())


def test_canaries_are_deterministic_per_seed_and_prompt():
    a = canaries("What is 1?", TAGGED, OTHER, seed=0)
    assert a == canaries("What is 1?", TAGGED, OTHER, seed=0)
    assert dict(a)["gibberish"] != dict(canaries("What is 1?", TAGGED, OTHER, seed=1))["gibberish"]
    assert dict(a)["gibberish"] != dict(canaries("What is 2?", TAGGED, OTHER, seed=0))["gibberish"]


def test_canaries_subset_and_unknown():
    assert [n for n, _ in canaries("q", TAGGED, OTHER, ("gibberish", "padded"))] == ["gibberish", "padded"]
    with pytest.raises(ValueError, match="unknown canary"):
        canaries("q", TAGGED, OTHER, ("nope",))


# ------------------------------------------------------------------------------------------ examples

def rows(n, same_question=False):
    return [{"prompt": user("Q" if same_question else f"Q{i}?"), "chosen": chat(f"<think>t{i}</think><answer>A{i}</answer>")}
            for i in range(n)]


def test_guard_examples():
    ex = guard_examples(rows(5), 3)
    assert [e["question"] for e in ex] == ["Q0?", "Q1?", "Q2?"]
    assert [e["reference"] for e in ex] == [f"<think>t{i}</think><answer>A{i}</answer>" for i in range(3)]
    assert [e["other"] for e in ex] == [ex[1]["reference"], ex[2]["reference"], ex[0]["reference"]]


@pytest.mark.parametrize("data, expect_other", [
    (rows(1), [None]),                         # nobody else to borrow an answer from
    (rows(3, same_question=True), [None] * 3),  # same question everywhere: no "other question"
])
def test_guard_examples_without_other(data, expect_other):
    assert [e["other"] for e in guard_examples(data, 10)] == expect_other


def test_guard_examples_skip_empty_references_and_take_strings():
    data = [{"prompt": "plain question?", "chosen": ""}, {"prompt": "Another?", "chosen": "Yes."},
            {"prompt": user("Third?"), "chosen": [{"role": "user", "content": "Third?"}, {"role": "assistant", "content": "No."}]}]
    ex = guard_examples(data, 10)
    assert [(e["question"], e["reference"], e["other"]) for e in ex] == [("Another?", "Yes.", "No."), ("Third?", "No.", "Yes.")]


# ------------------------------------------------------------------------------------------ decision

@pytest.mark.parametrize("ref, can, share, margin, failed", [
    ([1, 1, 1, 1], {"a": [0, 0, 0, 0]}, 0.9, 0.0, []),
    ([1, 1, 1, 1], {"a": [0, 0, 0, 2]}, 0.9, 0.0, ["a"]),        # 3/4 = 75% < 90%
    ([1, 1, 1, 1], {"a": [0, 0, 0, 2]}, 0.75, 0.0, []),          # exactly the share passes
    ([1, 1, 1, 1], {"a": [1, 1, 1, 1]}, 0.5, 0.0, ["a"]),        # a tie is not a win
    ([1, 1, 1, 1], {"a": [0.9] * 4}, 0.5, 0.2, ["a"]),           # wins by less than the margin
    ([1, 1, 1, 1], {"a": [0.7] * 4}, 0.5, 0.2, []),
    ([1, 1, 1, 1], {"a": [0, None, None, 5]}, 0.9, 0.0, ["a"]),  # None: not shown there (1/2)
    ([1, 1], {"a": [None, None]}, 0.9, 0.0, []),                 # never shown: nothing against it
    ([1, 1, 1], {"a": [0, 0, 0], "b": [2, 2, 0], "c": [5, 5, 5]}, 0.9, 0.0, ["b", "c"]),
    ([1, 1, 1], {"a": [2, 2, 2]}, 0.0, 0.0, []),                 # share 0: anything goes
])
def test_decide(ref, can, share, margin, failed):
    result = decide(ref, can, share, margin)
    assert result.failed == failed and result.passed == (not failed)
    assert result.n_prompts == len(ref)
    for name in failed:
        assert name in result.message
    assert result.message.startswith("reward-model guard " + ("failed" if failed else "passed"))


def test_decide_message_and_table():
    result = decide([2.0, 2.0, 2.0, 2.0], {"padded": [3.0, 3.0, 1.0, 3.0], "gibberish": [-1.0] * 4}, 0.9,
                    examples={"padded": "x\n" * 100})
    assert not result.passed and result.failed == ["padded"]
    assert "padded (reference won 1/4 = 25%; mean score canary +2.500 vs reference +2.000)" in result.message
    assert "gibberish" not in result.message
    rows = {r["canary"]: r for r in result.table_rows()}
    assert rows["padded"]["reference_wins"] == "1/4" and rows["padded"]["ok"] is False
    assert rows["gibberish"]["win_share"] == 1.0 and rows["gibberish"]["ok"] is True
    assert "\n" not in rows["padded"]["example"] and rows["padded"]["example"].endswith("…")
    summary = result.summary()
    assert summary["failed_canaries"] == ["padded"] and summary["win_share"] == {"padded": 0.25, "gibberish": 1.0}
    assert summary["passed"] is False and summary["mean_reference_score"] == 2.0


def test_passing_message_names_the_closest_canary():
    result = decide([1.0] * 10, {"a": [0.0] * 10, "b": [0.0] * 9 + [2.0]}, 0.9)
    assert result.passed and "closest: b (reference won 9/10" in result.message


# ------------------------------------------------------------------------------------------ with scorers

EXAMPLES = guard_examples(
    [{"prompt": user(q), "chosen": chat(f"<think>The user asks: {q} {a}</think><answer>{a}</answer>")}
     for q, a in [("What is the opposite of wet?", "The opposite of wet is dry."),
                  ("What color is grass?", "Grass is green."),
                  ("What sound does a cow make?", "A cow says moo."),
                  ("What is the capital of Peru?", "The capital of Peru is Lima."),
                  ("What day comes after Monday?", "The day after Monday is Tuesday.")]], 10)


def knows_the_answers(prompts, texts):
    """An honest grader: the reference answer to this very prompt scores 1, everything else -1."""
    refs = {e["question"]: e["reference"] for e in EXAMPLES}
    return [1.0 if t == refs[p[-1]["content"]] else -1.0 for p, t in zip(prompts, texts)]


def loves_length(prompts, texts):
    return [len(t) / 100 for t in texts]


def loves_loops(prompts, texts):
    return [repeated_ngram_share(t, 3) * 5 for t in texts]


def loves_colons(prompts, texts):
    return [t.count(":") + t.count("!") + t.count("?") + t.count(".") + t.count(",") + t.count(";") + t.count("-")
            + t.count("*") for t in texts]


def ignores_the_prompt(prompts, texts):
    """Knows good answers but not which question they answer."""
    good = {e["reference"] for e in EXAMPLES}
    return [1.0 if t in good else -1.0 for t in texts]


@pytest.mark.parametrize("scorer, must_fail", [
    (knows_the_answers, set()),
    (loves_length, {"padded", "repetition-loop"}),
    (loves_loops, {"repetition-loop"}),
    (loves_colons, {"punctuation-run"}),
    (ignores_the_prompt, {"other-question"}),
])
def test_guard_with_scorers(scorer, must_fail):
    result = check_reward_model(EXAMPLES, scorer, RMGuardConfig())
    assert must_fail <= set(result.failed), result.message
    assert result.passed == (not must_fail)
    for name in must_fail:
        assert name in result.message
    assert result.n_prompts == len(EXAMPLES) and set(result.per_canary) == set(CANARY_NAMES)


def test_guard_scores_in_one_call_and_skips_missing_other():
    calls = []

    def scorer(prompts, texts):
        calls.append(len(texts))
        return knows_the_answers(prompts, texts)

    examples = [dict(e) for e in EXAMPLES]
    examples[0]["other"] = None
    result = check_reward_model(examples, scorer, RMGuardConfig(canaries=["other-question", "gibberish"]))
    assert calls == [len(examples) * 3 - 1]
    assert result.per_canary["other-question"]["n"] == len(examples) - 1
    assert result.per_canary["gibberish"]["n"] == len(examples)
    with pytest.raises(ValueError, match="no examples"):
        check_reward_model([], scorer, RMGuardConfig())


# ------------------------------------------------------------------------------------------ run_guard

class Recorder(Reporter):
    def __init__(self):
        self.tables, self.warnings = {}, {}

    def table(self, key, rows, description=""):
        self.tables[key] = (rows, description)

    def warning(self, key, text):
        self.warnings[key] = text


class Ctx:
    def __init__(self):
        self.reporter = Recorder()


@pytest.fixture
def fake_scorer(monkeypatch):
    import stages.rm_guard as rm_guard

    def use(scorer):
        monkeypatch.setattr(rm_guard, "rm_scorer", lambda *a, **k: scorer)
    return use


GUARD_ROWS = [{"prompt": e["prompt"], "chosen": chat(e["reference"])} for e in EXAMPLES]


def test_run_guard_stop_names_the_canaries(fake_scorer):
    from stages.rm_guard import run_guard

    fake_scorer(loves_length)
    ctx = Ctx()
    with pytest.raises(UserError) as err:
        run_guard(RMGuardConfig(), None, None, GUARD_ROWS, ctx, stage="preference-rl")
    text = str(err.value)
    assert text.startswith("preference-rl: reward-model guard failed") and "padded" in text and "repetition-loop" in text
    assert "rm_guard.on_fail" in text and "zero-weight" in text
    rows, description = ctx.reporter.tables["rm-guard"]  # the table is published before stopping
    assert len(rows) == len(CANARY_NAMES) and "FAILED" in description


def test_run_guard_zero_weight_warns(fake_scorer):
    from stages.rm_guard import run_guard

    fake_scorer(loves_loops)
    ctx = Ctx()
    summary = run_guard(RMGuardConfig(on_fail="zero-weight"), None, None, GUARD_ROWS, ctx, stage="preference-rl")
    assert summary["passed"] is False and summary["action"] == "zero-weight"
    assert "repetition-loop" in summary["failed_canaries"]
    assert "weights are set to 0" in ctx.reporter.warnings["rm-guard-failed"]


def test_run_guard_passes(fake_scorer):
    from stages.rm_guard import run_guard

    fake_scorer(knows_the_answers)
    ctx = Ctx()
    summary = run_guard(RMGuardConfig(n_prompts=3), None, None, GUARD_ROWS, ctx)
    assert summary["passed"] and summary["action"] == "trusted" and summary["n_prompts"] == 3
    assert not ctx.reporter.warnings and "passed" in ctx.reporter.tables["rm-guard"][1]
    with pytest.raises(UserError, match="no held-out rows"):
        run_guard(RMGuardConfig(), None, None, [{"prompt": user("q"), "chosen": ""}], ctx)


# ------------------------------------------------------------------------------------------ synthetic pairs

def test_synthetic_pairs():
    data = rows(20)
    pairs = synthetic_pairs(data, 0.5, seed=0)
    assert len(pairs) == 10
    assert [p["rejected_kind"] for p in pairs[:6]] == [f"synthetic-{n}" for n in CANARY_NAMES]
    refs = {r["chosen"][0]["content"] for r in data}
    for p in pairs:
        assert p["chosen"][0]["content"] in refs and p["rejected"][0]["content"] != p["chosen"][0]["content"]
        assert p["prompt"][0]["role"] == "user"
    assert pairs == synthetic_pairs(data, 0.5, seed=0)
    assert pairs != synthetic_pairs(data, 0.5, seed=1)
    assert synthetic_pairs(data, 0.0, seed=0) == [] and synthetic_pairs([], 1.0, seed=0) == []
    other = [p for p in synthetic_pairs(data, 2.0, seed=0) if p["rejected_kind"] == "synthetic-other-question"]
    assert other and all(p["rejected"][0]["content"] in refs for p in other)


# ------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("bad, where", [
    ({"canaries": ["nope"]}, "unknown canary"),
    ({"canaries": []}, "at least one"),
    ({"min_pass_share": 1.5}, "min_pass_share"),
    ({"pad_factor": 1.0}, "pad_factor"),
    ({"loop_repeats": 1}, "loop_repeats"),
    ({"on_fail": "warn"}, "on_fail"),
    ({"n_prompts": 0}, "n_prompts"),
    ({"typo": 1}, "typo"),
])
def test_config_rejects(bad, where):
    with pytest.raises(ValidationError, match=where):
        RMGuardConfig(**bad)


def test_config_is_documented_and_dedups():
    assert all(f.description for f in RMGuardConfig.model_fields.values())
    assert RMGuardConfig(canaries=["padded", "padded", "gibberish"]).canaries == ["padded", "gibberish"]
    assert RMGuardConfig().on_fail == "stop" and RMGuardConfig().canaries == list(CANARY_NAMES)
