"""Rule-based rewards for GRPO (stage 2, and the reasoning half of stage 4), plus the text helpers the
rejection-sampling filters share (`stages/filters.py`).

Every reward has TRL's signature `f(completions, **dataset_columns) -> list[float | None]`:
`completions` is a list of strings, or of conversations (lists of `{"role", "content"}` messages, as
TRL passes for chat datasets); dataset columns (`answer`, `language`, ...) arrive as lists, one value
per completion, and TRL's extra keywords (`prompts`, `trainer_state`, ...) are ignored. None means
"can't judge": TRL skips it (NaN) instead of treating it as 0.

The expected completion format is `<think>reasoning</think><answer>final</answer>`.
Accuracy uses math-verify: `parse` both, then `verify(gold, answer)` in that order (the order
matters: gold `-1`, answer `x = -1` is correct; the reverse check treats the equation differently).

    from stages.rewards import RewardsConfig, build_reward_funcs
    funcs, weights = build_reward_funcs(RewardsConfig(weights={"accuracy": 1.0, "format": 0.5}))
    GRPOTrainer(..., reward_funcs=funcs, args=GRPOConfig(..., reward_weights=weights))

TRL logs each reward as `rewards/<function name>/mean`, e.g. `rewards/accuracy_reward/mean`.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import unicodedata
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, Field, field_validator

from stages.common import StageConfig, UserError

# --------------------------------------------------------------------------------------------------
# Text helpers (shared with stages/filters.py)

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of one completion: a plain string, or the joined assistant contents of a
    conversation (`[{"role": "assistant", "content": ...}]`; content may be a list of text parts)."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion:
        if message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content") or ""
        if not isinstance(content, str):  # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(content)
    return "\n".join(parts)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (braces balanced), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j]
        start = text.rfind("\\boxed", 0, start)
    return None


def extract_answer(text: str) -> str | None:
    """The stripped content of the single `<answer>...</answer>` block; with no answer block, the
    content of the last `\\boxed{...}`; else None. Several answer blocks are ambiguous -> None, and
    an empty answer is None."""
    text = completion_text(text)
    blocks = _ANSWER_RE.findall(text)
    if len(blocks) == 1:
        answer = blocks[0].strip()
    elif not blocks:
        answer = (last_boxed(text) or "").strip()
    else:
        return None
    return answer or None


def reasoning_text(text: str) -> str:
    """The reasoning of a completion: the content of its first `<think>` block (to the end of the
    text if unclosed); without a `<think>` tag, the text outside any answer block. Tags removed."""
    text = completion_text(text)
    start = text.find("<think>")
    if start != -1:
        end = text.find("</think>", start)
        body = text[start + len("<think>"):] if end == -1 else text[start + len("<think>"):end]
    else:
        body = _ANSWER_RE.sub(" ", text)
    for tag in TAGS:
        body = body.replace(tag, " ")
    return body


def format_problem(text: str) -> str | None:
    """None when `text` is exactly one `<think>` block followed by exactly one non-empty `<answer>`
    block with only whitespace around them; else a short description of the first problem found."""
    text = completion_text(text)
    if not text.strip():
        return "empty completion"
    for tag in TAGS:
        n = text.count(tag)
        if n != 1:
            return f"{tag} appears {n} times (expected once)"
    match = _FORMAT_RE.fullmatch(text)
    if match is None:
        if text.index("<think>") > text.index("</think>") or text.index("<answer>") > text.index("</answer>"):
            return "tags out of order"
        if text.index("</think>") > text.index("<answer>"):
            return "answer block not after the think block"
        if text.strip().endswith("</answer>"):
            return "text outside the think and answer blocks"
        return "text after </answer>"
    if not match.group(2).strip():
        return "empty answer"
    return None


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and CJK ideographs
_TOKEN_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")


def tokens(text: str) -> list[str]:
    """Lower-cased tokens for repetition checks: one token per CJK / kana character, otherwise runs
    of letters and digits, and each other non-space symbol (so `3 + 4 = 7` is five tokens)."""
    return _TOKEN_RE.findall(text.lower())


def repeated_ngram_share(text: str, n: int) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one: 0.0 for no repetition (or
    fewer than n tokens), close to 1.0 for text looping on one phrase."""
    toks = tokens(text)
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


# --------------------------------------------------------------------------------------------------
# Languages by Unicode script

# Which scripts count as "in the language". Latin-script languages cannot be told apart this way
# (English and French reasoning both count as English); the check targets script mixing such as
# Chinese inside English reasoning, which is what R1's language-consistency reward was for.
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    **{code: frozenset({"LATIN"}) for code in
       ("en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "pl", "cs", "tr", "id", "vi")},
    "zh": frozenset({"CJK"}),
    "ja": frozenset({"CJK", "HIRAGANA", "KATAKANA"}),
    "ko": frozenset({"HANGUL", "CJK"}),
    "ru": frozenset({"CYRILLIC"}),
    "uk": frozenset({"CYRILLIC"}),
    "el": frozenset({"GREEK"}),
    "ar": frozenset({"ARABIC"}),
    "he": frozenset({"HEBREW"}),
    "hi": frozenset({"DEVANAGARI"}),
}


def _known_language(language: str) -> str:
    if language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"unknown language {language!r} (expected one of {sorted(LANGUAGE_SCRIPTS)})")
    return language


# A config field holding a language code of LANGUAGE_SCRIPTS (rewards and filters both use it).
Language = Annotated[str, AfterValidator(_known_language)]
_PER_CHAR_SCRIPTS = {"CJK", "HIRAGANA", "KATAKANA"}  # no spaces between words: one word per character
_KNOWN_SCRIPTS = ("LATIN", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "DEVANAGARI", "HANGUL", "HIRAGANA",
                  "KATAKANA", "CJK", "THAI")


@functools.lru_cache(maxsize=8192)
def _script(ch: str) -> str | None:
    """The script of a letter (e.g. "LATIN", "CJK"), "OTHER" for letters of other scripts, None
    for anything that is not a letter (digits, punctuation, spaces, math symbols)."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    name = unicodedata.name(ch, "")
    for script in _KNOWN_SCRIPTS:
        if name.startswith(script):
            return script
    if "IDEOGRAPH" in name:
        return "CJK"
    return "OTHER"


def script_words(text: str) -> list[tuple[str, str]]:
    """(script, word) pairs: runs of letters of one script, one word per CJK / kana character.
    Digits and punctuation are not words; LaTeX commands (`\\frac`) and single letters of
    alphabetic scripts (math variables like `x`) are skipped."""
    text = re.sub(r"\\[A-Za-z]+", " ", text)
    words: list[tuple[str, str]] = []
    run, run_script = "", None
    for ch in text + " ":
        script = _script(ch)
        if script is not None and script == run_script and script not in _PER_CHAR_SCRIPTS:
            run += ch
            continue
        if run and (len(run) > 1 or run_script in _PER_CHAR_SCRIPTS):
            words.append((run_script, run))
        run, run_script = (ch, script) if script is not None else ("", None)
    return words


def check_language(language: str) -> str:
    """Return `language` if it is in LANGUAGE_SCRIPTS, else raise UserError."""
    if language not in LANGUAGE_SCRIPTS:
        raise UserError(f"language {language!r}: unknown, expected one of {sorted(LANGUAGE_SCRIPTS)}")
    return language


def language_share(text: str, language: str | None) -> float | None:
    """Share of the words of `text` written in the script(s) of `language` (see LANGUAGE_SCRIPTS);
    1.0 when `text` has no words, None when `language` is None (no target: can't judge)."""
    if language is None:
        return None
    scripts = LANGUAGE_SCRIPTS[check_language(language)]
    words = script_words(text)
    if not words:
        return 1.0
    return sum(script in scripts for script, _ in words) / len(words)


# --------------------------------------------------------------------------------------------------
# Answer verification (math-verify)

def _math_verify_timeout() -> int | None:
    """math-verify guards parse/verify with signal.alarm, which only works in the main thread;
    Prefect runs tasks in worker threads, where the guard is switched off."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def _looks_like_bare_math(text: str) -> bool:
    """True for math without `$` delimiters and without words, e.g. `2^{10}`, `x = -1`, `\\sqrt{2}`:
    math-verify only reads LaTeX inside delimiters (bare `2^{10}` parses as 2)."""
    if "$" in text or "%" in text:
        return False
    return re.search(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", " ", text)) is None


@functools.lru_cache(maxsize=4096)
def parse_math(text: str) -> tuple:
    """math-verify's parse of `text` (empty tuple when nothing parses). Bare LaTeX is wrapped in
    `$...$` first. Cached: a gold answer is parsed once per group of completions."""
    from math_verify import parse  # noqa: PLC0415  (pulls in sympy; keep module import light)

    text = text.strip()
    if not text:
        return ()
    timeout = _math_verify_timeout()
    if _looks_like_bare_math(text):
        parsed = parse(f"${text}$", parsing_timeout=timeout)
        if parsed:
            return tuple(parsed)
    return tuple(parse(text, parsing_timeout=timeout))


def verify_answer(gold: Any, answer: str | None) -> bool | None:
    """Is `answer` equal to `gold`? Exact equality of the stripped strings counts (for words);
    otherwise math-verify decides, `verify(gold, answer)` in that order. None when `gold` is missing
    or unparseable (can't judge -- never a positive reward); False when `answer` is None or
    unparseable."""
    from math_verify import verify  # noqa: PLC0415

    if gold is None or (isinstance(gold, float) and math.isnan(gold)):
        return None
    gold = str(gold).strip()
    if answer is not None and gold and answer.strip() == gold:
        return True
    gold_parsed = parse_math(gold)
    if not gold_parsed:
        return None
    if answer is None:
        return False
    answer_parsed = parse_math(answer)
    if not answer_parsed:
        return False
    return bool(verify(list(gold_parsed), list(answer_parsed), timeout_seconds=_math_verify_timeout()))


# --------------------------------------------------------------------------------------------------
# Reward functions (TRL signature)

def _texts(completions: list) -> list[str]:
    return [completion_text(c) for c in completions]


def _column(value: Any, n: int, name: str) -> list:
    """A dataset column as a list of n values; a scalar (a config default) is repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"reward column {name!r}: {len(value)} values for {n} completions")
        return list(value)
    return [value] * n


def accuracy_reward(completions: list, answer: list | None = None, wrong: float = 0.0, **kw) -> list[float | None]:
    """1.0 when the extracted answer equals the gold `answer` column (math-verify), `wrong`
    otherwise, None where the gold answer is missing or unparseable."""
    if answer is None:
        raise UserError("accuracy reward: the dataset needs an 'answer' column (gold answers)")
    golds = _column(answer, len(completions), "answer")
    rewards: list[float | None] = []
    for text, gold in zip(_texts(completions), golds):
        ok = verify_answer(gold, extract_answer(text))
        rewards.append(None if ok is None else (1.0 if ok else float(wrong)))
    return rewards


def format_reward(completions: list, **kw) -> list[float]:
    """1.0 for exactly `<think>...</think>` then `<answer>...</answer>` (non-empty answer, only
    whitespace around), else 0.0: several answer blocks, unclosed tags or trailing text get 0."""
    return [1.0 if format_problem(text) is None else 0.0 for text in _texts(completions)]


def tag_count_reward(completions: list, **kw) -> list[float]:
    """0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` that appears exactly once."""
    return [0.25 * sum(text.count(tag) == 1 for tag in TAGS) for text in _texts(completions)]


def language_consistency_reward(completions: list, language: list | str | None = None,
                                default_language: str | None = "en", **kw) -> list[float | None]:
    """Share of the reasoning's (think block's) words in the target language, in [0, 1]: the
    `language` column per row (a list), or a single code; rows without one use `default_language`."""
    languages = _column(language, len(completions), "language")
    return [language_share(reasoning_text(text), lang or default_language)
            for text, lang in zip(_texts(completions), languages)]


def length_penalty(completions: list, max_chars: int = 4000, buffer: int = 1000, **kw) -> list[float]:
    """Soft overlong penalty: 0 up to `max_chars` characters, falling linearly to -1 at
    `max_chars + buffer`, -1 beyond."""
    out = []
    for text in _texts(completions):
        over = len(text) - max_chars
        out.append(0.0 if over <= 0 else -min(1.0, over / max(buffer, 1)))
    return out


def repetition_penalty(completions: list, ngram: int = 3, **kw) -> list[float]:
    """Minus the share of repeated word n-grams (`repeated_ngram_share`): 0 for no repetition."""
    return [-repeated_ngram_share(text, ngram) for text in _texts(completions)]


# config name -> reward function
REWARD_FUNCS: dict[str, Callable[..., list]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "tag_count": tag_count_reward,
    "language": language_consistency_reward,
    "length": length_penalty,
    "repetition": repetition_penalty,
}


class RewardsConfig(StageConfig):
    """Which rule rewards to use and how to weigh them (`rewards:` in flows.yaml)."""

    weights: dict[str, float] = Field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.5},
        description="reward name -> weight in the total reward; names: accuracy, format, tag_count, "
                    "language, length, repetition (at least one)",
    )
    accuracy_wrong: float = Field(0.0, description="accuracy reward for a wrong or missing answer "
                                                   "(R1 used -1; correct is always 1)")
    language: Language = Field("en", description="target language of the reasoning for rows without a "
                                            "`language` column value (a code from LANGUAGE_SCRIPTS)")
    max_chars: int = Field(4000, gt=0, description="length penalty: completions up to this many "
                                                   "characters are not penalised")
    length_buffer: int = Field(1000, gt=0, description="length penalty: characters beyond `max_chars` "
                                                       "over which the penalty grows linearly to -1")
    repetition_ngram: int = Field(3, ge=1, description="repetition penalty: n of the word n-grams counted")

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        problems = [f"unknown reward {name!r} (expected one of {list(REWARD_FUNCS)})"
                    for name in weights if name not in REWARD_FUNCS]
        problems += [f"weight of {name!r} must be a finite number" for name, w in weights.items()
                     if not math.isfinite(w)]
        if not weights:
            problems.append(f"at least one reward is needed (one of {list(REWARD_FUNCS)})")
        if problems:
            raise ValueError("; ".join(problems))
        return weights


def _bound(name: str, cfg: RewardsConfig) -> Callable[..., list]:
    """The reward function `name` with its options from `cfg` bound (keeps the function's name)."""
    options = {
        "accuracy": {"wrong": cfg.accuracy_wrong},
        "language": {"default_language": cfg.language},
        "length": {"max_chars": cfg.max_chars, "buffer": cfg.length_buffer},
        "repetition": {"ngram": cfg.repetition_ngram},
    }.get(name, {})
    func = REWARD_FUNCS[name]
    return functools.update_wrapper(functools.partial(func, **options), func)


def build_reward_funcs(cfg: RewardsConfig) -> tuple[list[Callable[..., list]], list[float]]:
    """The configured reward functions and their weights, in the order of `cfg.weights`, for
    `GRPOTrainer(reward_funcs=funcs, args=GRPOConfig(reward_weights=weights))`."""
    names = list(cfg.weights)
    return [_bound(name, cfg) for name in names], [float(cfg.weights[name]) for name in names]


def score_completion(text: Any, cfg: RewardsConfig, **row: Any) -> dict[str, float | None]:
    """Every configured reward for one completion (keyed by config name), plus "total": the
    weighted sum of those that are not None (0.0 if all are None). `row` holds the dataset columns
    (`answer=`, `language=`) as single values."""
    columns = {key: [value] for key, value in row.items()}
    scores: dict[str, float | None] = {name: _bound(name, cfg)([text], **columns)[0] for name in cfg.weights}
    scores["total"] = sum(cfg.weights[name] * s for name, s in scores.items() if s is not None)
    return scores
