"""The shipped GPU recipe `qwen2.5-math-1.5b` (flows.yaml), read as a GPU run: it trains on what it means to (R1's
traces in R1's format for the cold start, only assistant turns in general SFT), its lengths fit the model, its
settings are its own and not the tiny world's, and test data never chooses weights. Its datasets are read through
the recipe's own specs from the schema-faithful rows under tests/fixtures/hub/. Also the dataset transforms of
stages/data.py (`messages:` and local split slices) the recipe relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline.config import load_config
from stages.common import UserError
from stages.data import DatasetSpec, MessagesSpec, convert_conversation, load, r1_completion, split_conversation
from stages.rewards import extract_answer, format_problem, format_reward, verify_answer

ROOT = Path(__file__).resolve().parent.parent
FLOWS = ROOT / "flows.yaml"
HUB = ROOT / "tests" / "fixtures" / "hub"
QWEN = "qwen2.5-math-1.5b"
# Qwen2.5-Math-1.5B's max_position_embeddings (its config.json on the hub)
QWEN_MATH_POSITIONS = 4096
GRPO_STAGES = ("reasoning-rl", "preference-rl")
STAGES = ("cold-start", "reasoning-rl", "rejection-sft", "preference-rl")


@pytest.fixture(scope="module")
def qwen():
    return load_config(FLOWS).pipelines[QWEN]


@pytest.fixture(scope="module")
def raw():
    """The recipe as written in flows.yaml (before any stage default is merged in)."""
    return yaml.safe_load(FLOWS.read_text())["pipelines"][QWEN]


def fixture_of(spec: DatasetSpec, file: str) -> DatasetSpec:
    """The recipe's spec, reading the fixture rows of its hub dataset instead of the hub."""
    assert (HUB / file).is_file()
    return spec.model_copy(update={"path": str(HUB / file)})


OPENR1 = "open-r1/OpenR1-Math-220k/default/train.jsonl"
ULTRACHAT = "HuggingFaceH4/ultrachat_200k/default/train_sft.jsonl"


def fixture_rows(file: str) -> list[dict]:
    return [json.loads(line) for line in (HUB / file).read_text().splitlines()]


# ----------------------------------------------------------------------------------- cold start


def test_cold_start_trains_on_r1_traces_in_r1_format(qwen):
    spec = qwen.stages.cold_start.dataset
    assert spec.path == "open-r1/OpenR1-Math-220k" and "completion" not in spec.columns  # not `solution`
    ds = load(fixture_of(spec, OPENR1), None, ("prompt", "completion"))
    rows = fixture_rows(OPENR1)
    assert len(ds) == len(rows)
    for row, raw_row in zip(ds, rows):
        text = row["completion"][0]["content"]
        assert row["completion"][0]["role"] == "assistant" and len(row["completion"]) == 1
        assert format_problem(text) is None, text  # one think block, then one answer block, nothing else
        trace = raw_row["messages"][-1]["content"]
        reasoning = trace.split("</think>")[0].replace("<think>", "").strip()
        assert reasoning in text  # R1's own reasoning, not the human solution
        assert raw_row["solution"] not in text
        assert verify_answer(raw_row["answer"], extract_answer(text)) is True
        assert [m["role"] for m in row["prompt"]] == ["user"] and row["prompt"][0]["content"] == raw_row["problem"]
    # the format reward pays on every cold-start completion
    assert format_reward([r["completion"] for r in ds]) == [1.0] * len(ds)
    assert "generations" not in ds.column_names and "answer" in ds.column_names


def test_cold_start_drops_traces_a_max_length_would_cut(qwen):
    spec = qwen.stages.cold_start.dataset
    assert spec.messages.max_completion_chars is not None
    # ~3.3 characters per token of math text: a kept trace leaves room for the prompt in max_length
    assert spec.messages.max_completion_chars / 3.3 < qwen.stages.cold_start.trainer["max_length"] - 256
    short = spec.messages.model_copy(update={"max_completion_chars": 500})
    ds = load(fixture_of(spec, OPENR1).model_copy(update={"messages": short}), None, ("prompt", "completion"))
    assert 0 < len(ds) < len(fixture_rows(OPENR1))
    assert all(len(r["completion"][0]["content"]) <= 500 for r in ds)


# ----------------------------------------------------------------------------------- general SFT


def test_general_sft_never_trains_on_user_turns(qwen):
    spec = qwen.stages.rejection_sft.general
    assert spec.path == "HuggingFaceH4/ultrachat_200k" and spec.messages is not None
    ds = load(fixture_of(spec, ULTRACHAT), None, ("prompt", "completion"))
    rows = fixture_rows(ULTRACHAT)
    assert len(ds) == len(rows)
    for row, raw_row in zip(ds, rows):
        conversation = raw_row["messages"]
        assert [m["role"] for m in row["completion"]] == ["assistant"]
        assert row["completion"][0]["content"] == conversation[-1]["content"]
        assert row["prompt"] == [{"role": m["role"], "content": m["content"]} for m in conversation[:-1]]
        assert row["prompt"][-1]["role"] == "user"
        user_texts = [m["content"] for m in conversation if m["role"] == "user"]
        assert not any(u in row["completion"][0]["content"] for u in user_texts)


def test_split_conversation():
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert split_conversation(conv) == (conv[:3], [conv[3]])
    # a trailing user turn (no answer) is not part of the prompt of the last answered turn
    assert split_conversation([*conv, {"role": "user", "content": "e"}]) == (conv[:3], [conv[3]])
    assert split_conversation([{"role": "user", "content": "a"}]) is None
    assert split_conversation([{"role": "assistant", "content": "b"}]) is None
    assert split_conversation("not a conversation") is None
    system = [{"role": "system", "content": "s"}, *conv[:2]]
    assert split_conversation(system) == (system[:2], [system[2]])


@pytest.mark.parametrize("text, answer, expected", [
    ("<think>\nwork\n</think>\n\nSo \\boxed{5}.", "summary",
     "<think>\nwork\n</think>\n<answer>\nSo \\boxed{5}.\n</answer>"),
    ("<think>\nwork\n</think>\n\nSo \\boxed{5}.", "boxed", "<think>\nwork\n</think>\n<answer>\n5\n</answer>"),
    ("work (R1's template opened the block)\n</think>\nSo 5.", "summary",
     "<think>\nwork (R1's template opened the block)\n</think>\n<answer>\nSo 5.\n</answer>"),
    ("<think>a</think><think>b</think> 5", "summary", None),  # two think blocks
    ("<think>never closed", "summary", None),
    ("<think>a</think>", "summary", None),  # no summary
    ("<think> </think> 5", "summary", None),  # no reasoning
    ("<think>a</think> So 5.", "boxed", None),  # no boxed answer
    ("<think>a</think><answer>5</answer>", "summary", None),  # already tagged: not R1's raw format
    ("hello <think>a</think> 5", "summary", None),
])
def test_r1_completion(text, answer, expected):
    converted, why = r1_completion(text, answer)
    assert converted == expected
    assert (why == "") == (expected is not None)
    if expected is not None:
        assert format_problem(converted) is None


def test_unconvertible_rows_are_dropped_and_none_left_is_a_user_error(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>a</think> \\boxed{1}"}]},
            {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "no trace here"}]},
            {"messages": [{"role": "user", "content": "q3"}]}]
    file = tmp_path / "rows.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DatasetSpec(path=str(file), messages=MessagesSpec(format="r1"))
    ds = load(spec, None, ("prompt", "completion"))
    assert [r["prompt"][0]["content"] for r in ds] == ["q1"]
    assert convert_conversation(rows[1]["messages"], spec.messages) == (None, "not exactly one <think>...</think> block")
    with pytest.raises(UserError, match="no row of column 'messages' could be split"):
        load(spec.model_copy(update={"path": str(file), "limit": None}).model_copy(
            update={"messages": MessagesSpec(format="r1", answer="boxed", max_completion_chars=5)}), None)
    with pytest.raises(UserError, match="column 'conversation' named in `messages` not found"):
        load(DatasetSpec(path=str(file), messages=MessagesSpec(column="conversation")), None)


def test_limit_counts_converted_rows(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": "plain" if i % 2 else "<think>a</think> 1"}]}
            for i in range(10)]
    file = tmp_path / "rows.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load(DatasetSpec(path=str(file), limit=3, messages=MessagesSpec(format="r1")), None)
    assert [r["prompt"][0]["content"] for r in ds] == ["q0", "q2", "q4"]


def test_messages_and_a_prompt_or_completion_mapping_clash():
    with pytest.raises(ValidationError, match="columns: completion, prompt come from `messages`"):
        DatasetSpec(path="x", columns={"prompt": "p", "completion": "c"}, messages={})
    assert DatasetSpec(path="x", columns={"answer": "solution"}, messages={}).messages.column == "messages"


# ----------------------------------------------------------------------------------- lengths


def test_lengths_fit_the_models_context_window(qwen):
    ev = qwen.eval
    assert ev.max_model_len is not None and ev.max_model_len <= QWEN_MATH_POSITIONS
    assert ev.max_new_tokens <= ev.max_model_len - 512  # room for the system prompt and the problem
    gen = qwen.stages.rejection_sft.generation
    assert gen.max_model_len <= QWEN_MATH_POSITIONS and gen.max_new_tokens <= gen.max_model_len - 512
    for stage in ("cold-start", "rejection-sft"):
        assert qwen.stage_config(stage).trainer["max_length"] <= QWEN_MATH_POSITIONS
    for stage in GRPO_STAGES:
        t = qwen.stage_config(stage).trainer
        assert t["vllm_max_model_length"] <= QWEN_MATH_POSITIONS
        assert t["max_completion_length"] <= t["vllm_max_model_length"] - 512
        monitor = qwen.stage_config(stage).monitor
        assert monitor.max_new_tokens <= t["max_completion_length"]
    eg = qwen.stages.preference_rl.eval_generation
    assert eg.max_model_len <= QWEN_MATH_POSITIONS and eg.max_new_tokens <= eg.max_model_len - 512


def test_stage3_filters_are_sized_for_long_reasoning(qwen):
    from stages.filters import FilterConfig

    filters, gen = qwen.stages.rejection_sft.filters, qwen.stages.rejection_sft.generation
    tiny = FilterConfig()
    assert "max_chars" in filters.model_fields_set and "max_paragraph_chars" in filters.model_fields_set
    # a completion that used its whole token budget (>= 3 characters per token) still fits the length filter
    assert filters.max_chars >= 3 * gen.max_new_tokens > tiny.max_chars
    assert tiny.max_paragraph_chars < filters.max_paragraph_chars < filters.max_chars


def test_judge_runs_in_bf16_with_a_context_that_fits_its_prompts(qwen):
    judge = qwen.stages.rejection_sft.judge
    gen, policy = judge.generation, qwen.stages.rejection_sft.generation
    assert judge.model == "Qwen/Qwen2.5-7B-Instruct" and gen.backend == "vllm"
    assert gen.dtype == "bfloat16" and not gen.enforce_eager
    # question + reference solution (~1k tokens each at most) + a full response + the verdict
    assert gen.max_model_len >= policy.max_new_tokens + 2 * 1024 + gen.max_new_tokens
    assert gen.max_model_len <= 32768  # Qwen2.5-7B-Instruct's max_position_embeddings


def test_eval_runs_on_the_gpu_settings(qwen):
    ev = qwen.eval
    assert ev.backend == "vllm" and ev.dtype == "bfloat16" and ev.enforce_eager is False
    assert {"dtype", "max_model_len", "enforce_eager", "gpu_memory_utilization"} <= ev.model_fields_set
    assert qwen.stages.rejection_sft.generation.dtype == "bfloat16"
    assert qwen.stages.preference_rl.eval_generation.dtype == "bfloat16"


# ----------------------------------------------------------------------------------- trainer settings


def stage_defaults() -> dict[str, dict]:
    """What each stage merges under the recipe's `trainer:` block: the tiny world's settings."""
    from stages import cold_start_sft, preference_rl, reasoning_rl, rejection_sft

    return {"cold-start": cold_start_sft.default_sft_args(), "reasoning-rl": reasoning_rl.default_grpo_args(),
            "rejection-sft": rejection_sft.default_sft_args(), "preference-rl": dict(preference_rl.GRPO_DEFAULTS)}


def merged_trainer(qwen, stage: str) -> dict:
    """The mapping the stage hands to TRL (preference-rl merges its GRPO_DEFAULTS at run time)."""
    from stages import preference_rl

    t = qwen.stage_config(stage).trainer
    return {**preference_rl.GRPO_DEFAULTS, **t} if stage == "preference-rl" else dict(t)


@pytest.mark.parametrize("stage", STAGES)
def test_no_tiny_default_is_left_to_apply(qwen, raw, stage):
    """Every key a stage default would add to the qwen recipe is set by the recipe itself."""
    written = raw["stages"][stage]["trainer"]
    leaked = {k: v for k, v in stage_defaults()[stage].items() if k not in written}
    assert leaked == {}, f"{stage}: tiny defaults still apply: {leaked}"
    merged = merged_trainer(qwen, stage)
    assert {k: merged[k] for k in written} == written


@pytest.mark.parametrize("stage", STAGES)
def test_trainer_states_its_length_schedule_checkpoints_and_precision(qwen, raw, stage):
    written = raw["stages"][stage]["trainer"]
    assert {"max_steps", "lr_scheduler_type", "warmup_steps", "save_steps", "save_total_limit",
            "learning_rate"} <= set(written)
    if written["max_steps"] <= 0:  # epochs decide (max_steps > 0 would override num_train_epochs)
        assert written["num_train_epochs"] >= 1
    assert written["bf16"] is True and written["gradient_checkpointing"] is True
    assert written.get("fp16", False) is False


@pytest.mark.parametrize("stage", GRPO_STAGES)
def test_grpo_stages_hold_whole_groups_and_generate_with_vllm(qwen, stage):
    t = merged_trainer(qwen, stage)
    generation_batch = t["per_device_train_batch_size"] * t.get("gradient_accumulation_steps", 1)
    assert generation_batch % t["num_generations"] == 0
    assert t["use_vllm"] is True and t["vllm_mode"] == "colocate"


# ----------------------------------------------------------------------------------- dev split, not test data


@pytest.mark.parametrize("stage", GRPO_STAGES)
def test_reward_hacking_monitor_uses_a_dev_split_disjoint_from_training(qwen, stage, tmp_path):
    cfg = qwen.stage_config(stage)
    dev = cfg.monitor.dataset
    assert dev is not None and cfg.monitor.enabled
    assert dev != qwen.eval.dataset and "MATH-500" not in dev.path
    assert not dev.split.startswith("test")  # MATH-500 is drawn from MATH's test split
    train_specs = [qwen.stages.reasoning_rl.dataset, qwen.stages.rejection_sft.prompts, qwen.stages.preference_rl.prompts]
    assert {s.path for s in train_specs} == {dev.path} and {s.name for s in train_specs} == {dev.name}
    # load the dev slice and the training slices from the same 200 rows: no training row is a dev row
    file = tmp_path / "math.jsonl"
    file.write_text("".join(json.dumps({"problem": f"p{i}", "solution": f"\\boxed{{{i}}}"}) + "\n" for i in range(200)))
    dev_rows = {r["prompt"][0]["content"] for r in load(dev.model_copy(update={"path": str(file)}), None)}
    assert len(dev_rows) == cfg.monitor.n_prompts
    for spec in train_specs:
        train_rows = {r["prompt"][0]["content"] for r in load(spec.model_copy(update={"path": str(file)}), None)}
        assert train_rows and not (train_rows & dev_rows)
        assert len(train_rows | dev_rows) == 200


def test_stage4_monitor_watches_general_dev_prompts_not_the_report_set(qwen, tmp_path):
    cfg = qwen.stages.preference_rl
    general_dev = cfg.monitor.general_dataset
    assert general_dev is not None and cfg.monitor.general_n_prompts > 0
    assert general_dev.path == cfg.general_prompts.path and general_dev != cfg.eval_general
    file = tmp_path / "prompts.jsonl"
    n = cfg.general_prompts.limit + 100
    file.write_text("".join(json.dumps({"prompt": f"g{i}"}) + "\n" for i in range(n)))
    dev = {r["prompt"][0]["content"] for r in load(general_dev.model_copy(update={"path": str(file)}), None)}
    train = {r["prompt"][0]["content"] for r in load(cfg.general_prompts.model_copy(update={"path": str(file)}), None)}
    assert dev and not dev & train


def test_local_files_honour_split_slices(tmp_path):
    file = tmp_path / "rows.jsonl"
    file.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(10)))
    assert [r["answer"] for r in load(DatasetSpec(path=str(file), split="train[:3]"), None)] == ["0", "1", "2"]
    assert [r["answer"] for r in load(DatasetSpec(path=str(file), split="test[8:]"), None)] == ["8", "9"]
    assert len(load(DatasetSpec(path=str(file), split="validation"), None)) == 10  # a file has one split
