"""Rewards for GRPO (stage 2, and the reasoning half of stage 4), plus the text helpers the
rejection-sampling filters share (`stages/filters.py`). docs/REWARDS.md lists every reward with its
range, sign, the columns it reads, its options and where it comes from.

Every reward has TRL's signature `f(completions, **kwargs) -> list[float | None]`: `completions` is
a list of strings, or of conversations (lists of `{"role", "content"}` messages, as TRL passes for
chat datasets); dataset columns (`answer`, `language`, ...) arrive as lists, one value per
completion, as do TRL's `prompts` and `completion_ids`; other keywords (`trainer_state`, ...) are
ignored. None means "can't judge": TRL skips it (NaN) instead of treating it as 0.

Built-in rewards (`REWARD_FUNCS`, by config name): rule rewards of r1flow (accuracy, format,
tag_count, language, length, repetition), ports of open-r1 (reasoning_steps, cosine, kimi_length),
DAPO's soft overlong punishment computed by TRL's `get_soft_overlong_punishment`, and the task's own
verifier (`task`, from `stages.tasks`, imported on first use). Users add their own by import path
(`custom:` in `RewardsConfig`; the source file's sha256 is part of the config, hence of the version id).

Weights are >= 0: the sign lives in the reward (penalties return values <= 0), so a negative
weight, which would turn a penalty into a bonus, is refused at validation.

The expected completion format is `<think>reasoning</think><answer>final</answer>`.
Accuracy uses math-verify: `parse` both, then `verify(gold, answer)` in that order (the order
matters: gold `-1`, answer `x = -1` is correct; the reverse check treats the equation differently).
Word answers ("Yes", "blue") match case-insensitively; gold that is neither math nor words can't be
judged (None).

    from stages.rewards import RewardsConfig, build_reward_funcs
    funcs, weights = build_reward_funcs(RewardsConfig(weights={"accuracy": 1.0, "format": 0.5}))
    GRPOTrainer(..., reward_funcs=funcs, args=GRPOConfig(..., reward_weights=weights))

TRL logs each reward as `rewards/<function name>/mean`, e.g. `rewards/accuracy_reward/mean`; a
custom reward under its config name, e.g. `rewards/brevity/mean`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import threading
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

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
# Answer verification (math-verify for math, normalised words for word answers)

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


def _math_only(parsed: list) -> tuple:
    """math-verify's parse, or () when it found no mathematical object: its string fallback alone
    (`x @@ ###` -> ['x @@ ###']) is not a parse, or any garbage would equal itself."""
    return tuple(parsed) if any(not isinstance(p, str) for p in parsed) else ()


@functools.lru_cache(maxsize=4096)
def parse_math(text: str) -> tuple:
    """math-verify's parse of `text`: a tuple holding at least one mathematical object, or the empty
    tuple when nothing parses as math (math-verify's bare-string fallback does not count). Bare LaTeX
    is wrapped in `$...$` first. Cached: a gold answer is parsed once per group of completions."""
    from math_verify import parse  # noqa: PLC0415  (pulls in sympy; keep module import light)

    text = text.strip()
    if not text:
        return ()
    timeout = _math_verify_timeout()
    if _looks_like_bare_math(text):
        parsed = _math_only(parse(f"${text}$", parsing_timeout=timeout))
        if parsed:
            return parsed
    return _math_only(parse(text, parsing_timeout=timeout))


_WRAPPER_RE = re.compile(r"\\(?:boxed|text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def word_answer(text: str | None) -> str | None:
    """The comparable form of a word answer ("Yes", "blue", "New York"): LaTeX text wrappers
    (`\\text{...}`, `\\boxed{...}`, ...) replaced by their content, math delimiters enclosing the
    whole text (`$...$`) removed, surrounding whitespace, punctuation and symbols stripped,
    lower-cased (casefold), inner whitespace collapsed. None when the text has no word (see
    `script_words`: single letters and LaTeX commands are not words)."""
    if text is None:
        return None
    text = unicodedata.normalize("NFKC", text).strip()
    while True:
        inner = _WRAPPER_RE.sub(lambda m: m.group(1), text)
        for left, right in _DELIMITERS:
            if len(inner) > len(left) + len(right) and inner.startswith(left) and inner.endswith(right):
                body = inner[len(left):-len(right)]
                if left not in body and right not in body:  # `$a$ or $b$` is not one formula
                    inner = body
                break
        inner = inner.strip()
        if inner == text:
            break
        text = inner
    if not script_words(text):  # before stripping: `\frac{1}{` must not become the word `frac`
        return None
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start])[0] in "PS"):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1])[0] in "PS"):
        end -= 1
    return " ".join(text[start:end].casefold().split())


def verify_answer(gold: Any, answer: str | None) -> bool | None:
    """Is `answer` equal to `gold`?

    - Gold that parses as math (see `parse_math`): math-verify decides, `verify(gold, answer)` in
      that order (identical stripped strings count as equal); an answer that does not parse is False.
    - Gold that is words ("Yes", "blue"): equal when `word_answer` of both match (case, surrounding
      punctuation and whitespace ignored), else False -- a wrong word answer is wrong, not unjudged.
    - Gold that is missing, empty, or neither math nor words (`x @@ ###`, `\\frac{1}{`, `?`): None,
      can't judge -- never a positive reward, even for an answer echoing it.
    A missing answer (None) is False whenever the gold can be judged."""
    from math_verify import verify  # noqa: PLC0415

    if gold is None or (isinstance(gold, float) and math.isnan(gold)):
        return None
    gold = str(gold).strip()
    if not gold:
        return None
    gold_parsed = parse_math(gold)
    if gold_parsed:
        if answer is None:
            return False
        if answer.strip() == gold:
            return True
        answer_parsed = parse_math(answer)
        if not answer_parsed:
            return False
        return bool(verify(list(gold_parsed), list(answer_parsed), timeout_seconds=_math_verify_timeout()))
    gold_words = word_answer(gold)
    if gold_words is None:
        return None
    return answer is not None and word_answer(answer) == gold_words


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


def _token_counts(n: int, completion_ids: list | None, num_tokens: Any) -> list[int | None]:
    """Completion lengths in tokens: from TRL's `completion_ids` (one list of ids per completion),
    else from a `num_tokens` column (r1flow's generation records carry one), else unknown (None)."""
    if completion_ids is not None:
        return [None if ids is None else len(ids) for ids in _column(completion_ids, n, "completion_ids")]
    if num_tokens is not None:
        return [None if v is None else int(v) for v in _column(num_tokens, n, "num_tokens")]
    return [None] * n


def _correctness(completions: list, answer: Any, reward: str) -> list[bool | None]:
    if answer is None:
        raise UserError(f"{reward} reward: the dataset needs an 'answer' column (gold answers)")
    golds = _column(answer, len(completions), "answer")
    return [verify_answer(gold, extract_answer(text)) for text, gold in zip(_texts(completions), golds)]


def accuracy_reward(completions: list, answer: list | None = None, wrong: float = 0.0, **kw) -> list[float | None]:
    """1.0 when the extracted answer equals the gold `answer` column (`verify_answer`: math-verify,
    or word matching for word answers), `wrong` otherwise, None where the gold answer is missing or
    neither math nor words."""
    return [None if ok is None else (1.0 if ok else float(wrong))
            for ok in _correctness(completions, answer, "accuracy")]


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
    """Soft overlong penalty on characters: 0 up to `max_chars` characters, falling linearly to -1
    at `max_chars + buffer`, -1 beyond."""
    out = []
    for text in _texts(completions):
        over = len(text) - max_chars
        out.append(0.0 if over <= 0 else -min(1.0, over / max(buffer, 1)))
    return out


def repetition_penalty(completions: list, ngram: int = 3, **kw) -> list[float]:
    """Minus the share of repeated word n-grams (`repeated_ngram_share`): 0 for no repetition."""
    return [-repeated_ngram_share(text, ngram) for text in _texts(completions)]


# open-r1's pattern. open-r1 compiles it without re.MULTILINE, so its `^\d+\.` only matches at the
# very start of the text although its docstring promises "at start of line"; here it does what the
# docstring says (a numbered list counts one step per item).
_STEP_RE = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)", re.MULTILINE)


def reasoning_steps_reward(completions: list, steps_target: int = 3, **kw) -> list[float]:
    """open-r1's step-by-step reward: the number of step markers (`Step 1:`, a numbered line `1.`,
    bullets `- `/`* ` on new lines, `First,` `Second,` `Next,` `Finally,`) over `steps_target`,
    capped at 1.0: 0 for none, 1/3 for one step with the default target of 3."""
    return [min(1.0, len(_STEP_RE.findall(text)) / steps_target) for text in _texts(completions)]


def cosine_scaled_reward(completions: list, answer: list | None = None, completion_ids: list | None = None,
                         num_tokens: list | None = None, cosine_max_tokens: int | None = None,
                         min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                         min_value_correct: float = 0.5, max_value_correct: float = 1.0, **kw) -> list[float | None]:
    """Correctness scaled by length on a cosine schedule ("Demystifying Long Chain-of-Thought
    Reasoning", appendix C.1; the formula, defaults and clamping of TRL's `get_cosine_scaled_reward`
    and open-r1's `cosine` reward). With p = min(tokens / cosine_max_tokens, 1):
    correct: min_value_correct + (max_value_correct - min_value_correct) * (1 + cos(pi p)) / 2,
    from max_value_correct (shortest) down to min_value_correct (longest), so correct-and-short beats
    correct-and-long; wrong: the wrong bounds swapped, from min_value_wrong (shortest) up to
    max_value_wrong (longest), so wrong-and-long beats wrong-and-short (keeps exploring).
    Correctness is r1flow's (`verify_answer` on `extract_answer`); length is in tokens
    (`completion_ids`, which TRL passes, or a `num_tokens` column). None where the gold answer
    can't be judged or the length is unknown."""
    if cosine_max_tokens is None:
        raise UserError("cosine reward: needs cosine_max_tokens (the completion length, in tokens, where the "
                        "schedule ends; usually the trainer's max_completion_length)")
    correct = _correctness(completions, answer, "cosine")
    rewards: list[float | None] = []
    for ok, length in zip(correct, _token_counts(len(completions), completion_ids, num_tokens)):
        if ok is None or length is None:
            rewards.append(None)
            continue
        progress = min(length / cosine_max_tokens, 1.0)
        low, high = (min_value_correct, max_value_correct) if ok else (max_value_wrong, min_value_wrong)
        rewards.append(float(low + 0.5 * (high - low) * (1.0 + math.cos(progress * math.pi))))
    return rewards


def _group_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)


def kimi_length_reward(completions: list, answer: list | None = None, prompts: list | None = None,
                       completion_ids: list | None = None, num_tokens: list | None = None, **kw) -> list[float | None]:
    """Kimi 1.5's group-relative length reward (arXiv 2501.12599; open-r1's `len_reward`): within
    the completions of one prompt, lambda = 0.5 - (len - min_len) / (max_len - min_len); a correct
    completion gets lambda (0.5 for the shortest, -0.5 for the longest), a wrong one min(0, lambda).
    All 0.0 when the group's lengths are equal (also for a single completion). Groups are the
    completions sharing a prompt (`prompts`, which TRL passes; without it, all completions form one
    group, as in open-r1). Length is in tokens when `completion_ids` (or `num_tokens`) are given,
    else in characters (as open-r1). None where the gold answer can't be judged (open-r1 counts those
    as correct)."""
    n = len(completions)
    correct = _correctness(completions, answer, "kimi_length")
    tokens_ = _token_counts(n, completion_ids, num_tokens)
    lengths = [t if t is not None else len(text) for t, text in zip(tokens_, _texts(completions))]
    keys = [""] * n if prompts is None else [_group_key(p) for p in _column(prompts, n, "prompts")]
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    rewards: list[float | None] = [None] * n
    for rows in groups.values():
        low, high = min(lengths[i] for i in rows), max(lengths[i] for i in rows)
        for i in rows:
            if correct[i] is None:
                continue
            if high == low:
                rewards[i] = 0.0
                continue
            lam = 0.5 - (lengths[i] - low) / (high - low)
            rewards[i] = float(lam if correct[i] else min(0.0, lam))
    return rewards


def soft_overlong_punishment_reward(completions: list, completion_ids: list | None = None,
                                    num_tokens: list | None = None, overlong_max_tokens: int | None = None,
                                    overlong_cache_tokens: int | None = None, **kw) -> list[float | None]:
    """DAPO's soft overlong punishment on tokens (arXiv 2503.14476, eq. 13), computed by TRL's
    `trl.rewards.get_soft_overlong_punishment(overlong_max_tokens, overlong_cache_tokens)`: 0 up to
    `overlong_max_tokens - overlong_cache_tokens` tokens, then falling linearly to -1 at
    `overlong_max_tokens`, -1 beyond. Lengths from `completion_ids` (TRL passes them) or a
    `num_tokens` column; None where the length is unknown."""
    if overlong_max_tokens is None:
        raise UserError("soft_overlong reward: needs overlong_max_tokens (usually the trainer's "
                        "max_completion_length)")
    from trl.rewards import get_soft_overlong_punishment  # noqa: PLC0415

    cache = overlong_max_tokens // 5 if overlong_cache_tokens is None else overlong_cache_tokens
    punish = get_soft_overlong_punishment(max_completion_len=overlong_max_tokens, soft_punish_cache=cache)
    counts = _token_counts(len(completions), completion_ids, num_tokens)
    known = [i for i, c in enumerate(counts) if c is not None]
    ids = ([completion_ids[i] for i in known] if completion_ids is not None
           else [[0] * counts[i] for i in known])  # TRL reads only len(ids)
    rewards: list[float | None] = [None] * len(completions)
    for i, value in zip(known, punish(completion_ids=ids)):
        rewards[i] = float(value)
    return rewards


def task_reward(completions: list, **kw) -> list[float | None]:
    """The task's own verifier (reasoning-gym's `score_answer`), from `stages.tasks.task_reward`,
    imported on first call so that `stages.rewards` imports without it. Reads the `task` and
    `task_entry` columns; see `stages/tasks.py`."""
    try:
        from stages.tasks import task_reward as verifier  # noqa: PLC0415
    except ImportError as exc:
        raise UserError(f"task reward: stages.tasks cannot be imported ({exc})") from exc
    return verifier(completions, **kw)


# config name -> reward function
REWARD_FUNCS: dict[str, Callable[..., list]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "tag_count": tag_count_reward,
    "language": language_consistency_reward,
    "length": length_penalty,
    "repetition": repetition_penalty,
    "reasoning_steps": reasoning_steps_reward,
    "cosine": cosine_scaled_reward,
    "kimi_length": kimi_length_reward,
    "soft_overlong": soft_overlong_punishment_reward,
    "task": task_reward,
}

# Rewards whose values are <= 0 (penalties): their weight must be positive, or they become bonuses.
PENALTIES = frozenset({"length", "repetition", "soft_overlong"})

# Dataset columns each reward reads (besides `completions` and what TRL adds: prompts, completion_ids).
REWARD_COLUMNS: dict[str, tuple[str, ...]] = {
    "accuracy": ("answer",),
    "language": ("language",),
    "cosine": ("answer", "num_tokens"),
    "kimi_length": ("answer", "num_tokens"),
    "soft_overlong": ("num_tokens",),
    "task": ("task", "task_entry"),
}

# Keywords TRL passes to every reward function itself: never dataset columns, never user `args`.
TRL_KEYWORDS = frozenset({"completions", "prompts", "completion_ids", "trainer_state", "log_extra", "log_metric",
                          "environments"})


# --------------------------------------------------------------------------------------------------
# User rewards: a function named by import path in flows.yaml

_FILE_MODULES: dict[tuple[str, str], Any] = {}
_FILE_LOCK = threading.Lock()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _split_ref(ref: str) -> tuple[str, str, bool]:
    """`target:attr` -> (target, attr, is_file). A target ending in `.py` or holding a `/` is a
    file, anything else a dotted module path."""
    target, sep, attr = ref.strip().rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"function {ref!r}: expected `package.module:function` or `path/to/file.py:function`")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise ValueError(f"function {ref!r}: {attr!r} is not a Python name")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if not is_file and not all(part.isidentifier() for part in target.split(".")):
        raise ValueError(f"function {ref!r}: {target!r} is neither a module path nor a .py file")
    return target, attr, is_file


def _resolve_file(target: str, base_dir: str | Path | None) -> Path:
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or os.getcwd()) / path
    return path.resolve()


def _load_file_module(path: Path, sha: str):
    """Execute the reward file `path` (whose content has sha256 `sha`) as a module of its own, once
    per content. Its folder is on sys.path while it runs, so it may import files next to it."""
    key = (str(path), sha)
    with _FILE_LOCK:
        if key not in _FILE_MODULES:
            name = f"_r1flow_user_reward_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{sha[:12]}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            sys.path.insert(0, str(path.parent))
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            finally:
                sys.path.remove(str(path.parent))
            _FILE_MODULES[key] = module
        return _FILE_MODULES[key]


def _source_file(func: Any, fallback: Path | None) -> Path | None:
    """The file that defines `func` (a function, or a callable object's class), else `fallback`."""
    for obj in (inspect.unwrap(func) if callable(func) else func, type(func)):
        try:
            source = inspect.getsourcefile(obj)
        except TypeError:
            continue
        if source and Path(source).is_file():
            return Path(source).resolve()
    return fallback


def load_user_function(ref: str, base_dir: str | Path | None = None) -> tuple[Callable, Path, str]:
    """Import the reward `ref` (`package.module:function`, or `file.py:function` relative to
    `base_dir`, default the working directory, or absolute): (function, its source file, sha256 of
    that file). Raises ValueError with one line saying what is wrong."""
    target, attr, is_file = _split_ref(ref)
    try:
        if is_file:
            path = _resolve_file(target, base_dir)
            if not path.is_file():
                raise ValueError(f"function {ref!r}: file {path} not found (relative paths are resolved against "
                                 f"{'the config folder' if base_dir else 'the working directory'})")
            module, named = _load_file_module(path, _sha256_file(path)), path
        else:
            module = importlib.import_module(target)
            named = Path(module.__file__).resolve() if getattr(module, "__file__", None) else None
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001  (any import-time error of user code is a config problem)
        raise ValueError(f"function {ref!r}: cannot import {target!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    func: Any = module
    for part in attr.split("."):
        if not hasattr(func, part):
            raise ValueError(f"function {ref!r}: {target!r} has no attribute {attr!r}")
        func = getattr(func, part)
    source = _source_file(func, named)
    if source is None:
        raise ValueError(f"function {ref!r}: has no source file (its content must be part of the version id)")
    return func, source, _sha256_file(source)


def _signature_problems(func: Any, args: dict[str, Any]) -> tuple[list[str], tuple[str, ...]]:
    """Problems with calling `func` as TRL does (`func(completions=..., **kwargs)`) plus `args`, and
    the names of its other parameters (candidate dataset columns)."""
    if not callable(func):
        return [f"is not callable ({type(func).__name__})"], ()
    if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None)):
        return ["is an async function (write a plain function)"], ()
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return ["has no inspectable signature"], ()
    params = sig.parameters
    named = {name: p for name, p in params.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    problems = []
    if "completions" not in named:
        problems.append("must take a `completions` parameter (TRL calls f(completions=..., prompts=..., "
                        "completion_ids=..., **dataset_columns))")
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        problems.append("must take **kwargs (TRL passes prompts, completion_ids, trainer_state and every "
                        "dataset column)")
    for key in args:
        if key in TRL_KEYWORDS:
            problems.append(f"argument {key!r} is passed by TRL, it cannot be set in args")
        elif key not in named:
            known = ", ".join(n for n in named if n not in TRL_KEYWORDS) or "none"
            problems.append(f"argument {key!r} is not a parameter of the function (its parameters: {known})")
    if not problems:
        try:
            sig.bind(completions=[], **args, **{n: None for n, p in named.items() if n != "completions"
                                                 and n not in args and p.default is inspect.Parameter.empty})
        except TypeError as exc:
            problems.append(f"cannot be called with args: {exc}")
    columns = tuple(n for n in named if n not in TRL_KEYWORDS and n not in args)
    return problems, columns


class UserReward:
    """A user's reward function with its `args` bound, named after its config key (TRL logs
    `rewards/<name>/mean`). It holds the reference, not the function, so it pickles; the function is
    loaded on first call and must still have the source (sha256) that the config was validated with."""

    def __init__(self, name: str, ref: str, base_dir: str | None, args: dict[str, Any], source_sha256: str):
        self.__name__ = name
        self.ref, self.base_dir, self.args, self.source_sha256 = ref, base_dir, dict(args), source_sha256
        self._func: Callable | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_func": None}

    def __repr__(self) -> str:
        return f"UserReward({self.__name__!r}, {self.ref!r}, args={self.args!r})"

    def _load(self) -> Callable:
        if self._func is None:
            try:
                func, source, sha = load_user_function(self.ref, self.base_dir)
            except ValueError as exc:
                raise UserError(f"reward {self.__name__!r}: {exc}") from None
            if sha != self.source_sha256:
                raise UserError(f"reward {self.__name__!r}: {source} changed since the config was validated "
                                f"(the stage's version id names the old content), validate the config again")
            self._func = func
        return self._func

    def __call__(self, completions: list, **kw) -> list[float | None]:
        out = self._load()(completions=completions, **{**kw, **self.args})
        try:
            out = list(out)
        except TypeError:
            raise UserError(f"reward {self.__name__!r}: returned {type(out).__name__}, expected a list of "
                            f"floats or None") from None
        if len(out) != len(completions):
            raise UserError(f"reward {self.__name__!r}: returned {len(out)} values for {len(completions)} completions")
        try:
            return [None if v is None else float(v) for v in out]
        except (TypeError, ValueError):
            raise UserError(f"reward {self.__name__!r}: returned a value that is neither a number nor None") from None


class CustomReward(StageConfig):
    """A reward of the user's own (`rewards.custom.<name>` in flows.yaml)."""

    function: str = Field(description="`package.module:function` (importable), or `path/to/file.py:function` "
                                      "(relative to the working directory, or absolute); TRL's signature: "
                                      "f(completions, **kwargs) -> list[float | None]")
    weight: float = Field(1.0, description="weight in the total reward (>= 0: the function's values carry the sign)")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments bound to the function "
                                                                   "(each must be one of its parameters)")
    source_sha256: str | None = Field(None, description="filled in by r1flow at validation: sha256 of the file "
                                                        "defining the function, so that editing it changes the "
                                                        "stage's version id (a value given here is replaced)")
    _base_dir: str | None = PrivateAttr(None)
    _columns: tuple[str, ...] = PrivateAttr(())
    _bound: tuple[str, UserReward] | None = PrivateAttr(None)  # (key, reward): loaded once, not per call

    def bound(self, name: str) -> UserReward:
        """The reward as TRL calls it (`UserReward`), reused while the settings stay the same."""
        key = json.dumps([name, self.function, self._base_dir, self.args, self.source_sha256], sort_keys=True,
                         default=repr)
        if self._bound is None or self._bound[0] != key:
            self._bound = (key, UserReward(name, self.function, self._base_dir, self.args, self.source_sha256))
        return self._bound[1]


_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _weight_problem(name: str, weight: float) -> str | None:
    if not math.isfinite(weight):
        return f"weight of {name!r} must be a finite number"
    if weight >= 0:
        return None
    if name in PENALTIES:
        return (f"weight of {name!r} is {weight:g}: {name!r} is a penalty whose values are already <= 0, so a "
                f"negative weight would turn it into a bonus (write it positive: open-r1's max_penalty -1 is "
                f"weight 1.0 here)")
    return (f"weight of {name!r} is {weight:g}: weights must be >= 0 (each reward carries its own sign, a "
            f"negative weight would reward the opposite of what {name!r} measures)")


class RewardsConfig(StageConfig):
    """Which rewards to use and how to weigh them (`rewards:` in flows.yaml); see docs/REWARDS.md."""

    weights: dict[str, float] = Field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.5},
        description="built-in reward name -> weight (>= 0) in the total reward; names: accuracy, format, "
                    "tag_count, language, length, repetition, reasoning_steps, cosine, kimi_length, "
                    "soft_overlong, task (at least one reward here or in `custom`)",
    )
    custom: dict[str, CustomReward] = Field(
        default_factory=dict,
        description="rewards of the user's own: name -> {function: 'module:function' or 'file.py:function', "
                    "weight, args}; TRL logs them as rewards/<name>/mean",
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
    reasoning_steps_target: int = Field(3, ge=1, description="reasoning_steps reward: number of step markers "
                                                             "that earns the full 1.0 (open-r1: 3)")
    cosine_max_tokens: int | None = Field(None, gt=0, description="cosine reward: completion length in tokens "
                                                                  "where the schedule ends (required for "
                                                                  "`cosine`; usually max_completion_length)")
    cosine_min_value_wrong: float = Field(-1.0, description="cosine reward: wrong answer, shortest completion")
    cosine_max_value_wrong: float = Field(-0.5, description="cosine reward: wrong answer, longest completion")
    cosine_min_value_correct: float = Field(0.5, description="cosine reward: correct answer, longest completion")
    cosine_max_value_correct: float = Field(1.0, description="cosine reward: correct answer, shortest completion")
    overlong_max_tokens: int | None = Field(None, gt=0, description="soft_overlong punishment: -1 beyond this "
                                                                    "many completion tokens (required for "
                                                                    "`soft_overlong`; usually "
                                                                    "max_completion_length)")
    overlong_cache_tokens: int | None = Field(None, ge=0, description="soft_overlong punishment: tokens before "
                                                                      "overlong_max_tokens over which it falls "
                                                                      "from 0 to -1 (default: a fifth of "
                                                                      "overlong_max_tokens)")

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        problems = [f"unknown reward {name!r} (expected one of {list(REWARD_FUNCS)}, or define it under `custom`)"
                    for name in weights if name not in REWARD_FUNCS]
        problems += [p for name, w in weights.items() if (p := _weight_problem(name, w))]
        if "task" in weights and importlib.util.find_spec("stages.tasks") is None:
            problems.append("reward 'task' needs stages/tasks.py (the reasoning-gym task verifiers), which this "
                            "r1flow lacks")
        if problems:
            raise ValueError("; ".join(problems))
        return weights

    @field_validator("custom")
    @classmethod
    def _check_custom(cls, custom: dict[str, CustomReward], info: ValidationInfo) -> dict[str, CustomReward]:
        base_dir = (info.context or {}).get("config_dir")
        base_dir = None if base_dir is None else str(base_dir)
        builtin_names = set(REWARD_FUNCS) | {f.__name__ for f in REWARD_FUNCS.values()}
        problems = []
        for name, spec in custom.items():
            where = f"custom reward {name!r}"
            if not _NAME_RE.fullmatch(name):
                problems.append(f"{where}: the name must be letters, digits and _ (it names the TRL log key)")
                continue
            if name in builtin_names:
                problems.append(f"{where}: the name is taken by a built-in reward")
                continue
            if (p := _weight_problem(name, spec.weight)) is not None:
                problems.append(f"{where}: {p}")
            try:
                func, _source, sha = load_user_function(spec.function, base_dir)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
                continue
            bad, columns = _signature_problems(func, spec.args)
            problems += [f"{where}: {spec.function} {p}" for p in bad]
            spec.source_sha256 = sha
            spec._base_dir, spec._columns = base_dir, columns
        if problems:
            raise ValueError("; ".join(problems))
        return custom

    @model_validator(mode="after")
    def _check_options(self) -> RewardsConfig:
        problems = []
        if not self.weights and not self.custom:
            problems.append(f"at least one reward is needed (one of {list(REWARD_FUNCS)}, or one under `custom`)")
        if "cosine" in self.weights and self.cosine_max_tokens is None:
            problems.append("reward 'cosine' needs cosine_max_tokens (usually the trainer's max_completion_length)")
        if "soft_overlong" in self.weights and self.overlong_max_tokens is None:
            problems.append("reward 'soft_overlong' needs overlong_max_tokens (usually the trainer's "
                            "max_completion_length)")
        if (self.overlong_max_tokens is not None and self.overlong_cache_tokens is not None
                and self.overlong_cache_tokens >= self.overlong_max_tokens):
            problems.append("overlong_cache_tokens must be below overlong_max_tokens")
        values = [self.cosine_min_value_wrong, self.cosine_max_value_wrong, self.cosine_min_value_correct,
                  self.cosine_max_value_correct]
        if not all(math.isfinite(v) for v in values) or values != sorted(values):
            problems.append("cosine values must be finite and ordered: cosine_min_value_wrong <= "
                            "cosine_max_value_wrong <= cosine_min_value_correct <= cosine_max_value_correct")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def named_weights(self) -> dict[str, float]:
        """Every configured reward (built-in, then custom) -> its weight, in the order of
        `build_reward_funcs`."""
        return {**self.weights, **{name: spec.weight for name, spec in self.custom.items()}}

    def dataset_columns(self) -> list[str]:
        """The dataset columns the configured rewards may read (keep them when selecting columns):
        see REWARD_COLUMNS, plus the parameters of custom rewards not bound by their `args`."""
        columns = [c for name in self.weights for c in REWARD_COLUMNS.get(name, ())]
        columns += [c for spec in self.custom.values() for c in spec._columns]
        return list(dict.fromkeys(columns))


def _bound(name: str, cfg: RewardsConfig) -> Callable[..., list]:
    """The reward `name` with its options from `cfg` bound, named as TRL logs it: a built-in keeps
    its function's name (`accuracy_reward`), a custom reward carries its config name."""
    if name in cfg.custom:
        return cfg.custom[name].bound(name)
    options = {
        "accuracy": {"wrong": cfg.accuracy_wrong},
        "language": {"default_language": cfg.language},
        "length": {"max_chars": cfg.max_chars, "buffer": cfg.length_buffer},
        "repetition": {"ngram": cfg.repetition_ngram},
        "reasoning_steps": {"steps_target": cfg.reasoning_steps_target},
        "cosine": {"cosine_max_tokens": cfg.cosine_max_tokens, "min_value_wrong": cfg.cosine_min_value_wrong,
                   "max_value_wrong": cfg.cosine_max_value_wrong, "min_value_correct": cfg.cosine_min_value_correct,
                   "max_value_correct": cfg.cosine_max_value_correct},
        "soft_overlong": {"overlong_max_tokens": cfg.overlong_max_tokens,
                          "overlong_cache_tokens": cfg.overlong_cache_tokens},
    }.get(name, {})
    func = REWARD_FUNCS[name]
    return functools.update_wrapper(functools.partial(func, **options), func)


def build_reward_funcs(cfg: RewardsConfig) -> tuple[list[Callable[..., list]], list[float]]:
    """The configured reward functions and their weights: the built-ins in the order of
    `cfg.weights`, then the custom ones in the order of `cfg.custom` (`cfg.named_weights()` names
    them), for `GRPOTrainer(reward_funcs=funcs, args=GRPOConfig(reward_weights=weights))`."""
    named = cfg.named_weights()
    return [_bound(name, cfg) for name in named], [float(w) for w in named.values()]


def score_completion(text: Any, cfg: RewardsConfig, **row: Any) -> dict[str, float | None]:
    """Every configured reward for one completion (keyed by config name, custom ones included), plus
    "total": the weighted sum of those that are not None (0.0 if all are None). `row` holds the
    dataset columns (`answer=`, `language=`, ...) as single values; token-length rewards need
    `num_tokens=` (or `completion_ids=`), else they are None."""
    columns = {key: [value] for key, value in row.items()}
    named = cfg.named_weights()
    scores: dict[str, float | None] = {name: _bound(name, cfg)([text], **columns)[0] for name in named}
    scores["total"] = sum(named[name] * s for name, s in scores.items() if s is not None)
    return scores
