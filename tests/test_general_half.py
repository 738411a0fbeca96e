"""Issue 13, part 4: a general half that can be learned and measured. The tiny world's held-out general
questions carry short reference answers, every evaluation of a generative stage reports general accuracy
on them (eval `general_dataset`; the tiny pipeline sets it), and the tiny pipeline keeps its guards on."""

import json
from pathlib import Path

import pytest

from stages import evaluate as evaluate_module
from stages.tiny import world
from stages.evaluate import Config, evaluate, general_exact_match

FLOWS = Path(__file__).resolve().parent.parent / "flows.yaml"
SMALL = dict(n_cold_start=20, n_rl_prompts=20, n_eval=8, n_general_sft=20, n_general_prompts=20,
             n_general_eval=12, n_preference=30, pretrain_steps=8, pretrain_corpus_lines=400,
             pretrain_batch_size=8, pretrain_seq_len=64, judge=False)


def _write_world(root: Path, seed: int = 0) -> dict:
    data = world.build_datasets(world.Config(**SMALL), seed)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in data.items():
        world.write_jsonl(root / "data" / f"{name}.jsonl", rows)
    return data


def test_general_dataset_is_documented_and_off_by_default():
    field = Config.model_fields["general_dataset"]
    assert Config().general_dataset is None and field.description
    assert Config(general_dataset="world:general_eval").general_dataset == "world:general_eval"


@pytest.mark.parametrize("text,ref,expected", [
    ("<think>The opposite of wet is dry.</think><answer>dry</answer>", "dry", True),
    ("<think>x</think><answer> Dry. </answer>", "dry", True),
    ("<think>x</think><answer>PARIS!</answer>", "Paris", True),
    ("<think>x</think><answer>The opposite of wet is dry.</answer>", "dry", False),  # not exactly the reference
    ("<think>x</think><answer>cold</answer>", "dry", False),
    ("<think>x</think><answer>dry</answer><answer>dry</answer>", "dry", False),   # two answers: none
    ("dry", "dry", True),                                                            # no tags: the whole text
    ("<think>The opposite of wet is dry.</think>", "dry", False),                   # no answer block
    ("<think>x</think><answer>dry</answer>", None, None),
    ("<think>x</think><answer>dry</answer>", "  ", None),
])
def test_general_exact_match(text, ref, expected):
    assert general_exact_match(text, ref) is expected


def test_evaluate_reports_general_accuracy(tmp_path, monkeypatch):
    import stages.generation

    data = _write_world(tmp_path)
    refs = {r["prompt"][0]["content"]: r["answer"] for r in data["general_eval"]}
    golds = {r["prompt"][0]["content"]: r["answer"] for r in data["eval"]}
    # a stand-in model: right on the reasoning prompts; on general prompts right (short), right (a sentence
    # containing the reference), wrong, in turn
    turn = iter(range(10 ** 6))

    def fake_generate(model_path, prompts, cfg, progress=None, trust_remote_code=False):
        out = []
        for p in prompts:
            q = p[-1]["content"]
            if q in golds:
                text = f"<think>sum</think><answer>{golds[q]}</answer>"
            else:
                k = next(turn) % 3
                text = ("<think>s</think><answer>" + [refs[q], f"It is {refs[q]}.", "banana split"][k] + "</answer>")
            out.append([{"text": text, "num_tokens": 7}] * cfg.n)
        return out

    monkeypatch.setattr(stages.generation, "generate", fake_generate)
    monkeypatch.setattr(evaluate_module, "generation_settings",
                        lambda cfg, model_path, prompts: dict(backend="transformers", max_new_tokens=cfg.max_new_tokens,
                                                              seed=cfg.seed, batch_size=cfg.batch_size))
    cfg = Config(general_dataset="world:general_eval", limit=None, k=2)
    metrics = evaluate("unused-model", cfg, tmp_path)
    assert metrics["pass@1"] == 1.0
    n = len(data["general_eval"])
    assert metrics["general_n_prompts"] == n
    assert metrics["general_accuracy"] == pytest.approx(round(sum(k % 3 != 2 for k in range(n)) / n, 4))
    assert metrics["general_exact_match"] == pytest.approx(round(sum(k % 3 == 0 for k in range(n)) / n, 4))
    assert set(metrics["general_accuracy_by_family"]) == {r["family"] for r in data["general_eval"]}
    assert metrics["general_mean_tokens"] == 7 and metrics["general_repetition"] == 0.0
    assert len(metrics["general_samples"]) == cfg.num_samples and metrics["general_samples"][2]["correct"] is False
    json.dumps(metrics)
    # off: no general keys
    assert not {k for k in evaluate("unused-model", Config(limit=None, k=1), tmp_path) if k.startswith("general")}


def test_a_general_dataset_without_answers_is_a_user_error(tmp_path, monkeypatch):
    from stages.common import UserError

    _write_world(tmp_path)
    monkeypatch.setattr(evaluate_module, "generation_settings", lambda cfg, model_path, prompts: {})
    import stages.generation
    monkeypatch.setattr(stages.generation, "generate",
                        lambda model_path, prompts, cfg, progress=None: [[{"text": "x", "num_tokens": 1}] * cfg.n] * len(prompts))
    prompts_only = tmp_path / "questions.jsonl"
    prompts_only.write_text(json.dumps({"prompt": [{"role": "user", "content": "What is the opposite of wet?"}]}) + "\n")
    with pytest.raises(UserError, match="missing required column 'answer'"):
        evaluate("unused-model", Config(general_dataset=str(prompts_only)), tmp_path)


def test_tiny_pipeline_measures_the_general_half_and_keeps_its_guards():
    from pipeline.config import load_config

    _, tiny = load_config(FLOWS).get("tiny")
    assert tiny.eval.general_dataset == "world:general_eval"
    assert tiny.stage_config("preference-rl").eval_general == "world:general_eval"
    # the guards stop stage 4 when they fail (issue 13 done-when: the trained reward model passes)
    assert tiny.stage_config("reward-model").guard.on_fail == "stop"
    assert tiny.stage_config("preference-rl").rm_guard.on_fail == "stop"


@pytest.mark.slow
def test_evaluate_a_real_model_on_the_general_half(tmp_path):
    from stages.common import StageContext

    root = tmp_path / "world"
    world.run(world.Config(**SMALL), StageContext(out_dir=root, work_dir=tmp_path / "work", inputs={}, pipeline=None, seed=0))
    cfg = Config(general_dataset="world:general_eval", limit=6, k=1, max_new_tokens=24, num_samples=2)
    metrics = evaluate(str(root / "base_model"), cfg, root)
    assert 0.0 <= metrics["general_accuracy"] <= 1.0 and 0.0 <= metrics["general_exact_match"] <= metrics["general_accuracy"]
    assert metrics["general_n_prompts"] == 6 and len(metrics["general_samples"]) == 2
    assert metrics["general_mean_tokens"] > 0
