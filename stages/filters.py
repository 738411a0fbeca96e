"""Rule filters for rejection sampling (stage 3): pure functions over generated samples.

Each sample is a dict with `prompt_id`, `completion` (text or a conversation), `answer` (gold, or
None) and optionally `language`. `apply_filters` runs the filters named in `FilterConfig.order`
one after the other over the samples still standing, so every rejected sample carries the name of
the FIRST filter that rejected it, and `funnel` turns the results into the generated -> kept table.

Correctness uses the same verifier as the rewards (`stages.rewards.verify_answer`). Where the rules
cannot settle it -- no gold answer, an unparseable gold, or no parsable answer in the completion --
the sample is not rejected by `correct` but marked `needs_judge` for the judge model (R1 used V3).

    results = apply_filters(samples, FilterConfig(order=["format", "correct", "duplicate"]))
    rows = funnel(results, order=cfg.order)
"""

from __future__ import annotations

import re
from typing import Any, Callable

from pydantic import Field, field_validator, model_validator

from stages.common import StageConfig
from stages.rewards import (
    Language,
    completion_text,
    extract_answer,
    format_problem,
    language_share,
    parse_math,
    reasoning_text,
    repeated_ngram_share,
    tokens,
    verify_answer,
)

FILTER_NAMES = ("length", "format", "language", "paragraphs", "code", "repetition", "correct", "duplicate")


class FilterConfig(StageConfig):
    """Thresholds of the rejection-sampling rule filters (`filters:` in flows.yaml)."""

    order: list[str] = Field(
        default_factory=lambda: list(FILTER_NAMES),
        description=f"filters to apply, in this order (the first that rejects a sample is recorded); "
                    f"names: {', '.join(FILTER_NAMES)}",
    )
    min_chars: int = Field(10, ge=0, description="length: reject completions shorter than this many characters")
    max_chars: int = Field(4000, gt=0, description="length: reject completions longer than this many characters")
    max_paragraph_chars: int = Field(1500, gt=0, description="paragraphs: reject a completion with a paragraph "
                                                             "(text between blank lines) longer than this")
    allow_code_blocks: bool = Field(False, description="code: keep completions with fenced code blocks "
                                                       "(``` or ~~~); off for tasks where code does not belong")
    max_foreign_word_share: float = Field(0.05, ge=0, le=1, description="language: reject when more than this "
                                          "share of the reasoning's words is not in the target language's script")
    language: Language = Field("en", description="language: target language for samples without a `language` value")
    repetition_ngram: int = Field(4, ge=1, description="repetition: n of the word n-grams counted")
    max_repeated_ngram_share: float = Field(0.8, ge=0, le=1, description="repetition: reject when more than "
                                            "this share of the n-grams repeats an earlier one (loops)")
    min_distinct_token_ratio: float = Field(0.1, ge=0, le=1, description="repetition: reject degenerate text "
                                            "whose distinct tokens / all tokens is below this")
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1, description="duplicate: reject a sample whose "
                                            "Jaccard similarity (character 5-gram shingles) with an earlier "
                                            "kept sample of the same prompt is at least this; exact "
                                            "duplicates are always rejected")

    @field_validator("order")
    @classmethod
    def _check_order(cls, order: list[str]) -> list[str]:
        problems = [f"unknown filter {name!r} (expected one of {list(FILTER_NAMES)})"
                    for name in order if name not in FILTER_NAMES]
        problems += [f"filter {name!r} listed twice" for name in sorted(set(order)) if order.count(name) > 1]
        if problems:
            raise ValueError("; ".join(problems))
        return order

    @model_validator(mode="after")
    def _check_bounds(self) -> "FilterConfig":
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must not exceed max_chars ({self.max_chars})")
        return self


# --------------------------------------------------------------------------------------------------
# One check per filter: (text, sample, cfg) -> reason for rejecting, or None to keep.

def check_length(text: str, sample: dict, cfg: FilterConfig) -> str | None:
    if len(text) < cfg.min_chars:
        return f"too short: {len(text)} chars < min_chars {cfg.min_chars}"
    if len(text) > cfg.max_chars:
        return f"too long: {len(text)} chars > max_chars {cfg.max_chars}"
    return None


def check_format(text: str, sample: dict, cfg: FilterConfig) -> str | None:
    problem = format_problem(text)
    return None if problem is None else f"bad format: {problem}"


def check_language(text: str, sample: dict, cfg: FilterConfig) -> str | None:
    language = sample.get("language") or cfg.language
    foreign = 1.0 - language_share(reasoning_text(text), language)
    if foreign > cfg.max_foreign_word_share:
        return f"mixed language: {foreign:.0%} of reasoning words not in {language!r}"
    return None


def check_paragraphs(text: str, sample: dict, cfg: FilterConfig) -> str | None:
    longest = max((len(p.strip()) for p in re.split(r"\n\s*\n", text)), default=0)
    if longest > cfg.max_paragraph_chars:
        return f"overlong paragraph: {longest} chars > max_paragraph_chars {cfg.max_paragraph_chars}"
    return None


_CODE_FENCE = re.compile(r"^[ \t]*(```|~~~)", re.MULTILINE)


def check_code(text: str, sample: dict, cfg: FilterConfig) -> str | None:
    if not cfg.allow_code_blocks and _CODE_FENCE.search(text):
        return "code block where none belongs"
    return None


def check_repetition(text: str, sample: dict, cfg: FilterConfig) -> str | None:
    share = repeated_ngram_share(text, cfg.repetition_ngram)
    if share > cfg.max_repeated_ngram_share:
        return f"repetitive: {share:.0%} of {cfg.repetition_ngram}-grams repeated"
    toks = tokens(text)
    ratio = len(set(toks)) / len(toks) if toks else 1.0
    if ratio < cfg.min_distinct_token_ratio:
        return f"degenerate: {ratio:.0%} distinct tokens < {cfg.min_distinct_token_ratio:.0%}"
    return None


def judge_correct(text: str, gold: Any) -> tuple[bool | None, str]:
    """(correct, why) by the rule verifier; correct is None when rules cannot settle it."""
    answer = extract_answer(text)
    verdict = verify_answer(gold, answer)
    if verdict is None:
        return None, "no gold answer" if gold is None else f"gold answer {str(gold)[:40]!r} is not parseable"
    if verdict:
        return True, "correct"
    if answer is None:
        return None, "no answer in the completion"
    if not parse_math(answer) and parse_math(str(gold)):
        return None, f"answer {answer[:40]!r} is not parseable"
    return False, f"wrong answer: {answer[:40]!r} != gold {str(gold)[:40]!r}"


CHECKS: dict[str, Callable[[str, dict, FilterConfig], str | None]] = {
    "length": check_length,
    "format": check_format,
    "language": check_language,
    "paragraphs": check_paragraphs,
    "code": check_code,
    "repetition": check_repetition,
}


# --------------------------------------------------------------------------------------------------
# Duplicates

def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def shingles(text: str, k: int = 5) -> set[str]:
    """Character k-grams of the lower-cased, whitespace-collapsed text (the text itself if shorter)."""
    text = _normalise(text)
    return {text[i:i + k] for i in range(max(1, len(text) - k + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _mark_duplicates(results: list[dict], texts: list[str], cfg: FilterConfig) -> None:
    """Reject standing samples that duplicate an earlier standing sample of the same prompt."""
    kept: dict[Any, list[tuple[int, str, set]]] = {}
    for i, result in enumerate(results):
        if result["rejected_by"] is not None:
            continue
        norm, sh = _normalise(texts[i]), shingles(texts[i])
        for j, other_norm, other_sh in kept.setdefault(result["prompt_id"], []):
            if norm == other_norm:
                result["rejected_by"], result["reason"] = "duplicate", f"exact duplicate of sample {j}"
                break
            similarity = jaccard(sh, other_sh)
            if similarity >= cfg.near_duplicate_threshold:
                result["rejected_by"] = "duplicate"
                result["reason"] = f"near duplicate of sample {j} (Jaccard {similarity:.2f})"
                break
        else:
            kept[result["prompt_id"]].append((i, norm, sh))


# --------------------------------------------------------------------------------------------------

def apply_filters(samples: list[dict], cfg: FilterConfig) -> list[dict]:
    """Run the filters of `cfg.order` over `samples`; return new dicts (same order) with
    `rejected_by` (first filter that rejected it, or None), `reason`, `correct` (bool, or None
    when rules cannot tell) and `needs_judge` (kept by the rules but correctness unsettled)."""
    texts = [completion_text(s.get("completion")) for s in samples]
    results = []
    for sample, text in zip(samples, texts):
        correct, why = judge_correct(text, sample.get("answer"))
        results.append({**sample, "rejected_by": None, "reason": why, "correct": correct, "needs_judge": False})
    for name in cfg.order:
        if name == "duplicate":
            _mark_duplicates(results, texts, cfg)
            continue
        for result, text in zip(results, texts):
            if result["rejected_by"] is not None:
                continue
            if name == "correct":
                reason = result["reason"] if result["correct"] is False else None
            else:
                reason = CHECKS[name](text, result, cfg)
            if reason is not None:
                result["rejected_by"], result["reason"] = name, reason
    for result in results:
        result["needs_judge"] = result["rejected_by"] is None and result["correct"] is None
        if result["needs_judge"]:
            result["reason"] = f"needs judge: {result['reason']}"
    return results


def funnel(results: list[dict], order: list[str] | None = None) -> list[dict]:
    """The rejection funnel: `{"step", "remaining", "rejected"}` rows, starting with "generated",
    then one row per filter in `order` (pass `cfg.order` to list filters that rejected nothing;
    without it, the filters that rejected something, in FILTER_NAMES order)."""
    counts: dict[str, int] = {}
    for result in results:
        if result["rejected_by"] is not None:
            counts[result["rejected_by"]] = counts.get(result["rejected_by"], 0) + 1
    steps = list(order) if order is not None else [n for n in FILTER_NAMES if n in counts]
    steps += [name for name in counts if name not in steps]
    remaining = len(results)
    rows = [{"step": "generated", "remaining": remaining, "rejected": 0}]
    for step in steps:
        remaining -= counts.get(step, 0)
        rows.append({"step": step, "remaining": remaining, "rejected": counts.get(step, 0)})
    return rows
