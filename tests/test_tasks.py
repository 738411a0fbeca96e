"""reasoning-gym task data (stages/tasks.py) and the `reasoning_gym` dataset reference (stages/data.py):
rows, config errors, the task-verifier reward, the agreement recorder and the documented differences
between r1flow's accuracy rule and the task verifiers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from stages.common import UserError
from stages.data import DatasetRef, DatasetSpec, ReasoningGymRef, as_spec, load
from stages.rewards import extract_answer, verify_answer
from stages.tasks import (
    ReasoningGymSpec,
    VerifierAgreement,
    entry_json,
    question_overlap,
    seed_range,
    seed_ranges_overlap,
    setting_names,
    task_card,
    task_reward,
    task_rows,
    task_score,
)

ROOT = Path(__file__).resolve().parent.parent
TWO_TERMS = {"min_terms": 2, "max_terms": 2}


def spec(task="chain_sum", size=5, seed=1, **settings) -> ReasoningGymSpec:
    return ReasoningGymSpec(task=task, settings=settings, size=size, seed=seed)


def wrap(answer: str) -> str:
    return f"<think>adding up</think><answer>{answer}</answer>"


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def entry(gold: str) -> dict:
    return {"question": "q", "answer": gold, "metadata": {}}


class Holder(BaseModel):
    dataset: DatasetRef
    extra: DatasetRef | None = None


def problems(value) -> list[str]:
    """The config loader's lines for a Holder(dataset=value)."""
    from pipeline.config import validation_problems

    with pytest.raises(ValidationError) as exc:
        Holder(dataset=value)
    return validation_problems(exc.value)


# --------------------------------------------------------------------------------------------------
# Rows

def test_rows_have_r1flow_shape():
    rows = task_rows(spec(size=4, **TWO_TERMS))
    assert len(rows) == 4
    for row in rows:
        assert set(row) == {"prompt", "answer", "task", "task_entry", "solution"}
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert row["task"] == "chain_sum" and row["solution"] is None
        decoded = json.loads(row["task_entry"])
        assert decoded["question"] == row["prompt"][0]["content"]
        assert str(decoded["answer"]) == row["answer"] and isinstance(row["answer"], str)
        assert decoded["metadata"]["num_terms"] == 2  # the settings reached the generator
        assert decoded["metadata"]["difficulty"]["num_terms"] == [2, 2]  # tuple -> list


def test_rows_are_deterministic_and_depend_on_the_seed():
    a, b = task_rows(spec(size=6, seed=7)), task_rows(spec(size=6, seed=7))
    assert a == b
    assert task_rows(spec(size=6, seed=1000)) != a


def test_rows_do_not_depend_on_the_hash_seed():
    code = ("import json; from stages.tasks import ReasoningGymSpec, task_rows; "
            "print(json.dumps([task_rows(ReasoningGymSpec(task=t, size=5, seed=3)) "
            "for t in ('chain_sum', 'leg_counting', 'basic_arithmetic')]))")
    here = json.loads(json.dumps([task_rows(spec(t, size=5, seed=3)) for t in ("chain_sum", "leg_counting", "basic_arithmetic")]))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == here


def test_gsm_symbolic_rows_carry_the_worked_solution():
    rows = task_rows(spec("gsm_symbolic", size=3, seed=2))
    for row in rows:
        meta = json.loads(row["task_entry"])["metadata"]
        assert row["solution"] == meta["answer_cot"] and len(row["solution"]) > 20
        assert verify_answer(row["answer"], row["answer"]) is True


def test_entry_json_is_json_safe():
    class Odd:
        def __str__(self):
            return "odd!"

    decoded = json.loads(entry_json({
        "question": "q", "answer": 3,
        "metadata": {"t": (1, (2, 3)), "s": {3, 1, 2}, "mixed": {1, "a"}, "obj": Odd(), 4: "int key", "fs": frozenset({"b", "a"})},
    }))
    meta = decoded["metadata"]
    assert meta["t"] == [1, [2, 3]] and meta["s"] == [1, 2, 3] and meta["fs"] == ["a", "b"]
    assert sorted(meta["mixed"], key=str) == [1, "a"]
    assert meta["obj"] == "odd!" and meta["4"] == "int key" and decoded["answer"] == 3


# --------------------------------------------------------------------------------------------------
# Config errors (one line each, naming the thing)

@pytest.mark.parametrize("kwargs, loc, must_contain", [
    (dict(task="chain_sun", size=5, seed=1), "task", ["'chain_sun'", "did you mean chain_sum"]),
    (dict(task="no_such_thing", size=5, seed=1), "task", ["'no_such_thing'", "106 tasks"]),
    (dict(task="chain_sum", settings={"foo": 1}, size=5, seed=1), "settings",
     ["'foo'", "'chain_sum'", "min_terms, max_terms, min_digits, max_digits, allow_negation"]),
    (dict(task="chain_sum", settings={"min_term": 2}, size=5, seed=1), "settings", ["'min_term'", "did you mean 'min_terms'"]),
    (dict(task="chain_sum", settings={"size": 9}, size=5, seed=1), "settings", ["'size' is not a setting"]),
    (dict(task="chain_sum", settings={"min_terms": 3, "max_terms": 2}, size=5, seed=1), "settings",
     ["invalid settings for task 'chain_sum'", "max_terms must be >= min_terms", "min_terms=3"]),
    (dict(task="chain_sum", settings={"min_digits": 0}, size=5, seed=1), "settings", ["min_digits must be positive"]),
    (dict(task="chain_sum", settings={"min_terms": "two"}, size=5, seed=1), "settings", ["'min_terms'", "expected int", "'two'"]),
    (dict(task="basic_arithmetic", settings={"format_style": "fancy"}, size=5, seed=1), "settings", ["'format_style'", "'fancy'"]),
    (dict(task="chain_sum", size=0, seed=1), "size", ["greater than 0"]),
])
def test_spec_errors_are_one_line_naming_the_problem(kwargs, loc, must_contain):
    with pytest.raises(ValidationError) as exc:
        ReasoningGymSpec(**kwargs)
    errors = exc.value.errors()
    assert [e["loc"] for e in errors] == [(loc,)]
    msg = errors[0]["msg"]
    assert "\n" not in msg
    for part in must_contain:
        assert part in msg


def test_spec_requires_task_size_and_seed_and_forbids_extra_keys():
    with pytest.raises(ValidationError) as exc:
        ReasoningGymSpec(task="chain_sum", limit=3)
    assert {(e["loc"], e["type"]) for e in exc.value.errors()} == {
        (("size",), "missing"), (("seed",), "missing"), (("limit",), "extra_forbidden")}


def test_settings_are_coerced_to_the_task_field_types():
    s = spec("basic_arithmetic", min_terms="2", max_terms=2.0, operators=["+", "-"])
    assert s.settings == {"min_terms": 2, "max_terms": 2, "operators": ["+", "-"]}
    assert isinstance(s.settings["min_terms"], int)
    rows = task_rows(s)
    assert all(json.loads(r["task_entry"])["metadata"]["num_terms"] == 2 for r in rows)


def test_setting_names_leave_out_size_and_seed():
    assert setting_names("leg_counting") == ["min_animals", "max_animals", "min_instances", "max_instances"]


def test_spec_documents_every_field():
    assert all(f.description for f in ReasoningGymSpec.model_fields.values())
    assert all(f.description for f in ReasoningGymRef.model_fields.values())


# --------------------------------------------------------------------------------------------------
# The dataset reference kind

RG = {"reasoning_gym": {"task": "chain_sum", "settings": TWO_TERMS, "size": 6, "seed": 1}}


def test_dataset_ref_accepts_the_reasoning_gym_mapping():
    h = Holder(dataset=RG, extra=copy.deepcopy(RG))
    assert isinstance(h.dataset, ReasoningGymRef) and h.dataset.reasoning_gym.size == 6
    assert h.dataset.path == "reasoning_gym:chain_sum" and as_spec(h.dataset).path == "reasoning_gym:chain_sum"
    assert Holder.model_validate(h.model_dump()) == h
    assert h.model_dump(mode="json")["dataset"] == RG
    # the other kinds are unchanged
    assert Holder(dataset="world:rl_prompts").dataset == "world:rl_prompts"
    assert Holder(dataset={"path": "x", "split": "test"}).dataset == DatasetSpec(path="x", split="test")
    assert Holder(dataset="x", extra=None).extra is None
    assert as_spec("world:eval") == DatasetSpec(path="world:eval")


@pytest.mark.parametrize("inner, expected", [
    ({"task": "chain_sun", "size": 3, "seed": 1}, ["dataset.reasoning_gym.task: unknown reasoning-gym task 'chain_sun'"]),
    ({"task": "chain_sum", "settings": {"foo": 1, "bar": 2}, "size": 3, "seed": 1},
     ["dataset.reasoning_gym.settings: unknown setting 'foo'", "dataset.reasoning_gym.settings: unknown setting 'bar'"]),
    ({"task": "chain_sum", "settings": {"min_terms": 3, "max_terms": 2}, "size": 3, "seed": 1},
     ["dataset.reasoning_gym.settings: invalid settings for task 'chain_sum': max_terms must be >= min_terms"]),
    ({"task": "chain_sum", "size": 3}, ["dataset.reasoning_gym.seed: required key is missing"]),
])
def test_config_loader_lines_name_the_field(inner, expected):
    lines = problems({"reasoning_gym": inner})
    assert len(lines) == len(expected)
    for line, start in zip(lines, expected):
        assert line.startswith(start), line


def test_reasoning_gym_mapping_with_other_keys_is_not_a_dataset_spec():
    lines = problems({"reasoning_gym": {"task": "chain_sum", "size": 3, "seed": 1}, "path": "x"})
    assert lines == ["dataset.path: unknown key"]


def test_plain_dataset_ref_errors_are_unchanged():
    # exactly what Union[str, DatasetSpec] reported before the new kind existed
    assert problems({"path": "x", "foo": 1}) == [
        "dataset.str: Input should be a valid string", "dataset.DatasetSpec.foo: unknown key"]


def test_flows_file_with_a_reasoning_gym_dataset(tmp_path):
    from pipeline.config import load_config

    data = yaml.safe_load((ROOT / "flows.yaml").read_text())
    data["pipelines"]["tiny"]["stages"]["reasoning-rl"]["dataset"] = {
        "reasoning_gym": {"task": "leg_counting", "settings": {"max_animals": 4}, "size": 4, "seed": 9}}
    path = tmp_path / "flows.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    ref = load_config(path).get("tiny")[1].stages.reasoning_rl.dataset
    assert isinstance(ref, ReasoningGymRef) and ref.reasoning_gym.settings == {"max_animals": 4}

    data["pipelines"]["tiny"]["stages"]["reasoning-rl"]["dataset"]["reasoning_gym"]["task"] = "leg_countin"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(UserError) as exc:
        load_config(path)
    [line] = exc.value.problems
    assert line.startswith(f"{path}: pipelines.tiny.stages.reasoning-rl.dataset.reasoning_gym.task: "
                           "unknown reasoning-gym task 'leg_countin' (did you mean leg_counting")
    assert line.endswith("reasoning-gym 0.1.25 has 106 tasks, listed in reasoning_gym.factory.DATASETS)")


def test_load_materializes_the_rows(tmp_path):
    ref = Holder(dataset=RG).dataset
    ds = load(ref, None, required_columns=("prompt", "answer"))
    assert ds.num_rows == 6 and ds.column_names == ["prompt", "answer", "task", "task_entry", "solution"]
    assert ds[0]["prompt"] == task_rows(ref.reasoning_gym)[0]["prompt"]
    assert [r["answer"] for r in ds] == [r["answer"] for r in task_rows(ref.reasoning_gym)]


def test_load_reports_missing_columns_and_generation_failures(monkeypatch):
    ref = Holder(dataset=RG).dataset
    with pytest.raises(UserError) as exc:
        load(ref, None, required_columns=("prompt", "completion"))
    assert exc.value.problems == ["dataset 'reasoning_gym:chain_sum': missing required column 'completion' "
                                  "(has ['prompt', 'answer', 'task', 'task_entry', 'solution'])"]

    def broken(_spec):
        raise RuntimeError("generator exploded\nsecond line")

    monkeypatch.setattr("stages.tasks.task_rows", broken)
    with pytest.raises(UserError) as exc:
        load(ref, None)
    assert exc.value.problems == ["dataset 'reasoning_gym:chain_sum': could not be generated (RuntimeError: generator exploded)"]


def test_importing_r1flow_modules_does_not_import_reasoning_gym():
    code = "import sys, stages.data, stages.tasks; print('reasoning_gym' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# --------------------------------------------------------------------------------------------------
# task_score / task_reward

def test_task_score_on_generated_rows():
    for row in task_rows(spec(size=5, seed=4)):
        assert task_score("chain_sum", row["task_entry"], row["answer"]) == 1.0
        assert task_score("chain_sum", row["task_entry"], str(int(row["answer"]) + 1)) == 0.0


@pytest.mark.parametrize("answer", [None, "", "   "])
def test_task_score_without_an_answer_is_zero(answer):
    assert task_score("chain_sum", entry("6"), answer) == 0.0


def test_task_score_of_a_verifier_that_raises_is_zero():
    assert task_score("chain_sum", {"question": "q", "metadata": {}}, "6") == 0.0  # no "answer": KeyError


def test_task_reward_trl_signature():
    rows = task_rows(spec(size=3, seed=5))
    gold = [r["answer"] for r in rows]
    completions = [
        wrap(gold[0]),                                 # right
        wrap(str(int(gold[1]) + 1)),                   # wrong
        f"the answer is {gold[2]}",                    # malformed: no answer block
    ]
    kwargs = {"task": [r["task"] for r in rows], "task_entry": [r["task_entry"] for r in rows],
              "answer": gold, "prompts": [r["prompt"] for r in rows], "trainer_state": None, "completion_ids": [[1]] * 3}
    assert task_reward(completions, **kwargs) == [1.0, 0.0, 0.0]
    assert task_reward([chat(c) for c in completions], **kwargs) == [1.0, 0.0, 0.0]
    assert task_reward.__name__ == "task_reward"


def test_task_reward_edge_cases():
    e = entry_json(entry("6"))
    assert task_reward([wrap("6"), "\\boxed{6}", "<answer>6</answer><answer>6</answer>", wrap("16")],
                       task="chain_sum", task_entry=e) == [1.0, 1.0, 0.0, 0.5]
    # rows of a non-reasoning-gym dataset in a mix: None (can't judge)
    assert task_reward([wrap("6"), wrap("6")], task=["chain_sum", None], task_entry=[e, None]) == [1.0, None]
    assert task_reward([wrap("6")]) == [None]
    with pytest.raises(ValueError, match="2 values for 1 completions"):
        task_reward([wrap("6")], task="chain_sum", task_entry=[e, e])


# --------------------------------------------------------------------------------------------------
# VerifierAgreement

def test_verifier_agreement_counts_and_examples():
    agreement = VerifierAgreement()
    rows = task_rows(spec(size=4, seed=11, **TWO_TERMS))
    gold = [r["answer"] for r in rows]
    completions = [wrap(gold[0]), wrap(str(int(gold[1]) + 1)), chat(wrap(f"x = {gold[2]}")), "no answer"]
    out = agreement(completions, answer=gold, task="chain_sum", task_entry=[r["task_entry"] for r in rows],
                    prompts=[r["prompt"] for r in rows], trainer_state=None)
    assert out == [None] * 4 and agreement.__name__ == "verifier_agreement"
    s = agreement.summary()
    assert (s["n"], s["agree"], s["share"]) == (4, 3, 0.75)
    assert s["rule_only"] == 1 and s["task_only"] == 0 and s["partial_credit"] == 1
    assert s["by_task"]["chain_sum"]["n"] == 4 and s["by_task"]["chain_sum"]["share"] == 0.75
    [d] = s["disagreements"]
    assert d == {"task": "chain_sum", "question": rows[2]["prompt"][0]["content"], "gold": gold[2],
                 "extracted": f"x = {gold[2]}", "rule": True, "task_score": pytest.approx(d["task_score"]),
                 "completion": wrap(f"x = {gold[2]}")}
    assert 0.0 < d["task_score"] < 1.0


def test_verifier_agreement_skips_rows_without_entry_and_uses_the_entry_gold():
    agreement = VerifierAgreement()
    e = entry_json(entry("6"))
    agreement([wrap("6"), wrap("6"), wrap("-6")], answer=None, task=["gsm_symbolic", "gsm_symbolic", "gsm_symbolic"],
              task_entry=[e, None, e])
    s = agreement.summary()
    assert (s["n"], s["agree"]) == (2, 1)
    assert s["task_only"] == 1 and s["disagreements"][0]["extracted"] == "-6"
    assert s["by_task"]["gsm_symbolic"]["rule_none"] == 0


def test_verifier_agreement_rule_none_never_agrees_and_examples_are_capped(monkeypatch):
    monkeypatch.setattr("stages.tasks.verify_answer", lambda gold, answer: None)  # rule: can't judge
    agreement = VerifierAgreement()
    e = entry_json(entry("6"))
    for _ in range(3):
        agreement([wrap("7")] * 10, answer="6", task="basic_arithmetic", task_entry=e)
    s = agreement.summary()
    assert (s["n"], s["agree"], s["rule_none"]) == (30, 0, 30)
    assert len(s["disagreements"]) == 20
    agreement.reset()
    assert agreement.summary()["n"] == 0 and agreement.summary()["share"] is None


def test_verifier_agreement_from_threads():
    agreement = VerifierAgreement()
    e = entry_json(entry("6"))

    def work():
        for _ in range(5):
            agreement([wrap("6"), wrap("7")], answer="6", task="chain_sum", task_entry=e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = agreement.summary()
    assert (s["n"], s["agree"]) == (40, 40)


# --------------------------------------------------------------------------------------------------
# Documented differences (module docstring of stages/tasks.py): r1flow's rule vs the task verifiers

TASKS4 = ("chain_sum", "basic_arithmetic", "leg_counting", "gsm_symbolic")


@pytest.mark.parametrize("gold, answer, rule, scores", [
    ("6", "6", True, (1, 1, 1, 1)),
    ("6", "7", False, (0, 0, 0, 0.01)),
    ("6", "16", False, (0.5, 0.5, 0.5, 0.01)),
    ("6", "66", False, (0.5, 0.5, 0.5, 0.01)),
    ("6", "-6", False, (0.5, 0.5, 0.5, 1)),
    ("-4", "-4", True, (1, 1, 1, 0.01)),
    ("-4", "-45", False, (0.67, 0.67, 0.67, 0.01)),
    ("-4", "\u22124", True, (0, 0, 0, 0.01)),
    ("-4", "- 4", True, (0, 0, 0, 0.01)),
    ("6", "6.", True, (1, 0.5, 0.5, 1)),
    ("6", "6.0", True, (1, 0.33, 0.33, 1)),
    ("6", "+6", True, (1, 0.5, 0.5, 1)),
    ("6", "06", True, (1, 0.5, 0.5, 1)),
    ("6", "x = 6", True, (0.2, 0.2, 0.2, 1)),
    ("6", "$6$", True, (0.33, 0.33, 0.33, 1)),
    ("6", "6 legs", True, (0.17, 0.17, 0.17, 1)),
    ("6", "\\boxed{6}", True, (0.11, 0.11, 0.11, 1)),
    ("6", "The answer is 6", True, (0.07, 0.07, 0.07, 1)),
    ("6", "5 + 1 = 6", True, (0.11, 0.11, 0.11, 0.01)),
    ("6", "6, 7", False, (0.33, 0.25, 0.25, 1)),
    ("1000", "1,000", True, (1, 0, 0, 0.01)),
    ("1000", "1 000", False, (0, 0, 0, 0.01)),
    ("6", " 6 ", True, (1, 0.33, 0.33, 1)),  # unstripped (extract_answer would strip it)
])
def test_documented_differences(gold, answer, rule, scores):
    assert verify_answer(gold, answer) is rule
    got = tuple(round(task_score(task, entry(gold), answer), 2) for task in TASKS4)
    assert got == scores


def test_spaces_around_an_answer_never_reach_the_verifier():
    assert extract_answer("<answer>  6 \n</answer>") == "6"
    assert task_reward(["<answer>  6 \n</answer>"], task="basic_arithmetic", task_entry=entry_json(entry("6"))) == [1.0]


def _share(task: str, rows: list[dict], make) -> float:
    agreement = VerifierAgreement()
    agreement([wrap(make(r["answer"])) for r in rows], answer=[r["answer"] for r in rows], task=task,
              task_entry=[r["task_entry"] for r in rows])
    return agreement.summary()["share"]


@pytest.mark.parametrize("task", TASKS4)
def test_agreement_on_generated_entries(task):
    rows = task_rows(spec(task, size=12, seed=1))
    exact_string = task in ("basic_arithmetic", "leg_counting")
    assert _share(task, rows, lambda g: g) == 1.0
    assert _share(task, rows, lambda g: str(int(g) + 1)) == 1.0
    assert _share(task, rows, lambda g: str(int(g) - 1)) == 1.0
    assert _share(task, rows, lambda g: f"{g}.") == (0.0 if exact_string else 1.0)
    for fmt in ("x = {}", "${}$", "{} legs"):
        assert _share(task, rows, fmt.format) == (1.0 if task == "gsm_symbolic" else 0.0)
    if task == "gsm_symbolic":  # positive golds: the task verifier drops the minus sign
        assert all(int(r["answer"]) > 0 for r in rows)
        assert _share(task, rows, lambda g: f"-{g}") == 0.0


# --------------------------------------------------------------------------------------------------
# Splits and the data card

def test_seed_ranges_overlap_means_shared_rows():
    train, near, far = spec(size=10, seed=1), spec(size=10, seed=5), spec(size=10, seed=11)
    assert seed_range(train) == (1, 10)
    assert seed_ranges_overlap(train, near) and not seed_ranges_overlap(train, far)
    assert not seed_ranges_overlap(train, spec("leg_counting", size=10, seed=5))
    assert not seed_ranges_overlap(train, spec(size=10, seed=5, min_terms=2))
    rows = {s.seed: task_rows(s) for s in (train, near, far)}
    pairs = {seed: [(r["prompt"], r["answer"]) for r in rs] for seed, rs in rows.items()}
    assert pairs[5][:6] == pairs[1][4:]  # row i of seed s + k asks what row i + k of seed s asks
    assert question_overlap(rows[5], rows[1]) == {"shared": 6, "share": 0.6, "distinct_shared": 6}
    assert question_overlap(rows[11], rows[1])["shared"] == 0
    assert question_overlap([], rows[1]) == {"shared": 0, "share": 0.0, "distinct_shared": 0}


def test_task_card_fills_every_placeholder():
    s = spec(size=8, seed=1, **TWO_TERMS)
    text = task_card(s, name="rl_prompts", agreement={"n": 8, "agree": 6, "share": 0.75},
                     others={"eval": spec(size=4, seed=3, **TWO_TERMS), "rows": task_rows(spec(size=4, seed=500, **TWO_TERMS))})
    assert "{{ " not in text and " }}" not in text
    assert text.startswith("---\n") and "license: apache-2.0" in text and "source_datasets:\n- reasoning-gym" in text
    for part in ("`rl_prompts`", "Task: `chain_sum`", '`{"min_terms": 2, "max_terms": 2}`', "reasoning-gym` 0.1.25",
                 "Apache-2.0", "seeds 1..8", "ChainSumDataset.score_answer", "6 of 8 verdicts agree (75.0%)",
                 "| eval | chain_sum 3..6 (seed ranges intersect) | 4 (4 distinct) | 50.0% |", "| rows | - |",
                 "Rows: 8"):
        assert part in text, part
    default = task_card(spec(size=2, seed=1))
    assert "| (not checked) | - | - | - |" in default and "not measured." in default


def test_card_template_uses_the_project_placeholder_convention():
    template = (ROOT / "data_cards" / "reasoning_gym.md").read_text()
    assert template.startswith("---\n{{ card_data }}\n---\n")
    for name in ("task", "settings", "size", "seed", "package_version", "license", "verifier", "example",
                 "overlap_rows", "num_rows", "sha256"):
        assert "{{ " + name + " }}" in template, name


def test_verifier_agreement_merges_the_ranks_records():
    """Under a multi-process launch each rank scores its own completions: the merged record is their sum."""
    from stages.tasks import VerifierAgreement

    entry = {"question": "What is 2 + 2?", "answer": "4", "metadata": {}}
    ranks = [VerifierAgreement(max_examples=2) for _ in range(2)]
    done = "<think>x</think><answer>4</answer>"
    wrong = "<think>x</think><answer>5</answer>"
    ranks[0].record([done, wrong], answer="4", task="chain_sum", task_entry=entry)
    ranks[1].record([wrong, wrong, done], answer=["4", "4", "4"], task="chain_sum", task_entry=entry)
    merged = VerifierAgreement(max_examples=2)
    merged.merge([r.state() for r in ranks])
    one = VerifierAgreement(max_examples=2)
    one.record([done, wrong, wrong, wrong, done], answer="4", task="chain_sum", task_entry=entry)
    got, want = merged.summary(), one.summary()
    assert got["n"] == 5 and got == {**want, "disagreements": got["disagreements"]}
    assert len(got["disagreements"]) == len(want["disagreements"]) <= 2
    merged.gather()  # no process group: nothing changes
    assert merged.summary() == got
