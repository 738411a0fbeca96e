"""The tiny world: task generator, datasets, tokenizer, cards, determinism of a full build."""

import hashlib
import json
import random
from pathlib import Path

import pytest

from stages.tiny import world
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
        if r["rejected_kind"] in ("no_format", "truncated"):
            assert format_reward([rejected]) == [0.0]


ITEMS = {q: (intent, thought, reply) for intent, q, thought, reply in world.general_items()}


def test_general_eval_and_prompts_have_reference_answers():
    data = world.build_datasets(world.Config(), 0)
    held = data["general_eval"]
    assert len(held) == 40 and all(set(r) == {"prompt", "answer", "family"} for r in held)
    for r in held:
        intent, _, reply = ITEMS[r["prompt"][0]["content"]]
        assert r["answer"] == reply and r["family"] == intent
    # every intent is asked in held-out phrasings, never seen in a training split
    held_questions = {r["prompt"][0]["content"] for r in held}
    assert held_questions == world.held_out_general() and len(held_questions) == 40
    assert {ITEMS[q][0] for q in held_questions} == set(world.INTENTS)
    # ... each a saying and an opener that training prompts also use, in a combination they never use
    train = {r["prompt"][0]["content"] for r in data["general_sft"] + data["general_prompts"] + data["preference"]}
    assert not held_questions & train and len(train) == len(ITEMS) - 40
    for q in held_questions:
        opener = next(o for o in world.OPENERS[::-1] if q.startswith(o))
        saying = q[len(opener):]
        assert any(t.endswith(saying) and t != q for t in train), q
        assert opener == "" or any(t.startswith(opener) and ITEMS[t][0] != ITEMS[q][0] for t in train), q
    for r in data["general_prompts"]:
        assert r["answer"] == ITEMS[r["prompt"][0]["content"]][2]


def test_general_sft_answers_are_the_reference():
    from stages.monitor import general_correct

    data = world.build_datasets(world.Config(), 0)
    for r in data["general_sft"]:
        q, text = r["prompt"][0]["content"], r["completion"][0]["content"]
        _, thought, reply = ITEMS[q]
        assert format_reward([text]) == [1.0]
        assert extract_answer(text) == reply and general_correct(text, reply)
        assert reasoning_text(text).strip() == thought
    # the chosen answers of the preference pairs are in the same style
    assert all(r["chosen"] == [{"role": "assistant", "content": world.general_completion(*ITEMS[r["prompt"][0]["content"]][1:])}]
               for r in data["preference"])


def test_preference_pairs_do_not_teach_that_longer_is_better():
    from stages.reward_model import length_balance, length_balance_markdown

    for seed, n in ((0, 1200), (1, 1200), (0, 300)):
        rows = world.build_datasets(world.Config(n_preference=n), seed)["preference"]
        balance = world.length_balance(rows)
        assert balance == length_balance(rows)  # same statistics as the reward-model stage reports
        assert world.length_balance_markdown(balance) == length_balance_markdown(balance)
        assert 0.4 <= balance["all"]["chosen_longer_share"] <= 0.6, balance["all"]
        # rejected answers longer than the chosen one are as common as shorter ones (within 10 points)
        longer = sum(balance[k]["pairs"] * (1 - balance[k]["chosen_longer_share"]) for k in balance if k != "all")
        assert abs(longer / n - 0.5) <= 0.1, longer / n
        assert balance["overlong"]["chosen_longer_share"] == balance["repetitive"]["chosen_longer_share"] == 0.0
        assert balance["no_format"]["chosen_longer_share"] == balance["truncated"]["chosen_longer_share"] == 1.0
        assert balance["overlong"]["pairs"] + balance["repetitive"]["pairs"] == pytest.approx(
            balance["no_format"]["pairs"] + balance["truncated"]["pairs"], abs=2)


def test_other_question_and_wrong_pairs():
    from stages.monitor import general_correct

    rows = world.build_datasets(world.Config(), 0)["preference"]
    chosen_texts = {r["chosen"][0]["content"] for r in rows}
    other = [r for r in rows if r["rejected_kind"] == "other-question"]
    wrong = [r for r in rows if r["rejected_kind"] == "wrong"]
    assert len(other) >= len(rows) // 5 and len(wrong) >= len(rows) // 5
    for r in other:  # a good answer -- the chosen answer of a question of another intent
        q, rejected = r["prompt"][0]["content"], r["rejected"][0]["content"]
        assert rejected in chosen_texts and not general_correct(rejected, ITEMS[q][2])
    for r in wrong:  # the question understood (the right thought), another intent's reply
        q, rejected = r["prompt"][0]["content"], r["rejected"][0]["content"]
        assert format_reward([rejected]) == [1.0] and reasoning_text(rejected).strip() == ITEMS[q][1]
        assert not general_correct(rejected, ITEMS[q][2])


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
    rows = [json.loads(line) for line in (root / "data" / "preference.jsonl").read_text().splitlines()]
    assert world.length_balance_markdown(world.length_balance(rows)) in (root / "cards" / "preference.md").read_text()
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
