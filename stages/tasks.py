r"""Real task data from the `reasoning-gym` package: prompts with gold answers and each task's own verifier.

A reasoning-gym task is a procedural generator (`chain_sum`, `basic_arithmetic`, `leg_counting`,
`gsm_symbolic`, `countdown`, ... about 106 of them) plus a verifier `score_answer(answer, entry)` that
returns 1.0 for a right answer, 0.0 for a wrong one, and for some tasks partial credit in between.
In flows.yaml a dataset reference of the form

    dataset: {reasoning_gym: {task: chain_sum, settings: {min_terms: 2, max_terms: 2}, size: 500, seed: 1}}

(`stages.data.ReasoningGymRef`) is turned into rows by `task_rows`:

    {"prompt": [{"role": "user", "content": question}], "answer": "<gold>", "task": "chain_sum",
     "task_entry": "<the whole generated entry as JSON>", "solution": "<worked solution or None>"}

`task_reward` is a TRL reward that scores the extracted answer (`<answer>...</answer>`, else the last
`\boxed{}`) with the task's verifier; `VerifierAgreement` is a TRL "reward" that returns None (never
changes training) and records how often r1flow's own accuracy rule (`stages.rewards.verify_answer`,
math-verify) agrees with the task verifier.

Splits: most reasoning-gym tasks (98 of 106 in 0.1.25, e.g. chain_sum, basic_arithmetic,
leg_counting) seed row i with `random.Random(seed + i)`, so row i of seed s + k asks the question of
row i + k of seed s, with the same answer: a train split with seed 1, size 500 and an eval split with
seed 2 share every eval question. Keep the
seeds of splits of one task at least `size` apart; `seed_ranges_overlap` and `question_overlap`
check it, and the data card (`task_card`, data_cards/reasoning_gym.md) has an overlap table. Small
settings also repeat questions inside one split (chain_sum with two 1-digit terms: 187 distinct
questions in 500 rows).

reasoning-gym is imported lazily (importing it costs about a second): only when a config with a
`reasoning_gym` reference is validated, or rows or scores are computed.

Documented differences: `verify_answer` (math-verify) vs the task verifiers
--------------------------------------------------------------------------------
Measured with reasoning-gym 0.1.25 on the text inside `<answer>...</answer>` as `extract_answer`
returns it (stripped). "rule" is r1flow's accuracy verdict, the numbers are the task scores for
chain_sum / basic_arithmetic / leg_counting / gsm_symbolic (`VerifierAgreement` counts a score below
1.0 as wrong). Pinned in tests/test_tasks.py (`test_documented_differences`).

    gold  answer            rule   chain  basic  legs   gsm
    6     6                 True   1      1      1      1
    6     7 (off by one)    False  0      0      0      0.01   gsm: 0.01 for any wrong number
    6     16, 66            False  0.5    0.5    0.5    0.01   substring credit len(gold)/len(answer)
    6     -6                False  0.5    0.5    0.5    1      gsm ignores a leading minus sign
    -4    -4                True   1      1      1      0.01   ... so a negative gold can never score 1
    -4    -45               False  0.67   0.67   0.67   0.01
    -4    −4 (U+2212), - 4  True   0      0      0      0.01
    6     6.                True   1      0.5    0.5    1      chain_sum compares Decimals
    6     6.0, +6, 06       True   1      <1     <1     1      basic/legs compare exact strings
    6     x = 6             True   0.2    0.2    0.2    1
    6     $6$               True   0.33   0.33   0.33   1
    6     6 legs            True   0.17   0.17   0.17   1      gsm reads the first number
    6     \boxed{6}         True   0.11   0.11   0.11   1      (inside an <answer> block)
    6     The answer is 6   True   0.07   0.07   0.07   1
    6     5 + 1 = 6         True   0.11   0.11   0.11   0.01   rule: last value of the chain
    6     6, 7              False  0.33   0.25   0.25   1      gsm: first number wins
    1000  1,000             True   1      0      0      0.01   chain_sum strips commas
    1000  1 000             False  0      0      0      0.01

Spaces around an answer never reach a verifier (`extract_answer` strips them); passed unstripped,
` 6 ` scores 1 for chain_sum and gsm_symbolic but 0.33 for basic_arithmetic and leg_counting.

Over 200 generated entries per task (seed 1, default settings), answers written as: the gold string,
gold +-1, the gold with a trailing period, `x = gold`, `$gold$`, `gold legs`:
- gold and off-by-one answers: 100% agreement on all four tasks (gsm_symbolic's 0.01 counts as wrong);
- `gold.`: 100% chain_sum and gsm_symbolic, 0% basic_arithmetic and leg_counting (partial credit);
- `x = gold`, `$gold$`, `gold legs`: 100% gsm_symbolic, 0% on the other three (rule right, task partial);
- negated gold (`-gold` for a positive gold): gsm_symbolic 0% (task 1.0, rule wrong), others 100%.

In short: math-verify is the more lenient reader of *formats* (units, `x =`, `$..$`, trailing period,
thousands separators), basic_arithmetic and leg_counting want the exact string (and pay partial credit
for any answer containing it -- `16` for gold `6` earns 0.5 -- so used as a reward, `task_reward` pays
for near misses), chain_sum is exact up to Decimal and commas, and gsm_symbolic takes the first number
and drops its minus sign (lenient on words, wrong on signs). Nothing here changes `stages.rewards`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import threading
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from stages.rewards import completion_text, extract_answer, verify_answer

log = logging.getLogger(__name__)

SOURCE = "reasoning-gym"
LICENSE = "Apache-2.0"
# Config fields of every reasoning-gym task that r1flow sets from the spec itself, not from `settings`.
_SPEC_FIELDS = ("size", "seed")
MAX_EXAMPLES = 20  # disagreement examples kept by VerifierAgreement


# --------------------------------------------------------------------------------------------------
# The registry (lazy import)

def _registry() -> dict[str, tuple[type, type]]:
    """reasoning-gym's task registry: name -> (dataset class, config dataclass)."""
    try:
        from reasoning_gym.factory import DATASETS  # noqa: PLC0415  (imports every task: ~1 s)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError("the `reasoning-gym` package is not installed (pip install reasoning-gym)") from exc
    return DATASETS


def package_version() -> str:
    """The installed reasoning-gym version (for data cards), or "unknown"."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("reasoning_gym")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def task_names() -> list[str]:
    """All registered reasoning-gym task names, sorted."""
    return sorted(_registry())


def setting_names(task: str) -> list[str]:
    """The settings a task accepts: its config dataclass fields, without `size` and `seed`."""
    config_cls = _registry()[task][1]
    return [f.name for f in dataclasses.fields(config_cls) if f.name not in _SPEC_FIELDS]


def _check_task(task: str) -> str:
    names = _registry()
    if task in names:
        return task
    close = difflib.get_close_matches(task, list(names), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"e.g. {', '.join(sorted(names)[:5])}"
    raise ValueError(f"unknown reasoning-gym task {task!r} ({hint} reasoning-gym {package_version()} "
                     f"has {len(names)} tasks, listed in reasoning_gym.factory.DATASETS)")


def _setting_types(config_cls: type) -> dict[str, Any]:
    """Field name -> type annotation of a config dataclass ({} when the annotations can't be resolved)."""
    try:
        return typing.get_type_hints(config_cls)
    except Exception:  # noqa: BLE001  (forward references we can't resolve: skip type checks)
        return {}


def _check_settings(task: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Unknown names, wrong types and values the task's own `validate()` rejects are errors, one line
    each (several joined by "; ", which the config loader prints as separate lines). Returns the
    settings with values coerced to the field types (e.g. "3" -> 3 for an int field)."""
    config_cls = _registry()[task][1]
    valid = setting_names(task)
    problems = []
    for name in settings:
        if name in _SPEC_FIELDS:
            problems.append(f"{name!r} is not a setting: set `{name}` next to `task`, not inside `settings`")
        elif name not in valid:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"unknown setting {name!r} for task {task!r} ({hint}valid settings: {', '.join(valid)})")
    if problems:
        raise ValueError("; ".join(problems))
    types = _setting_types(config_cls)
    coerced = {}
    for name, value in settings.items():
        hint = types.get(name)
        if hint is None or hint is Any:
            coerced[name] = value
            continue
        try:
            coerced[name] = TypeAdapter(hint).validate_python(value)
        except ValidationError as exc:
            problems.append(f"setting {name!r} of task {task!r}: expected {_type_name(hint)} "
                            f"(got {value!r}: {exc.errors()[0]['msg']})")
        except Exception:  # noqa: BLE001  (a type pydantic can't build a validator for: pass it on)
            coerced[name] = value
    if problems:
        raise ValueError("; ".join(problems))
    try:
        config = config_cls(**coerced)
        if hasattr(config, "validate"):
            config.validate()
    except (AssertionError, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0].strip() if str(exc).strip() else type(exc).__name__
        given = ", ".join(f"{k}={v!r}" for k, v in coerced.items()) or "defaults"
        raise ValueError(f"invalid settings for task {task!r}: {reason} (settings: {given})") from exc
    return coerced


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


class ReasoningGymSpec(BaseModel):
    """A dataset generated by one reasoning-gym task (`reasoning_gym:` in a dataset reference)."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="reasoning-gym task name, e.g. chain_sum, basic_arithmetic, leg_counting, "
                                  "gsm_symbolic, countdown (`reasoning_gym.factory.DATASETS` lists them)")
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="the task's own configuration fields (its config dataclass, without size and seed), "
                    "e.g. {min_terms: 2, max_terms: 2} for chain_sum; checked against the task",
    )
    size: int = Field(gt=0, description="number of rows to generate")
    seed: int = Field(description="generator seed: the same task, settings, size and seed give the same rows; "
                                  "most tasks seed row i with seed + i, so keep the seeds of different splits "
                                  "of one task at least `size` apart (see `seed_ranges_overlap`)")

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        return _check_task(task)

    @field_validator("settings")
    @classmethod
    def _valid_settings(cls, settings: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        task = info.data.get("task")
        if task is None:  # the task itself was invalid (already reported)
            return settings
        return _check_settings(task, settings)


# --------------------------------------------------------------------------------------------------
# Rows

def _json_safe(value: Any) -> Any:
    """Tuples -> lists, sets -> sorted lists, dict keys -> strings, recursively; other values as they
    are (json.dumps turns what is left into strings with default=str)."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [_json_safe(v) for v in value]
        try:
            return sorted(items)
        except TypeError:  # mixed types: order by their JSON text
            return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, default=str))
    return value


def entry_json(entry: dict[str, Any]) -> str:
    """A reasoning-gym entry as a JSON string (JSON-safe, see `_json_safe`; unknown objects via str)."""
    return json.dumps(_json_safe(entry), ensure_ascii=False, default=str)


def task_rows(spec: ReasoningGymSpec) -> list[dict[str, Any]]:
    """The spec's entries as r1flow rows: `prompt` (one user turn), `answer` (gold, a string), `task`,
    `task_entry` (the whole entry as JSON, for the task verifier) and `solution` (the entry's worked
    solution `metadata["answer_cot"]` where the task has one, e.g. gsm_symbolic; else None).
    Deterministic: the same spec gives the same rows."""
    import reasoning_gym  # noqa: PLC0415

    dataset = reasoning_gym.create_dataset(spec.task, size=spec.size, seed=spec.seed, **spec.settings)
    rows = []
    for i in range(spec.size):
        entry = dataset[i]
        metadata = entry.get("metadata") or {}
        solution = metadata.get("answer_cot") if isinstance(metadata, dict) else None
        rows.append({
            "prompt": [{"role": "user", "content": str(entry["question"])}],
            "answer": str(entry["answer"]),
            "task": spec.task,
            "task_entry": entry_json(entry),
            "solution": str(solution) if solution else None,
        })
    return rows


# --------------------------------------------------------------------------------------------------
# Scores

@functools.lru_cache(maxsize=None)
def _score_fn(task: str):
    import reasoning_gym  # noqa: PLC0415

    _check_task(task)
    return reasoning_gym.get_score_answer_fn(task)


def _entry(task_entry: str | dict) -> dict[str, Any]:
    return json.loads(task_entry) if isinstance(task_entry, str) else task_entry


def task_score(task: str, task_entry: str | dict, answer_text: str | None) -> float:
    """The task's own verifier on `answer_text` (the extracted answer) against the decoded entry
    (`task_entry`, the row's JSON string, or a dict): 1.0 right, 0.0 wrong, partial credit in between
    for some tasks. None or blank answers score 0.0; a verifier that raises scores 0.0 (logged)."""
    if answer_text is None or not answer_text.strip():
        return 0.0
    entry = _entry(task_entry)
    try:
        return float(_score_fn(task)(answer_text, entry))
    except Exception as exc:  # noqa: BLE001  (a verifier bug must not end a training run)
        log.warning("reasoning-gym verifier of %r raised %s: %s; scored 0.0", task, type(exc).__name__, exc)
        return 0.0


def _per_row(value: Any, n: int, name: str) -> list:
    """A dataset column as n values (TRL passes lists); a scalar is repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"reward column {name!r}: {len(value)} values for {n} completions")
        return list(value)
    return [value] * n


def task_reward(completions: list, task: list | str | None = None, task_entry: list | str | None = None,
                **kw) -> list[float | None]:
    """TRL reward: the task verifier's score of each completion's extracted answer (`<answer>` block,
    else the last `\\boxed{}`; a completion without one scores 0.0). None for rows without a
    `task_entry` (e.g. rows of a non-reasoning-gym dataset in a mix)."""
    n = len(completions)
    tasks, entries = _per_row(task, n, "task"), _per_row(task_entry, n, "task_entry")
    rewards: list[float | None] = []
    for completion, name, entry in zip(completions, tasks, entries):
        if entry is None or name is None:
            rewards.append(None)
            continue
        rewards.append(task_score(name, entry, extract_answer(completion_text(completion))))
    return rewards


# --------------------------------------------------------------------------------------------------
# Agreement between r1flow's accuracy rule and the task verifiers

def _new_counts() -> dict[str, int]:
    return {"n": 0, "agree": 0, "rule_none": 0, "partial_credit": 0, "rule_only": 0, "task_only": 0}


class VerifierAgreement:
    """Records, per completion, r1flow's accuracy verdict (`verify_answer(gold, extract_answer(text))`:
    True / False / None) against the task verifier's (score >= 1.0 is right; partial credit is wrong).
    Call it like a TRL reward -- it returns `[None] * n`, so it never changes the training reward --
    or use `record(...)` directly. `summary()` gives the counts and up to 20 disagreements.

    Rows without a `task_entry` are skipped. A rule verdict of None (gold unparseable) never agrees.
    Counts: `rule_only` = rule right, task wrong; `task_only` = task right, rule wrong or None."""

    def __init__(self, max_examples: int = MAX_EXAMPLES):
        self.__name__ = "verifier_agreement"
        self.max_examples = max_examples
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._total = _new_counts()
            self._by_task: dict[str, dict[str, int]] = {}
            self._examples: list[dict[str, Any]] = []

    def __call__(self, completions: list, answer: list | str | None = None, task: list | str | None = None,
                 task_entry: list | str | None = None, prompts: list | None = None, **kw) -> list[None]:
        self.record(completions, answer=answer, task=task, task_entry=task_entry)
        return [None] * len(completions)

    def record(self, completions: list, answer: list | str | None = None, task: list | str | None = None,
               task_entry: list | str | None = None) -> None:
        """Compare both verdicts for each completion that has a `task_entry` (and a `task`)."""
        n = len(completions)
        golds = _per_row(answer, n, "answer")
        tasks, entries = _per_row(task, n, "task"), _per_row(task_entry, n, "task_entry")
        results = []
        for completion, gold, name, raw in zip(completions, golds, tasks, entries):
            if raw is None or name is None:
                continue
            entry = _entry(raw)
            if gold is None:
                gold = entry.get("answer")
            text = completion_text(completion)
            extracted = extract_answer(text)
            rule = verify_answer(gold, extracted)
            score = task_score(name, entry, extracted)
            results.append((name, entry, gold, text, extracted, rule, score))
        with self._lock:
            for name, entry, gold, text, extracted, rule, score in results:
                task_ok = score >= 1.0
                agree = rule is not None and rule == task_ok
                for counts in (self._total, self._by_task.setdefault(name, _new_counts())):
                    counts["n"] += 1
                    counts["agree"] += agree
                    counts["rule_none"] += rule is None
                    counts["partial_credit"] += 0.0 < score < 1.0
                    counts["rule_only"] += rule is True and not task_ok
                    counts["task_only"] += task_ok and rule is not True
                if not agree and len(self._examples) < self.max_examples:
                    self._examples.append({
                        "task": name, "question": str(entry.get("question", ""))[:300], "gold": str(gold),
                        "extracted": extracted, "rule": rule, "task_score": score, "completion": text[:300],
                    })

    def state(self) -> dict[str, Any]:
        """The raw counts and examples (JSON-able), as `merge` takes them."""
        with self._lock:
            return {"total": dict(self._total), "by_task": {k: dict(v) for k, v in self._by_task.items()},
                    "examples": [dict(e) for e in self._examples]}

    def merge(self, states: list[dict[str, Any]]) -> None:
        """Replace this record by the sum of `states` (e.g. every rank's `state()` of a multi-process run, where
        each rank scores only its own share of the completions); examples are kept in order, up to the limit."""
        self.reset()
        with self._lock:
            for st in states:
                for key, value in st["total"].items():
                    self._total[key] += value
                for name, counts in st["by_task"].items():
                    mine = self._by_task.setdefault(name, _new_counts())
                    for key, value in counts.items():
                        mine[key] += value
                self._examples.extend(st["examples"][: self.max_examples - len(self._examples)])

    def gather(self) -> None:
        """Under torch.distributed (a launched stage), sum every rank's record into each rank's; else nothing."""
        import torch.distributed as dist  # noqa: PLC0415

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, self.state())
            self.merge(states)

    def summary(self) -> dict[str, Any]:
        """{"n", "agree", "share" (agree / n, None when n == 0), "by_task": {task: {n, agree, share,
        rule_none, partial_credit, rule_only, task_only}}, "disagreements": [up to 20 examples]}."""
        def with_share(counts: dict[str, int]) -> dict[str, Any]:
            return {**counts, "share": counts["agree"] / counts["n"] if counts["n"] else None}

        with self._lock:
            total = with_share(self._total)
            return {
                "n": total["n"], "agree": total["agree"], "share": total["share"],
                "rule_none": total["rule_none"], "partial_credit": total["partial_credit"],
                "rule_only": total["rule_only"], "task_only": total["task_only"],
                "by_task": {name: with_share(c) for name, c in sorted(self._by_task.items())},
                "disagreements": [dict(e) for e in self._examples],
            }


# --------------------------------------------------------------------------------------------------
# Overlap between splits, and the data card (data_cards/reasoning_gym.md)

CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "data_cards" / "reasoning_gym.md"


def seed_range(spec: ReasoningGymSpec) -> tuple[int, int]:
    """The generator seeds a spec uses: reasoning-gym seeds row i with `seed + i`, so a spec uses
    seed .. seed + size - 1, and two specs of the same task and settings whose ranges intersect share
    questions and answers (row i of seed s + k asks what row i + k of seed s asks; for most tasks)."""
    return spec.seed, spec.seed + spec.size - 1


def seed_ranges_overlap(a: ReasoningGymSpec, b: ReasoningGymSpec) -> bool:
    """True when `a` and `b` are the same task with the same settings and their seed ranges
    intersect, so (for most tasks) some of their questions are identical by construction."""
    (a0, a1), (b0, b1) = seed_range(a), seed_range(b)
    return a.task == b.task and a.settings == b.settings and a0 <= b1 and b0 <= a1


def _question(row: dict[str, Any]) -> str:
    prompt = row.get("prompt", row.get("question", ""))
    if isinstance(prompt, list):  # a conversation: its user turns
        prompt = "\n".join(str(m.get("content", "")) for m in prompt if m.get("role", "user") == "user")
    return str(prompt).strip()


def question_overlap(rows: list[dict[str, Any]], other_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How many of `rows` ask a question (the user turns of `prompt`, stripped) that `other_rows`
    also asks: {"shared": n, "share": n / len(rows) (0.0 for no rows), "distinct_shared": distinct
    questions in common}."""
    other = {_question(r) for r in other_rows}
    mine = [_question(r) for r in rows]
    shared = sum(q in other for q in mine)
    return {"shared": shared, "share": shared / len(mine) if mine else 0.0,
            "distinct_shared": len(set(mine) & other)}


def rows_sha256(rows: list[dict[str, Any]]) -> str:
    """sha256 of the rows as JSON lines (as a `.jsonl` file of them would hash)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def task_card(spec: ReasoningGymSpec, rows: list[dict[str, Any]] | None = None, name: str | None = None,
              others: dict[str, ReasoningGymSpec | list[dict[str, Any]]] | None = None,
              agreement: dict[str, Any] | None = None) -> str:
    """The data card (Markdown with YAML metadata) of a dataset made from `spec`, rendered from
    data_cards/reasoning_gym.md. `rows` default to `task_rows(spec)`; `others` maps other splits'
    names to their specs or rows, for the overlap table (not checked when None); `agreement` is a
    `VerifierAgreement.summary()`."""
    from huggingface_hub import DatasetCard, DatasetCardData  # noqa: PLC0415

    rows = task_rows(spec) if rows is None else rows
    name = name or f"reasoning_gym:{spec.task}"
    n = len(rows)
    size = "n<1K" if n < 1000 else "1K<n<10K" if n < 10000 else "10K<n<100K" if n < 100000 else "n>100K"
    data = DatasetCardData(language=["en"], license="apache-2.0", size_categories=[size],
                           task_categories=["text-generation"], source_datasets=["reasoning-gym"],
                           pretty_name=f"r1flow: reasoning-gym {spec.task}",
                           tags=["r1flow", "reasoning-gym", spec.task, "synthetic"])
    if others:
        table = []
        for other_name, other in others.items():
            if isinstance(other, ReasoningGymSpec):
                lo, hi = seed_range(other)
                seeds = f"{other.task} {lo}..{hi}" + (" (seed ranges intersect)" if seed_ranges_overlap(spec, other) else "")
                other = task_rows(other)
            else:
                seeds = "-"
            o = question_overlap(rows, other)
            table.append(f"| {other_name} | {seeds} | {o['shared']} ({o['distinct_shared']} distinct) | {o['share']:.1%} |")
        overlap_rows = "\n".join(table)
        overlap_method = ("Rows of this split whose question (the user turn, stripped) also appears in the other "
                          "split (`stages.tasks.question_overlap`).")
    else:
        overlap_rows = "| (not checked) | - | - | - |"
        overlap_method = ("Not checked yet: compare with every split trained or evaluated next to this one "
                          "(`stages.tasks.question_overlap`, `stages.tasks.seed_ranges_overlap`).")
    if agreement and agreement.get("n"):
        agreement_text = (f"{agreement['agree']} of {agreement['n']} verdicts agree "
                          f"({agreement['share']:.1%}).")
    else:
        agreement_text = "not measured."
    verifier_cls = _registry()[spec.task][0]
    lo, hi = seed_range(spec)
    reference = json.dumps({"reasoning_gym": spec.model_dump()}, ensure_ascii=False)
    card = DatasetCard.from_template(
        data, template_path=str(CARD_TEMPLATE), name=name, task=spec.task,
        settings=json.dumps(spec.settings, ensure_ascii=False, default=str), size=spec.size, seed=spec.seed,
        seed_range=f"{lo}..{hi}", package_version=package_version(), license=LICENSE,
        verifier=f"{verifier_cls.__module__}.{verifier_cls.__qualname__}.score_answer", reference=reference,
        agreement=agreement_text, num_rows=n, distinct_questions=len({_question(r) for r in rows}),
        with_solution=sum(bool(r.get("solution")) for r in rows), sha256=rows_sha256(rows),
        overlap_method=overlap_method, overlap_rows=overlap_rows,
        example=json.dumps(rows[0], ensure_ascii=False) if rows else "",
    )
    return str(card)
