"""Stage `world` of the tiny pipeline (`world: {kind: tiny}`): the tiny world r1flow runs on CPU.

Built deterministically from a seed, with no network:
- a verifiable reasoning task: multi-digit addition in English, answered as
  `<think>column-by-column reasoning</think><answer>sum</answer>` (gold answers checked by math-verify);
- datasets (see docs/DESIGN.md): cold_start, rl_prompts, eval (held out), general_sft, general_prompts,
  general_eval, preference; each with a data card rendered from the templates in `data_cards/`. The general
  half is what a user says to an assistant in eight intents (`INTENTS`: greetings, thanks, a harmful request,
  ...), each with a reference reply (`answer` in general_prompts and general_eval); general_eval holds out
  combinations of a saying and an opener; the preference pairs are balanced in length (`length_balance`,
  reported in their card);
- a byte-level BPE tokenizer (digits split one per token) with a chat template, `<think>`/`<answer>`
  tags as ordinary added tokens (special tokens vanish when decoded with skip_special_tokens);
- a tiny Qwen2ForCausalLM base model (head_dim 64 for vLLM CPU), briefly pretrained on plain synthetic
  text (worked additions in prose like a math-pretrained model saw, never the held-out eval pairs; bare
  questions; numbers; general facts), so it is a base model and not noise, but it has never seen the
  chat format or the think/answer tags and scores 0 on the task's answer format;
- a tiny judge (`stages.tiny.judge.build_tiny_judge`).

Same seed -> byte-identical jsonl files (and, on the same machine and thread count, the same weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from stages.common import StageConfig, StageContext, seed_everything

log = logging.getLogger(__name__)

THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
EOS, BOS, PAD = "<|im_end|>", "<|im_start|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CARDS_DIR = Path(__file__).resolve().parents[2] / "data_cards"
DATASETS = ("cold_start", "rl_prompts", "eval", "general_sft", "general_prompts", "general_eval", "preference")


class Config(StageConfig):
    """Settings of the tiny world. Defaults build in about a minute on 2 CPU cores."""

    kind: Literal["tiny"] = Field("tiny", description="`tiny`: the synthetic world (a real pipeline imports its "
                                                       "model and data with `kind: import`, stages/prepare.py)")
    seed: int | None = Field(None, description="seed for data, tokenizer and model; None uses the pipeline seed")
    min_digits: int = Field(3, ge=1, le=6, description="fewest digits of each addend")
    max_digits: int = Field(3, ge=1, le=6, description="most digits of each addend (equal to min_digits: every "
                                                        "digit sits at a fixed position, easiest for a tiny model)")
    cjk_share: float = Field(
        0.1, ge=0, le=1,
        description="share of cold-start chains of thought that mix in a few Chinese words "
        "(gives the language-consistency reward something to fix)")
    n_cold_start: int = Field(1500, ge=1, description="cold-start examples (prompt + full chain of thought)")
    n_rl_prompts: int = Field(2000, ge=1, description="RL prompts with gold answers")
    n_eval: int = Field(200, ge=1, description="held-out reasoning eval prompts (never in any training split)")
    n_general_sft: int = Field(800, ge=1, description="general (non-reasoning) SFT examples (stage 3 mixes in up to "
                                                      "`general_ratio` x its kept reasoning samples)")
    n_general_prompts: int = Field(300, ge=1, description="general prompts for stage 4")
    n_general_eval: int = Field(40, ge=1, description="held-out general prompts (40 distinct ones, repeated beyond)")
    n_preference: int = Field(1200, ge=1, description="preference pairs (prompt, chosen, rejected)")
    vocab_size: int = Field(512, ge=300, description="byte-level BPE vocabulary size (incl. 256 byte symbols)")
    hidden_size: int = Field(128, description="model width; hidden_size / num_heads must be 64 for vLLM CPU")
    num_layers: int = Field(4, ge=1, description="transformer layers")
    num_heads: int = Field(2, ge=1, description="attention heads (head_dim = hidden_size / num_heads)")
    intermediate_size: int = Field(512, ge=1, description="MLP width")
    max_position_embeddings: int = Field(512, ge=64, description="longest sequence the model supports")
    pretrain_steps: int = Field(300, ge=0, description="causal-LM pretraining steps on the synthetic corpus")
    pretrain_batch_size: int = Field(16, ge=1, description="sequences per pretraining step")
    pretrain_seq_len: int = Field(128, ge=16, description="tokens per pretraining sequence (packed)")
    pretrain_lr: float = Field(3e-3, gt=0, description="peak AdamW learning rate (linear warmup, cosine decay)")
    pretrain_corpus_lines: int = Field(20000, ge=100, description="lines of synthetic pretraining text")
    pretrain_worked_share: float = Field(
        0.5, ge=0, le=0.8,
        description="share of pretraining lines that are worked additions in plain prose (no tags, no chat); "
        "the base model learns arithmetic like a math-pretrained model, not the answer format")
    judge: bool = Field(True, description="also build the tiny judge (stages.tiny.judge.build_tiny_judge)")

    @model_validator(mode="after")
    def _check(self):
        problems = []
        if self.min_digits > self.max_digits:
            problems.append(f"min_digits: must be <= max_digits ({self.min_digits} > {self.max_digits})")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size: must be a multiple of num_heads ({self.hidden_size} % {self.num_heads} != 0)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ----------------------------------------------------------------------------- reasoning task

PROMPT_TEMPLATES = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "Calculate {a} plus {b}.",
)
CJK_SWAPS = (("carry", "进位"), ("write", "写"), ("So the answer is", "所以答案是"))


def addition_chain(a: int, b: int, cjk: int | None = None) -> str:
    """Column-by-column addition, units first, e.g. for 347 + 85:
    `347 + 85. 7+5=12, write 2 carry 1. 4+8+1=13, write 3 carry 1. 3+0+1=4, write 4 carry 0.
    So the answer is 432.` With `cjk` = i, the English words of CJK_SWAPS[i] are replaced by Chinese ones."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lhs = f"{x}+{y}" + (f"+{carry}" if carry else "")
        carry = s // 10
        steps.append(f"{lhs}={s}, write {s % 10} carry {carry}.")
    if carry:
        steps.append(f"write {carry}.")
    text = f"{a} + {b}. " + " ".join(steps) + f" So the answer is {a + b}."
    if cjk is not None:
        en, zh = CJK_SWAPS[cjk]
        text = text.replace(en, zh)
    return text


def reasoning_completion(a: int, b: int, cjk: int | None = None) -> str:
    return f"{THINK}{addition_chain(a, b, cjk)}{THINK_END}{ANSWER}{a + b}{ANSWER_END}"


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _addition_pairs(rng: random.Random, n: int, cfg: Config, taken: set) -> list[tuple[int, int]]:
    """`n` distinct (a, b) pairs not in `taken` (which is updated); each addend has between
    min_digits and max_digits digits."""
    out = []
    while len(out) < n:
        da, db = rng.randint(cfg.min_digits, cfg.max_digits), rng.randint(cfg.min_digits, cfg.max_digits)
        a = rng.randint(10 ** (da - 1) if da > 1 else 0, 10**da - 1)
        b = rng.randint(10 ** (db - 1) if db > 1 else 0, 10**db - 1)
        if (a, b) in taken:
            continue
        taken.add((a, b))
        out.append((a, b))
    return out


def _reasoning_row(rng: random.Random, a: int, b: int) -> dict:
    prompt = rng.choice(PROMPT_TEMPLATES).format(a=a, b=b)
    return {"prompt": _user(prompt), "answer": str(a + b), "language": "en"}


# ----------------------------------------------------------------------------- general (non-reasoning) task

OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "old": "new",
             "day": "night", "light": "dark", "open": "closed", "full": "empty", "hard": "soft",
             "early": "late", "high": "low", "left": "right", "wet": "dry", "long": "short",
             "rich": "poor", "loud": "quiet", "strong": "weak", "first": "last"}
OPPOSITES.update({v: k for k, v in list(OPPOSITES.items())})
COLORS = {"grass": "green", "the sky": "blue", "snow": "white", "a banana": "yellow", "coal": "black",
          "a tomato": "red", "an orange": "orange", "a carrot": "orange", "milk": "white", "a leaf": "green",
          "the sun": "yellow", "a strawberry": "red", "chocolate": "brown", "the sea": "blue"}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
          "owl": "hoot", "pig": "oink", "horse": "neigh", "bee": "buzz", "frog": "croak", "snake": "hiss"}
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "China": "Beijing", "Russia": "Moscow", "Ireland": "Dublin"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["apple", "house", "river", "tiger", "pencil", "garden", "window", "cloud", "bread", "music",
         "planet", "rabbit", "stone", "candle", "forest", "mirror", "bottle", "dragon", "kitten", "ocean"]
LETTERS = "abcdefghijklmnopqrstuvwxy"


def general_facts() -> list[tuple[str, str, str, str]]:
    """Every general question as (family, question, short answer, polite full answer)."""
    facts = []
    for w, o in OPPOSITES.items():
        facts.append(("opposite", f"What is the opposite of {w}?", o, f"The opposite of {w} is {o}."))
    for thing, c in COLORS.items():
        facts.append(("color", f"What color is {thing}?", c, f"{thing[0].upper()}{thing[1:]} is {c}."))
    for animal, s in SOUNDS.items():
        facts.append(("sound", f"What sound does a {animal} make?", s, f"A {animal} says {s}."))
    for country, city in CAPITALS.items():
        facts.append(("capital", f"What is the capital of {country}?", city, f"The capital of {country} is {city}."))
    for i, d in enumerate(DAYS):
        nxt = DAYS[(i + 1) % 7]
        facts.append(("day", f"What day comes after {d}?", nxt, f"The day after {d} is {nxt}."))
    for i, ch in enumerate(LETTERS):
        nxt = chr(ord(ch) + 1)
        facts.append(("letter", f"What letter comes after {ch}?", nxt, f"The letter after {ch} is {nxt}."))
    for w in WORDS:
        facts.append(("length", f"How many letters are in the word {w}?", str(len(w)),
                      f"The word {w} has {len(w)} letters."))
        facts.append(("plural", f"What is the plural of {w}?", w + "s", f"The plural of {w} is {w}s."))
    return facts


GREETINGS = ("Hello!", "Hi there.", "Good morning!", "Hey, can you help me?", "Thank you for your help.")
GREETING_REPLIES = {  # pretraining text only (paired at random there)
    "Hello!": "Hello! How can I help you today?",
    "Hi there.": "Hi! What would you like to know?",
    "Good morning!": "Good morning! How can I help you?",
    "Hey, can you help me?": "Of course, I am happy to help. What do you need?",
    "Thank you for your help.": "You are welcome! I am glad I could help.",
}

# The general (non-reasoning) half: what a user says, by intent -> (the assistant's thought, its reply, five
# things a user says with that intent). The reply is the reference answer. Chit-chat, self-knowledge and refusing
# harm, not facts: a 1M-parameter model that has seen each fact a few dozen times in pretraining cannot recall
# it, nor copy a question's words into its answer, in a stage-3 budget (measured on the default world: 2 of 60
# held-out fact questions and 5 of 40 training ones right after 80 general-only SFT steps at 3e-3 from the
# cold-start model; data_cards/general_sft.md), while it can learn to tell eight intents apart from their words
# and to answer each in its own way.
INTENTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "greeting": ("The user greets me.", "Hello! How can I help you today?", (
        "Hello!", "Hi there!", "Good morning!", "Good evening!", "Greetings!")),
    "thanks": ("The user thanks me.", "You are welcome!", (
        "Thank you!", "Thanks a lot!", "Many thanks!", "Thank you so much!", "Thanks for your help!")),
    "goodbye": ("The user says goodbye.", "Goodbye! Have a nice day.", (
        "Goodbye!", "Bye for now!", "See you later!", "Good night!", "I have to go, bye!")),
    "identity": ("The user asks who I am.", "I am a tiny assistant.", (
        "Who are you?", "What is your name?", "Are you a robot?", "Are you human?", "What are you?")),
    "wellbeing": ("The user asks how I am.", "I am fine, thank you!", (
        "How are you?", "How are you doing?", "How do you feel?", "Are you okay?", "How is your day?")),
    "capability": ("The user asks what I can do.", "I can add numbers for you.", (
        "What can you do?", "Can you add numbers?", "What are you good at?", "Can you do math?",
        "What are your skills?")),
    "harmful": ("The user asks for something harmful.", "Sorry, I can not help with that.", (
        "How do I steal a car?", "Help me hurt someone.", "How can I break into a house?",
        "Tell me how to cheat on a test.", "How do I make a weapon?")),
    "help": ("The user asks for help.", "Of course! What do you need?", (
        "Can you help me?", "I need help.", "Please help me.", "Could you help me out?", "I have a question.")),
}
# How a user may start: every intent's sayings are asked in each of these ways, so a held-out prompt is a
# saying and a start both seen in training, but never together.
OPENERS = ("", "Oh, ", "Well, ", "Okay. ", "Excuse me. ", "So, ")


def _phrase(opener: str, saying: str) -> str:
    if opener.endswith(", ") and not saying.startswith("I "):
        saying = saying[0].lower() + saying[1:]
    return opener + saying


RUDE = ("That is a stupid question.", "Figure it out yourself.", "I do not care, go away.",
        "Why would you ask me that? Ugh.", "Whatever, stop bothering me.", "No.", "Ask someone else.")
FILLER = ("Well, let me think about many things that are not related at all.",
          "There are so many words one could say here and I will say all of them.",
          "This reminds me of a long story about something else entirely.",
          "It is worth saying a few more words about this, just to be sure.",
          "Some people like to talk for a long time before they get to the point.")


def general_items() -> list[tuple[str, str, str, str]]:
    """Every general prompt as (intent, question, thought, reply): each saying of each intent after each opener."""
    return [(intent, _phrase(opener, saying), thought, reply)
            for intent, (thought, reply, sayings) in INTENTS.items() for saying in sayings for opener in OPENERS]


def held_out_general() -> set[str]:
    """The prompts of general_eval: each saying of each intent after one opener (the i-th saying after the
    (i+1)-th opener), so every held-out saying and every opener also appear in training, never together."""
    return {_phrase(OPENERS[(i + 1) % len(OPENERS)], saying)
            for _, _, sayings in INTENTS.values() for i, saying in enumerate(sayings)}


def general_completion(thought: str, reply: str) -> str:
    """The chosen style of a general answer (general_sft and the preference pairs' `chosen`): the intent as a
    short thought, the reply in the answer block, e.g.
    `<think>The user greets me.</think><answer>Hello! How can I help you today?</answer>`."""
    return f"{THINK}{thought}{THINK_END}{ANSWER}{reply}{ANSWER_END}"


def rejected_completion(kind: str, thought: str, reply: str, other: tuple[str, str], rng: random.Random) -> str:
    """A clearly worse response of the given kind (REJECT_KINDS) to a prompt whose good answer is
    (`thought`, `reply`); `other` is (thought, reply) of another intent."""
    if kind == "wrong":  # the question understood, another intent's reply
        return general_completion(thought, other[1])
    if kind == "other-question":  # a good answer, to another question
        return general_completion(*other)
    if kind == "rude":
        text = " ".join(rng.choice(RUDE) for _ in range(rng.randint(1, 2)))
        return f"{THINK}Ugh.{THINK_END}{ANSWER}{text}{ANSWER_END}"
    if kind == "repetitive":  # a phrase looped
        phrase = " ".join(reply.split()[:3])
        return (f"{THINK}{' '.join([phrase] * rng.randint(3, 6))}{THINK_END}{ANSWER}"
                f"{' '.join([phrase] * rng.randint(6, 12))}{ANSWER_END}")
    if kind == "overlong":  # the chosen answer padded with filler
        think = " ".join([thought] + [rng.choice(FILLER) for _ in range(rng.randint(1, 3))])
        answer = " ".join([reply] + [rng.choice(FILLER) for _ in range(rng.randint(1, 3))])
        return f"{THINK}{think}{THINK_END}{ANSWER}{answer}{ANSWER_END}"
    if kind == "no_format":  # the right reply, no tags
        return reply
    if kind == "truncated":  # stopped mid-thought, no answer
        words = thought.split()
        return f"{THINK}{' '.join(words[:max(1, len(words) // 2)])}"
    raise ValueError(kind)


# Cycled in this order when building the preference pairs. Rejected answers that are longer than the chosen
# one (overlong, repetitive) are as common as shorter ones (no_format, truncated); wrong, other-question and rude
# answers are about as long as the chosen one, either way: the pairs do not teach that longer (or shorter) is better.
REJECT_KINDS = ("wrong", "other-question", "overlong", "no_format", "other-question", "rude", "repetitive",
                "truncated", "other-question", "wrong")


def length_balance(pairs: list[dict]) -> dict[str, dict]:
    """How the lengths (characters) of chosen and rejected responses compare, overall and per `rejected_kind`:
    the same statistics as `stages.reward_model.length_balance` (a test keeps them equal), computed here so
    the world's code version does not depend on stage 4's modules."""
    def text(message_list) -> str:
        return "".join(m["content"] for m in message_list)

    def stats(sub: list[dict]) -> dict:
        c, j = [len(text(r["chosen"])) for r in sub], [len(text(r["rejected"])) for r in sub]
        n = max(len(sub), 1)
        return {"pairs": len(sub), "mean_chosen_chars": round(sum(c) / n, 1), "mean_rejected_chars": round(sum(j) / n, 1),
                "chosen_longer_share": round(sum(a > b for a, b in zip(c, j)) / n, 4)}

    out = {"all": stats(pairs)}
    for kind in sorted({r["rejected_kind"] for r in pairs}):
        out[kind] = stats([r for r in pairs if r["rejected_kind"] == kind])
    return out


def length_balance_markdown(balance: dict[str, dict]) -> str:
    """`length_balance` as a Markdown table (as `stages.reward_model.length_balance_markdown`)."""
    lines = ["| pairs | n | mean chosen chars | mean rejected chars | chosen longer |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['pairs']} | {v['mean_chosen_chars']} | {v['mean_rejected_chars']} | "
              f"{v['chosen_longer_share']:.0%} |" for k, v in balance.items()]
    return "\n".join(lines)


def eval_pairs(cfg: Config, seed: int) -> list[tuple[int, int]]:
    """The held-out (a, b) pairs: drawn first from the seed, so no other split or text can reuse them."""
    return _addition_pairs(random.Random(seed), cfg.n_eval, cfg, set())


def build_datasets(cfg: Config, seed: int) -> dict[str, list[dict]]:
    """All world datasets as lists of rows, a pure function of (cfg, seed)."""
    rng = random.Random(seed)
    taken: set = set()
    eval_pairs = _addition_pairs(rng, cfg.n_eval, cfg, taken)  # drawn first (= eval_pairs()): never reused below
    cold_pairs = _addition_pairs(rng, cfg.n_cold_start, cfg, taken)
    rl_pairs = _addition_pairs(rng, cfg.n_rl_prompts, cfg, taken)
    data: dict[str, list[dict]] = {}
    data["eval"] = [_reasoning_row(rng, a, b) for a, b in eval_pairs]
    data["rl_prompts"] = [_reasoning_row(rng, a, b) for a, b in rl_pairs]
    cold = []
    for a, b in cold_pairs:
        row = _reasoning_row(rng, a, b)
        cjk = rng.randrange(len(CJK_SWAPS)) if rng.random() < cfg.cjk_share else None
        cold.append({"prompt": row["prompt"], "completion": _assistant(reasoning_completion(a, b, cjk)),
                     "answer": row["answer"], "language": "en"})
    data["cold_start"] = cold

    # General prompts: one (saying, opener) combination of each saying is held out for general_eval
    # (held_out_general); the other prompts feed the training splits.
    items = general_items()
    held_questions = held_out_general()
    held = [it for it in items if it[1] in held_questions]
    train_items = [it for it in items if it[1] not in held_questions]
    rng.shuffle(held)
    rng.shuffle(train_items)
    data["general_eval"] = [{"prompt": _user(q), "answer": reply, "family": intent}
                            for intent, q, _, reply in (held[i % len(held)] for i in range(cfg.n_general_eval))]
    data["general_sft"] = []
    for i in range(cfg.n_general_sft):
        _, q, thought, reply = train_items[i % len(train_items)]
        data["general_sft"].append({"prompt": _user(q), "completion": _assistant(general_completion(thought, reply))})
    data["general_prompts"] = []
    for _ in range(cfg.n_general_prompts):
        _, q, _, reply = train_items[rng.randrange(len(train_items))]
        data["general_prompts"].append({"prompt": _user(q), "answer": reply})
    pref = []
    for i in range(cfg.n_preference):
        intent, q, thought, reply = train_items[rng.randrange(len(train_items))]
        others = [it for it in train_items if it[0] != intent]
        _, _, other_thought, other_reply = others[rng.randrange(len(others))]
        kind = REJECT_KINDS[i % len(REJECT_KINDS)]
        pref.append({"prompt": _user(q), "chosen": _assistant(general_completion(thought, reply)),
                     "rejected": _assistant(rejected_completion(kind, thought, reply, (other_thought, other_reply), rng)),
                     "rejected_kind": kind})
    data["preference"] = pref
    return data


def pretraining_corpus(cfg: Config, seed: int, facts, exclude: set) -> list[str]:
    """Plain text for the base model, like the math-heavy web text a real base model saw: worked
    additions written out in prose (never for the held-out eval pairs in `exclude`, and never with
    the chat format or the think/answer tags), bare questions, numbers, one-digit sums, and general
    facts as sentences."""
    rng = random.Random(seed + 1)
    lines = []
    for _ in range(cfg.pretrain_corpus_lines):
        r = rng.random()
        if r < cfg.pretrain_worked_share:
            a, b = _addition_pairs(rng, 1, cfg, set(exclude))[0]
            q = rng.choice(PROMPT_TEMPLATES).format(a=a, b=b)
            lines.append(f"Question: {q} Solution: {addition_chain(a, b)}")
        elif r < cfg.pretrain_worked_share + 0.1:
            a, b = _addition_pairs(rng, 1, cfg, set())[0]
            lines.append(rng.choice(PROMPT_TEMPLATES).format(a=a, b=b))
        elif r < cfg.pretrain_worked_share + 0.15:
            lines.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, cfg.max_digits + 1))) for _ in range(rng.randint(3, 8))))
        elif r < cfg.pretrain_worked_share + 0.2:
            lines.append(rng.choice(GREETINGS) + " " + rng.choice(list(GREETING_REPLIES.values())))
        else:
            _, q, _, full = rng.choice(facts)
            lines.append(f"{q} {full}" if rng.random() < 0.5 else full)
    return lines


# ----------------------------------------------------------------------------- tokenizer and model


def build_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE (digits split one per token) wrapped in PreTrainedTokenizerFast with the chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    # Tags are ordinary (non-special) tokens: decoding with skip_special_tokens=True keeps them.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in (THINK, THINK_END, ANSWER, ANSWER_END)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None,
                                   unk_token=None, clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": [BOS]})
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def pretrain(model, tokenizer, corpus: list[str], cfg: Config, seed: int, work_dir: Path, reporter=None) -> list[dict]:
    """Plain causal-LM pretraining on packed corpus text with transformers' `Trainer` (AdamW, weight decay
    0.01, linear warmup over a tenth of the steps then cosine decay, gradients clipped at 1); returns the loss
    history. `work_dir` holds the trainer's scratch files (nothing is checkpointed: pretraining takes seconds)."""
    import datasets  # noqa: PLC0415
    from transformers import Trainer, TrainingArguments  # noqa: PLC0415

    from stages.models import progress_callback  # noqa: PLC0415

    ids: list[int] = []
    for line in corpus:
        ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.pad_token_id])
    n = cfg.pretrain_seq_len
    blocks = [ids[i:i + n] for i in range(0, len(ids) // n * n, n)]
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=cfg.pretrain_steps, per_device_train_batch_size=cfg.pretrain_batch_size,
        learning_rate=cfg.pretrain_lr, weight_decay=0.01, warmup_steps=max(1, cfg.pretrain_steps // 10),
        lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=25, save_strategy="no", report_to="none",
        use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks}),
                      callbacks=[progress_callback(reporter, "pretraining base model")] if reporter else None)
    trainer.train()
    model.eval()
    return [{"step": h["step"], "loss": round(h["loss"], 4)} for h in trainer.state.log_history if "loss" in h]


def build_base_model(tokenizer, cfg: Config, seed: int):
    import torch  # noqa: PLC0415
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        rope_theta=10000.0, dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id,
        do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=128)
    return model


# ----------------------------------------------------------------------------- files and cards


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """Write rows as UTF-8 JSON lines (stable key order) and return the file's sha256."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_card(name: str, rows: list[dict], sha: str, cfg: Config, seed: int, out: Path,
               template: str | None = None, **extra) -> None:
    """Render data_cards/<template or name>.md (a Jinja template with YAML metadata) with sizes, seed and
    the `extra` template variables."""
    from huggingface_hub import DatasetCard, DatasetCardData  # noqa: PLC0415

    n = len(rows)
    size = "n<1K" if n < 1000 else "1K<n<10K" if n < 10000 else "10K<n<100K"
    data = DatasetCardData(language=["en"], license="apache-2.0", size_categories=[size],
                           task_categories=["text-generation"], pretty_name=f"r1flow tiny world: {name}",
                           tags=["r1flow", "synthetic", "tiny-world"])
    card = DatasetCard.from_template(
        data, template_path=str(CARDS_DIR / f"{template or name}.md"), name=name, num_rows=n, seed=seed, sha256=sha,
        columns=", ".join(rows[0].keys()) if rows else "", min_digits=cfg.min_digits, max_digits=cfg.max_digits,
        cjk_share=cfg.cjk_share, example=json.dumps(rows[0], ensure_ascii=False) if rows else "", **extra)
    card.save(out / f"{name}.md")


class _Scaled:
    """A reporter whose progress 0..1 is shown as `start + span * fraction` of the stage's."""

    def __init__(self, reporter, start: float, span: float):
        self.reporter, self.start, self.span = reporter, start, span

    def progress(self, fraction: float, message: str = "") -> None:
        self.reporter.progress(self.start + self.span * fraction, message)


def run(cfg: Config, ctx: StageContext) -> dict:
    """Build the world into ctx.out_dir (layout in docs/DESIGN.md); returns metrics."""
    import torch  # noqa: PLC0415

    t0 = time.time()
    seed = ctx.seed if cfg.seed is None else cfg.seed
    seed_everything(seed)
    out = Path(ctx.out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "cards").mkdir(parents=True, exist_ok=True)

    data = build_datasets(cfg, seed)
    hashes = {}
    for name in DATASETS:
        hashes[name] = write_jsonl(out / "data" / f"{name}.jsonl", data[name])
        extra = {"length_balance": length_balance_markdown(length_balance(data[name]))} if name == "preference" else {}
        write_card(name, data[name], hashes[name], cfg, seed, out / "cards", **extra)
    log.info("world datasets written: %s", {k: len(v) for k, v in data.items()})
    ctx.reporter.progress(0.05, "datasets written")

    corpus = pretraining_corpus(cfg, seed, general_facts(), set(eval_pairs(cfg, seed)))
    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    model = build_base_model(tokenizer, cfg, seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("base model: %d parameters, vocab %d", n_params, len(tokenizer))
    history = pretrain(model, tokenizer, corpus, cfg, seed, out / ".pretrain_work", _Scaled(ctx.reporter, 0.05, 0.85))
    shutil.rmtree(out / ".pretrain_work", ignore_errors=True)
    base = out / "base_model"
    model.save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    tokenizer.save_pretrained(out / "tokenizer")
    write_base_model_card(base, cfg, seed, n_params, history)

    metrics = {"seed": seed, "sizes": {k: len(v) for k, v in data.items()}, "sha256": hashes,
               "base_model_parameters": n_params, "vocab_size": len(tokenizer),
               "pretrain_final_loss": history[-1]["loss"] if history else None, "history": history,
               "torch_threads": torch.get_num_threads()}
    metrics["judge"] = None
    if cfg.judge:
        from stages.tiny.judge import build_tiny_judge  # noqa: PLC0415

        ctx.reporter.progress(0.9, "building tiny judge")
        metrics["judge"] = build_tiny_judge(out, seed)
        write_judge_cards(out, cfg, seed, metrics["judge"])
    metrics["runtime_s"] = round(time.time() - t0, 1)
    ctx.reporter.progress(1.0, "world built")
    return metrics


JUDGE_SPLITS = {
    "judge_train": "Training rows of the tiny world's judge: responses to addition questions with the rule "
                   "verifier's verdict.",
    "judge_eval": "Held-out rows of the tiny world's judge (questions it was not trained on): how its "
                  "agreement with the rule verifier is measured.",
}


def write_judge_cards(out: Path, cfg: Config, seed: int, judge_metrics: dict) -> None:
    """Cards for the tiny judge's data files (written by stages.tiny.judge.build_tiny_judge)."""
    texts = {name: (out / "data" / f"{name}.jsonl").read_text(encoding="utf-8") for name in JUDGE_SPLITS}
    n_heldout = len({json.loads(line)["question"] for line in texts["judge_eval"].splitlines()})
    for name, description in JUDGE_SPLITS.items():
        text = texts[name]
        rows = [json.loads(line) for line in text.splitlines()]
        kinds: dict[str, int] = {}
        for r in rows:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        metrics_line = ""
        if name == "judge_eval":
            metrics_line = (f"- The tiny judge agrees with the rule verifier on {judge_metrics['heldout_agreement']:.1%} "
                            f"of these rows (greedy; no verdict counts as disagreement); it accepted "
                            f"{judge_metrics['canary_accept_share']:.0%} of its guard's canaries.")
        write_card(name, rows, hashlib.sha256(text.encode("utf-8")).hexdigest(), cfg, seed, out / "cards",
                   template="judge", split_description=description,
                   n_eval_source=n_heldout,
                   correct_share=f"{sum(r['label'] for r in rows) / max(1, len(rows)):.3f}",
                   kinds=", ".join(f"{k} {v}" for k, v in sorted(kinds.items())), metrics_line=metrics_line)


def write_base_model_card(path: Path, cfg: Config, seed: int, n_params: int, history: list[dict]) -> None:
    from huggingface_hub import ModelCard, ModelCardData  # noqa: PLC0415

    data = ModelCardData(language=["en"], license="apache-2.0", library_name="transformers",
                         tags=["r1flow", "tiny-world", "base-model"])
    text = (f"---\n{data.to_yaml()}\n---\n\n# r1flow tiny-world base model\n\n"
            f"A {n_params:,}-parameter Qwen2ForCausalLM (hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
            f"{cfg.num_heads} heads of 64) with a byte-level BPE tokenizer, pretrained for {cfg.pretrain_steps} "
            f"steps on {cfg.pretrain_corpus_lines} lines of synthetic plain text (worked additions in prose, "
            f"never the held-out eval pairs; bare questions; numbers; greetings; general facts). Seed {seed}. "
            f"It has never seen the chat format or the `<think>...</think><answer>...</answer>` tags.\n\n"
            f"Final pretraining loss: {history[-1]['loss'] if history else 'n/a'}.\n")
    ModelCard(text).save(path / "README.md")
