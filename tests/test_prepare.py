"""The world stage of real pipelines (stages/prepare.py), the system prompt, end-of-turn alignment and
`--rehearse`: pure parts with many cases, plus the config they are written in (flows.yaml `smol`)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from stages.common import R1_SYSTEM_PROMPT, UserError, add_system_prompt, resolve_system_prompt
from stages.prepare import (
    candidate_answers,
    drop_heldout_overlap,
    loop_of,
    preference_pairs,
    question_key,
    r1_completion,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, first", [
    ("The final answer to this arithmetic problem is 6.", "6."[:-1]),
    ("The answer is: 12", "12"),
    ("So the answer = -4.", "-4"),
    ("4 + 5 = 9", "9"),
    ("It appears 3 times.\n", "3"),
    ("The answer is **tuobnrut**.", "tuobnrut"),
    ("First 2, then 1,000 apples", "1000"),
    ("no digits here\nblue", "blue"),
])
def test_candidate_answers_puts_the_most_specific_first(text, first):
    assert candidate_answers(text)[0] == first


def test_candidate_answers_lists_each_candidate_once_and_nothing_for_empty_text():
    assert candidate_answers("") == []
    assert candidate_answers("   \n ") == []
    got = candidate_answers("The answer is 7\n7")
    assert got == ["7"]  # after "answer is", last number and last line are all "7"
    assert candidate_answers("x is 3 and y is 4.\nSo it is 4") == ["4", "So it is 4"]


def test_question_key_folds_case_and_space_and_reads_the_last_user_message():
    a = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "What  is 1 +\n1?"}]}
    b = {"prompt": "what is 1 + 1?"}
    assert question_key(a) == question_key(b) == "what is 1 + 1?"
    assert question_key({"prompt": [{"role": "system", "content": "only"}]}) == ""


def test_drop_heldout_overlap_removes_training_rows_only():
    row = lambda q: {"prompt": [{"role": "user", "content": q}]}  # noqa: E731
    data = {"train": [row("a"), row("B"), row("c")], "eval": [row("b"), row("d")], "dev": [row("c ")],
            "other": [row("e")]}
    dropped = drop_heldout_overlap(data, ["eval", "dev"])
    assert dropped == {"train": 2, "other": 0}
    assert [question_key(r) for r in data["train"]] == ["a"]
    assert len(data["eval"]) == 2 and len(data["dev"]) == 1  # held-out sets never change


def test_r1_completion_is_well_formed_for_the_format_reward():
    from stages.rewards import extract_answer, format_problem

    text = r1_completion("  The answer is 6.  ", 6)
    assert text == "<think>The answer is 6.</think><answer>6</answer>"
    assert format_problem(text) is None and extract_answer(text) == "6"


def test_loop_of_repeats_one_phrase():
    text = loop_of("one two three four five six", random.Random(0), repeats=5)
    words = text.split()
    assert len(words) == 15 and words[:3] * 5 == words


def test_preference_pairs_prefer_verified_answers_and_name_the_rejected_kind():
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i)} for i in range(5)]
    replies = [["It is 0.", "It is 5."], ["It is 1.", "It is 1."], ["no idea", "still no"], ["It is 3."],
               ["It is 4.", "It is 9."]]
    oks = [[True, False], [True, True], [False, False], [True], [True, False]]
    pairs = preference_pairs(rows, replies, oks, seed=0)
    assert [p["prompt"][0]["content"] for p in pairs] == ["q0", "q1", "q3", "q4"]  # q2 has no verified answer
    assert [p["rejected_kind"] for p in pairs] == ["wrong", "other-question", "loop", "wrong"]
    by_q = {p["prompt"][0]["content"]: p for p in pairs}
    assert by_q["q0"]["chosen"][0]["content"] == "<think>It is 0.</think><answer>0</answer>"
    assert by_q["q0"]["rejected"][0]["content"] == "<think>It is 5.</think><answer>5</answer>"
    assert by_q["q1"]["rejected"][0]["content"] in {p["chosen"][0]["content"] for p in pairs} - {
        by_q["q1"]["chosen"][0]["content"]}
    assert by_q["q3"]["rejected"][0]["content"].count("It is 3.") == 0 or "</think>" in by_q["q3"]["rejected"][0]["content"]
    for p in pairs:
        assert p["rejected"] != p["chosen"]


def test_preference_pairs_without_wrong_answers_or_other_prompts_fall_back_to_loops():
    rows = [{"prompt": [{"role": "user", "content": "q"}], "answer": "7"}]
    pairs = preference_pairs(rows, [["It is 7."]], [[True]], seed=1)
    assert [p["rejected_kind"] for p in pairs] == ["loop"]


@pytest.mark.parametrize("prompt, expected", [
    ([{"role": "user", "content": "q"}], [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]),
    ([{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}],
     [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]),
    ("plain text", "plain text"),
    ([], []),
])
def test_add_system_prompt(prompt, expected):
    assert add_system_prompt(prompt, "S") == expected
    assert add_system_prompt(prompt, None) == prompt


def test_resolve_system_prompt():
    assert resolve_system_prompt("r1") == R1_SYSTEM_PROMPT and "<think>" in R1_SYSTEM_PROMPT
    assert resolve_system_prompt("Be brief.") == "Be brief."
    assert resolve_system_prompt(None) is None


# ------------------------------------------------------------------------------------------ config


def _smol_raw() -> dict:
    return yaml.safe_load((ROOT / "flows.yaml").read_text())


def _write(tmp_path: Path, pipeline: dict) -> Path:
    path = tmp_path / "flows.yaml"
    path.write_text(yaml.safe_dump({"default": "p", "pipelines": {"p": pipeline}}, sort_keys=False))
    return path


def test_shipped_smol_pipeline_validates_with_an_import_world_and_the_r1_system_prompt():
    loaded = load_config(ROOT / "flows.yaml")
    _, pipe = loaded.get("smol")
    assert pipe.world.kind == "import" and pipe.system_prompt == "r1"
    assert pipe.world.heldout == ["eval", "dev", "general_eval"]
    assert pipe.stages.reasoning_rl.monitor.dataset == "world:dev"  # test data never drives model selection
    _, tiny = loaded.get("tiny")
    assert tiny.world.kind == "tiny" and tiny.system_prompt is None


@pytest.mark.parametrize("change, expected", [
    (lambda w: w.update(heldout=["nope"]), "heldout: 'nope' is not under `datasets`"),
    (lambda w: w["self_samples"].update(general_from="missing"), "self_samples.general_from: 'missing' is not under"),
    (lambda w: w["datasets"].update(cold_start="world:x"), "datasets.cold_start: the name is made by `self_samples`"),
    (lambda w: w["base_model"].pop("license"), "world.import.base_model.license: required key is missing"),
    (lambda w: w.update(kind="imported"), "world: Input tag 'imported' found using _world_kind() does not match"),
])
def test_import_world_config_errors_name_the_field(tmp_path, change, expected):
    raw = _smol_raw()["pipelines"]["smol"]
    change(raw["world"])
    with pytest.raises(UserError) as err:
        load_config(_write(tmp_path, raw))
    assert any(expected in line for line in err.value.problems), err.value.problems


def test_rehearsal_shrinks_steps_and_rows_keeps_the_code_paths_and_uses_its_own_store(tmp_path):
    path = _write(tmp_path, _smol_raw()["pipelines"]["smol"])
    real, rehearsal = load_config(path), load_config(path, rehearse=True)
    _, pipe = real.get("p")
    _, reh = rehearsal.get("p")
    assert rehearsal.storage_root("p").name == real.storage_root("p").name + "-rehearse"
    for stage in ("cold-start", "reasoning-rl", "rejection-sft", "reward-model", "preference-rl"):
        assert reh.stage_config(stage).trainer["max_steps"] == 2, stage
    assert reh.stages.reasoning_rl.trainer["num_generations"] == 2
    assert reh.stages.reasoning_rl.trainer["per_device_train_batch_size"] % 2 == 0
    assert reh.eval.limit == 4 and pipe.eval.backend == "vllm" and reh.eval.backend == "transformers"
    assert reh.stages.rejection_sft.generation.backend == "vllm" and reh.stages.rejection_sft.generation.n == 2
    assert reh.stages.rejection_sft.judge.model == pipe.stages.rejection_sft.judge.model
    assert all(ref.reasoning_gym.size <= 24 for ref in reh.world.datasets.values())
    assert reh.stages.reasoning_rl.rewards == pipe.stages.reasoning_rl.rewards
    assert pipe.stages.cold_start.trainer["max_steps"] > 2  # the real config is untouched


def test_system_prompt_is_part_of_the_version_id(tmp_path):
    from pipeline.flows import identity_config
    from pipeline.store import Store

    raw = _smol_raw()["pipelines"]["smol"]
    ids = []
    for prompt in ("r1", "Answer briefly.", None):
        _, pipe = load_config(_write(tmp_path, {**raw, "system_prompt": prompt})).get("p")
        ids.append(Store.make_id("cold-start", identity_config(pipe, "cold-start"), {}, "code"))
    assert len(set(ids)) == 3
