"""Generation backends on the tiny world's base model: transformers and a real vLLM CPU engine."""

import json
from pathlib import Path

import pytest

import small
from stages.tiny import world
from stages.common import StageContext, UserError
from stages.generation import GenerationConfig, generate, prompt_texts

SMALL = small.WORLD


def small_world(tmp_path_factory) -> Path:
    """One small world per test session (shared with test_stage_ml through the base temp dir)."""
    root = tmp_path_factory.getbasetemp() / "small-world"
    if not (root / "base_model" / "config.json").exists():
        world.run(world.Config(**SMALL), StageContext(out_dir=root, work_dir=root / "_work", inputs={}, pipeline=None, seed=0))
    return root


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    return str(small_world(tmp_path_factory) / "base_model")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> list:
    rows = [json.loads(line) for line in open(small_world(tmp_path_factory) / "data" / "eval.jsonl")]
    return [r["prompt"] for r in rows[:5]] + ["Question: What is 12 + 30? Solution:"]


def check_shape(out, n_prompts, n, max_new_tokens):
    assert len(out) == n_prompts
    for records in out:
        assert len(records) == n
        for r in records:
            assert set(r) == {"text", "num_tokens", "finish_reason"}
            assert isinstance(r["text"], str) and isinstance(r["num_tokens"], int)
            assert 1 <= r["num_tokens"] <= max_new_tokens
            assert r["finish_reason"] in ("stop", "length")
            assert r["finish_reason"] == "stop" or r["num_tokens"] == max_new_tokens
            assert "<|im_end|>" not in r["text"] and "<|endoftext|>" not in r["text"]


def test_prompt_texts_applies_chat_template(base_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    texts = prompt_texts(tok, [[{"role": "user", "content": "What is 1 + 2?"}], "plain text"])
    assert texts == ["<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n", "plain text"]


@pytest.mark.parametrize("bad", [3, None, [{"content": "no role"}], [["nested"]], {"role": "user"}])
def test_prompt_texts_rejects_bad_prompts(base_model, bad):
    from transformers import AutoTokenizer

    with pytest.raises(UserError, match="prompt 1"):
        prompt_texts(AutoTokenizer.from_pretrained(base_model), ["ok", bad])


def test_transformers_backend_shape_seed_and_greedy(base_model, prompts):
    cfg = GenerationConfig(backend="transformers", n=3, max_new_tokens=12, batch_size=4, seed=7)
    seen = []
    out = generate(base_model, prompts, cfg, progress=seen.append)
    check_shape(out, len(prompts), 3, 12)
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert generate(base_model, prompts, cfg) == out  # seeded
    greedy = generate(base_model, prompts, cfg.model_copy(update={"temperature": 0.0}))
    check_shape(greedy, len(prompts), 3, 12)
    assert all(records[0] == records[1] == records[2] for records in greedy)
    assert generate(base_model, [], cfg) == []


def test_length_finish_reason(base_model):
    out = generate(base_model, ["1 2 3 4 5 6 7"], GenerationConfig(n=2, max_new_tokens=1, temperature=1.0))
    for r in out[0]:
        assert r["num_tokens"] == 1
        assert (r["finish_reason"] == "stop") == (r["text"] == "")


@pytest.mark.slow
def test_vllm_backend_matches_transformers_shape_and_greedy(base_model, prompts):
    """A real vLLM CPU engine (about 30 s to start): same record shape, and greedy decoding agrees with
    transformers on most prompts (same float32 weights)."""
    vcfg = GenerationConfig(backend="vllm", n=2, max_new_tokens=16, temperature=0.0, max_model_len=256)
    tcfg = vcfg.model_copy(update={"backend": "transformers"})
    v, t = generate(base_model, prompts, vcfg), generate(base_model, prompts, tcfg)
    check_shape(v, len(prompts), 2, 16)
    agree = sum(a[0]["text"] == b[0]["text"] for a, b in zip(v, t))
    assert agree >= len(prompts) // 2, (v, t)
