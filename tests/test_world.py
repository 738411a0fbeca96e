"""The tiny world: task generator, datasets, tokenizer, cards, determinism of a full build."""

import hashlib
import json
import random
from pathlib import Path

import pytest

from stages import world
from stages.common import StageContext
from stages.rewards import extract_answer, format_reward, language_share, reasoning_text, verify_answer

SMALL = dict(n_cold_start=40, n_rl_prompts=40, n_eval=20, n_general_sft=20, n_general_prompts=20,
             n_general_eval=10, n_preference=30, pretrain_steps=8, pretrain_corpus_lines=400,
             pretrain_batch_size=8, pretrain_seq_len=64, judge=False)


def build(path: Path, seed: int = 0, **kw) -> dict:
    cfg = world.Config(**{**SMALL, **kw})
    return world.run(cfg, StageContext(out_dir=path, work_dir=path / "_work", inputs={}, pipeline=None, seed=seed))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- pure functions

PAIRS = [(0, 0), (5, 7), (9, 1), (99, 1), (347, 85), (85, 347), (999, 999), (100, 900), (12, 3456), (5000, 5000)]


@pytest.mark.parametrize("a,b", PAIRS + [(random.Random(i).randint(0, 9999), random.Random(-i).randint(0, 9999)) for i in range(20)])
def test_chain_of_thought_is_correct_and_well_formed(a, b):
    text = world.reasoning_completion(a, b)
    assert verify_answer(str(a + b), extract_answer(text)) is True
    assert format_reward([text]) == [1.0]
    # the digits written column by column, read back in reverse, are the sum
    written = [part.split(" ")[0].rstrip(".,") for part in text.split("write ")[1:]]
    assert int("".join(reversed(written))) == a + b


@pytest.mark.parametrize("swap", range(len(world.CJK_SWAPS)))
def test_cjk_chains_mix_languages_but_stay_correct(swap):
    text = world.reasoning_completion(347, 85, cjk=swap)
    assert world.CJK_SWAPS[swap][1] in text
    assert verify_answer("432", extract_answer(text)) is True
    assert language_share(reasoning_text(text), "en") < 1.0
    assert language_share(reasoning_text(world.reasoning_completion(347, 85)), "en") == 1.0


def test_datasets_deterministic_and_disjoint():
    cfg = world.Config(**SMALL)
    a, b, c = world.build_datasets(cfg, 0), world.build_datasets(cfg, 0), world.build_datasets(cfg, 1)
    assert a == b and a != c
    assert {k: len(v) for k, v in a.items()} == {
        "eval": 20, "rl_prompts": 40, "cold_start": 40, "general_eval": 10, "general_sft": 20,
        "general_prompts": 20, "preference": 30}
    train_prompts = {r["prompt"][0]["content"] for r in a["cold_start"] + a["rl_prompts"]}
    key = lambda row: row["answer"] + "|" + "".join(ch for ch in row["prompt"][0]["content"] if ch.isdigit() or ch == " ")  # noqa: E731
    assert not {key(r) for r in a["eval"]} & {key(r) for r in a["cold_start"] + a["rl_prompts"]}
    assert not {r["prompt"][0]["content"] for r in a["eval"]} & train_prompts
    general_train = {r["prompt"][0]["content"] for r in a["general_sft"] + a["general_prompts"] + a["preference"]}
    assert not {r["prompt"][0]["content"] for r in a["general_eval"]} & general_train


def test_gold_answers_and_digit_bounds():
    cfg = world.Config(**{**SMALL, "min_digits": 3, "max_digits": 4, "n_rl_prompts": 300})
    for row in world.build_datasets(cfg, 3)["rl_prompts"]:
        nums = [int(t.strip("?.")) for t in row["prompt"][0]["content"].split() if t.strip("?.").isdigit()]
        assert len(nums) == 2 and sum(nums) == int(row["answer"])
        assert all(3 <= len(str(x)) <= 4 for x in nums)


def test_preference_pairs_are_clearly_ordered():
    rows = world.build_datasets(world.Config(**{**SMALL, "n_preference": 60}), 0)["preference"]
    assert {r["rejected_kind"] for r in rows} == set(world.REJECT_KINDS)
    for r in rows:
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert chosen != rejected
        assert format_reward([chosen]) == [1.0]
        if r["rejected_kind"] == "no_format":
            assert format_reward([rejected]) == [0.0]


# ----------------------------------------------------------------------------- full build


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    base = tmp_path_factory.mktemp("worlds")
    m1 = build(base / "a", seed=0)
    m2 = build(base / "b", seed=0)
    m3 = build(base / "c", seed=1)
    return base, m1, m2, m3


@pytest.mark.slow
def test_same_seed_same_bytes_different_seed_different(two_builds):
    base, m1, m2, m3 = two_builds
    for name in world.DATASETS:
        assert sha(base / "a" / "data" / f"{name}.jsonl") == sha(base / "b" / "data" / f"{name}.jsonl") == m1["sha256"][name]
        assert sha(base / "a" / "data" / f"{name}.jsonl") != sha(base / "c" / "data" / f"{name}.jsonl")
    assert sha(base / "a" / "base_model" / "model.safetensors") == sha(base / "b" / "base_model" / "model.safetensors")
    assert m1["sizes"] == m3["sizes"]


@pytest.mark.slow
def test_cards_tokenizer_and_layout(two_builds):
    from huggingface_hub import DatasetCard
    from transformers import AutoTokenizer

    root = two_builds[0] / "a"
    for name in world.DATASETS:
        card = DatasetCard.load(root / "cards" / f"{name}.md")
        n = sum(1 for _ in open(root / "data" / f"{name}.jsonl"))
        assert f"Rows: {n}" in card.text and "{{" not in card.text
        assert card.data.size_categories == ["n<1K"]
    assert (root / "base_model" / "model.safetensors").is_file() and not list(root.glob("**/*.bin"))
    tok = AutoTokenizer.from_pretrained(root / "base_model")
    for tag in (world.THINK, world.THINK_END, world.ANSWER, world.ANSWER_END):
        ids = tok(tag, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] not in tok.all_special_ids  # ordinary token (STACK-NOTES trap)
    text = world.reasoning_completion(347, 85, cjk=0)
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == world.EOS and tok.pad_token == world.PAD
    gen = json.loads((root / "base_model" / "generation_config.json").read_text())
    assert tok.eos_token_id in gen["eos_token_id"]


@pytest.mark.parametrize("bad,field", [({"n_eval": 0}, "n_eval"), ({"seeed": 1}, "seeed"),
                                       ({"min_digits": 4, "max_digits": 3}, "min_digits"),
                                       ({"hidden_size": 100, "num_heads": 3}, "hidden_size")])
def test_config_rejects_unknown_and_bad_values(bad, field):
    with pytest.raises(ValueError, match=field):
        world.Config(**bad)
