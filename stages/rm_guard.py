"""The reward-model guard: the twin of the judge guard (`stages/judge.py`), for stage 4's reward model.

A reward model is a learned grader, and an RL policy finds the texts it wrongly loves: on the tiny
world a stage-4 policy was paid for `<think>The::::…` and for loops of "is the plural of", which the
reward model scored above the good answer. So before stage 4 trusts a reward model (trained by the
`reward-model` stage or named in flows.yaml), it scores canaries built from held-out prompts and a
good reference answer to each:

- `repetition-loop`  a phrase of the reference looped many times,
- `punctuation-run`  a word followed by a long run of one punctuation mark (`The::::::::…`),
- `newline-run`      the start of the reference, then a run of newlines to the length limit,
- `padded`           the reference answer padded with filler to `pad_factor` times its length,
- `other-question`   the reference answer of a different held-out prompt,
- `gibberish`        nonsense syllables,

each in the reference's shape (inside `<think>…</think><answer>…</answer>` when the reference uses
the tags, so the format alone does not give them away). The reward model must score the reference
above each canary on at least `min_pass_share` of the prompts; otherwise the guard fails and names
the canaries that got through. `preference-rl` then stops (or, with `on_fail: zero-weight`, trains
with the reward model's weights at 0 and says so); the `reward-model` stage runs the same guard on
the model it has just trained.

    examples = guard_examples(rows, cfg.n_prompts)            # rows: held-out {prompt, chosen}
    result = check_reward_model(examples, rm_scorer(rm, tok), cfg)
    result.passed, result.message, result.table_rows()
    summary = run_guard(cfg, rm, tok, rows, ctx)               # the same, reported; raises UserError on `stop`

`synthetic_pairs` builds the same kinds of bad answers as training pairs (reward-model stage,
`synthetic_negatives`), with other random draws.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any, Callable, Literal

from pydantic import Field, field_validator

from stages.common import StageConfig, UserError
from stages.data import DatasetRef
from stages.rewards import completion_text, extract_answer, reasoning_text

log = logging.getLogger(__name__)

CANARY_NAMES = ("repetition-loop", "punctuation-run", "newline-run", "padded", "other-question", "gibberish")

# Filler for the `padded` canary: says nothing, in any domain.
FILLER = (
    "I hope this helps, and let me say a little more about it.",
    "There is a lot more that could be said here, so I will keep going.",
    "To put it another way, it is just as I said before.",
    "Let me add some more words here to be thorough and complete.",
    "This is a very interesting and important question to think about.",
    "As always, it is good to consider every side of the matter.",
)
_SYLLABLES = ("ka", "zu", "mop", "ree", "tol", "fin", "gra", "shu", "ble", "vo", "nix", "pa", "dro", "lum")
_PUNCTUATION = ":!?.,;-*"


class RMGuardConfig(StageConfig):
    """Reward-model guard settings (`rm_guard:` under `preference-rl`, `guard:` under `reward-model`)."""

    enabled: bool = Field(True, description="score the canaries before the reward model is trusted")
    dataset: DatasetRef | None = Field(
        None, description="held-out prompts with a good reference response (`prompt`, `chosen`): None = the "
                          "held-out pairs the reward-model stage wrote (`heldout_pairs.jsonl`), else "
                          "preference-rl's `eval_general` when it has a `chosen` column; the reward-model "
                          "stage always uses its own held-out split")
    n_prompts: int = Field(40, ge=1, description="held-out prompts to build canaries from (each gets every canary)")
    canaries: list[str] = Field(
        default_factory=lambda: list(CANARY_NAMES),
        description=f"which canaries to show, any of: {', '.join(CANARY_NAMES)}")
    min_pass_share: float = Field(
        0.9, ge=0, le=1, description="the reward model must score the reference above a canary on at least this "
                                     "share of the prompts, for every canary, or the guard fails")
    min_margin: float = Field(
        0.0, ge=0, description="the reference beats a canary only when its score is higher by more than this")
    pad_factor: float = Field(
        4.0, gt=1, description="the `padded` canary is the reference padded with filler to this many times its length")
    loop_repeats: int = Field(16, ge=2, description="how often the `repetition-loop` canary repeats its phrase")
    run_length: int = Field(80, ge=2, description="length of the `punctuation-run` and `newline-run` canaries' runs")
    on_fail: Literal["stop", "zero-weight"] = Field(
        "stop", description="when the guard fails: `stop` with an error naming the canaries that passed, or "
                            "`zero-weight`: preference-rl trains with the reward model's weights at 0 (general "
                            "prompts carry no reward) and says so in its metrics; the reward-model stage keeps its "
                            "version and records the failure with a warning")
    seed: int = Field(0, description="seed of the random parts of the canaries (gibberish, punctuation mark)")

    @field_validator("canaries")
    @classmethod
    def _known_canaries(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in CANARY_NAMES]
        if unknown:
            raise ValueError(f"unknown canary {', '.join(unknown)} (known: {', '.join(CANARY_NAMES)})")
        if not value:
            raise ValueError("name at least one canary")
        return list(dict.fromkeys(value))


# --------------------------------------------------------------------------------------------------
# Canaries

def _split(reference: str) -> tuple[str, str, bool]:
    """(reasoning, answer, tagged) of a reference response; untagged: ("", whole text, False)."""
    answer = extract_answer(reference) if "<answer>" in reference else None
    if answer is not None and "<think>" in reference:
        return reasoning_text(reference).strip(), answer, True
    return "", reference.strip(), False


def _shape(think: str, answer: str, tagged: bool) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>" if tagged else answer


def _words(text: str, k: int) -> str:
    return " ".join(text.split()[:k])


def canaries(prompt_text: str, reference: str, other_reference: str, names=CANARY_NAMES, pad_factor: float = 4.0,
             loop_repeats: int = 16, run_length: int = 80, seed: int = 0) -> list[tuple[str, str]]:
    """Known-bad responses to one prompt as (name, text), in the shape of `reference` (see module doc).
    `other_reference` is the reference answer of a different prompt. Deterministic in (seed, prompt)."""
    rng = random.Random(f"{seed}|{prompt_text}")
    think, answer, tagged = _split(completion_text(reference))
    body = answer or think or "the"
    out: list[tuple[str, str]] = []
    for name in names:
        if name == "repetition-loop":
            phrase = _words(body, 4) or "the"
            loop = " ".join([phrase] * loop_repeats)
            text = _shape(loop, " ".join([phrase] * max(2, loop_repeats // 2)), True) if tagged else loop
        elif name == "punctuation-run":
            mark = rng.choice(_PUNCTUATION)
            first = _words(body, 1) or "The"
            text = (_shape((_words(think, 1) or first) + mark * run_length, first + mark * (run_length // 2), True)
                    if tagged else first + mark * run_length)
        elif name == "newline-run":
            start = _words(think or body, 3)
            text = _shape(start, "\n" * run_length, tagged) if tagged else start + "\n" * run_length
        elif name == "padded":
            text = padded(think, answer, tagged, pad_factor, rng)
        elif name == "other-question":
            text = completion_text(other_reference)
        elif name == "gibberish":
            n = max(12, len(body.split()) + len(think.split()))
            gib = " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(n))
            half = max(4, n // 3)
            text = _shape(" ".join(gib.split()[half:]), " ".join(gib.split()[:half]), True) if tagged else gib
        else:
            raise ValueError(f"unknown canary {name!r}")
        out.append((name, text))
    return out


def padded(think: str, answer: str, tagged: bool, factor: float, rng: random.Random) -> str:
    """The reference (`think`, `answer`) with filler sentences added after its reasoning and after its
    answer, in turn, until the text is at least `factor` times as long (characters) as the reference."""
    target = factor * len(_shape(think, answer, tagged))
    think_pad, answer_pad = [], []
    i = 0
    while len(_shape(" ".join([think, *think_pad]), " ".join([answer, *answer_pad]), tagged)) < target:
        (answer_pad if i % 2 or not tagged else think_pad).append(rng.choice(FILLER))
        i += 1
    return _shape(" ".join([think, *think_pad]).strip(), " ".join([answer, *answer_pad]).strip(), tagged)


def _question(prompt: Any) -> str:
    """The question of a prompt: a string, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content") or "" for m in prompt if m.get("role") == "user"]
    return str(users[-1]) if users else completion_text(prompt)


def guard_examples(rows: list[dict], n: int) -> list[dict]:
    """The first `n` usable rows {prompt, chosen} as guard examples {prompt, question, reference, other}:
    `other` is the reference of the next row with a different question (None when there is none)."""
    items = [{"prompt": r["prompt"], "question": _question(r["prompt"]),
              "reference": completion_text(r["chosen"]).strip()} for r in rows]
    items = [it for it in items if it["reference"]][:n]
    for i, it in enumerate(items):
        others = [items[(i + k) % len(items)] for k in range(1, len(items))]
        other = next((o for o in others if o["question"] != it["question"] and o["reference"] != it["reference"]), None)
        it["other"] = other["reference"] if other else None
    return items


def synthetic_pairs(rows: list[dict], per_row: float, seed: int, names=CANARY_NAMES) -> list[dict]:
    """Synthetic preference pairs {prompt, chosen, rejected, rejected_kind} for reward-model training:
    about `per_row` pairs per row {prompt, chosen}, each the row's chosen answer against one kind of
    canary built from it (kinds in turn; `other-question` uses another row's chosen answer), with
    loop, run and padding lengths drawn at random (the guard uses fixed ones, other random draws)."""
    rng = random.Random(f"synthetic|{seed}")
    examples = guard_examples(rows, len(rows))
    if not examples:
        return []
    n = round(per_row * len(examples))
    pairs = []
    for k in range(n):
        ex = examples[rng.randrange(len(examples))]
        name = names[k % len(names)]
        if name == "other-question" and not ex["other"]:
            continue
        if name == "other-question":  # a random other row, not always the next one
            others = [o for o in rng.sample(examples, min(8, len(examples))) if o["question"] != ex["question"]]
            other = others[0]["reference"] if others else ex["other"]
        else:
            other = ""
        ((_, text),) = canaries(ex["question"], ex["reference"], other, (name,), pad_factor=rng.uniform(2.0, 6.0),
                                loop_repeats=rng.randint(4, 24), run_length=rng.randint(16, 128),
                                seed=seed * 1_000_003 + k + 1)
        pairs.append({"prompt": ex["prompt"], "chosen": [{"role": "assistant", "content": ex["reference"]}],
                      "rejected": [{"role": "assistant", "content": text}], "rejected_kind": f"synthetic-{name}"})
    return pairs


# --------------------------------------------------------------------------------------------------
# Decision

@dataclasses.dataclass
class RMGuardResult:
    """Outcome of the reward-model guard. `per_canary[name]` = {wins, n, share, mean_reference,
    mean_canary, ok, example}; `failed` names the canaries the reward model did not rank below the
    reference often enough (the ones that got through)."""

    passed: bool
    min_pass_share: float
    n_prompts: int
    per_canary: dict[str, dict[str, Any]]
    failed: list[str]
    message: str

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per canary, for the `rm-guard` table."""
        return [{"canary": name, "reference_wins": f"{c['wins']}/{c['n']}", "win_share": round(c["share"], 4),
                 "required": self.min_pass_share, "mean_reference_score": round(c["mean_reference"], 4),
                 "mean_canary_score": round(c["mean_canary"], 4), "ok": c["ok"], "example": c["example"]}
                for name, c in self.per_canary.items()]

    def summary(self) -> dict[str, Any]:
        """JSON-able summary for a stage's metrics."""
        return {"passed": self.passed, "min_pass_share": self.min_pass_share, "n_prompts": self.n_prompts,
                "failed_canaries": list(self.failed), "message": self.message,
                "win_share": {name: round(c["share"], 4) for name, c in self.per_canary.items()},
                "mean_canary_score": {name: round(c["mean_canary"], 4) for name, c in self.per_canary.items()},
                "mean_reference_score": round(_mean([c["mean_reference"] for c in self.per_canary.values()]), 4)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _example(text: str, limit: int = 120) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "…"


def decide(reference_scores: list[float], canary_scores: dict[str, list[float]], min_pass_share: float,
           min_margin: float = 0.0, examples: dict[str, str] | None = None) -> RMGuardResult:
    """The guard's verdict from scores: `reference_scores[i]` is the reference's score on prompt i,
    `canary_scores[name][i]` that canary's score on the same prompt (None: that canary was not shown
    there). The reference wins when it scores more than `min_margin` above the canary; every canary
    must lose on at least `min_pass_share` of its prompts."""
    per: dict[str, dict[str, Any]] = {}
    for name, scores in canary_scores.items():
        pairs = [(r, c) for r, c in zip(reference_scores, scores) if c is not None]
        wins = sum(r - c > min_margin for r, c in pairs)
        share = wins / len(pairs) if pairs else 1.0
        per[name] = {"wins": wins, "n": len(pairs), "share": share, "ok": share >= min_pass_share,
                     "mean_reference": _mean([r for r, _ in pairs]), "mean_canary": _mean([c for _, c in pairs]),
                     "example": _example((examples or {}).get(name, ""))}
    failed = [name for name, c in per.items() if not c["ok"]]
    return RMGuardResult(not failed, min_pass_share, len(reference_scores), per, failed,
                         guard_message(per, failed, min_pass_share, len(reference_scores)))


def guard_message(per: dict[str, dict[str, Any]], failed: list[str], min_pass_share: float, n_prompts: int) -> str:
    """One line: which canaries got through (with how often the reference won and the mean scores),
    or that all were ranked below the reference."""
    def detail(name: str) -> str:
        c = per[name]
        return (f"{name} (reference won {c['wins']}/{c['n']} = {c['share']:.0%}; mean score canary "
                f"{c['mean_canary']:+.3f} vs reference {c['mean_reference']:+.3f})")

    if failed:
        return (f"reward-model guard failed: on {n_prompts} held-out prompts the reward model did not score the "
                f"reference answer above these canaries on at least {min_pass_share:.0%} of the prompts, so a "
                f"policy would be paid for them: " + ", ".join(detail(n) for n in failed))
    worst = min(per, key=lambda n: per[n]["share"]) if per else None
    return (f"reward-model guard passed: the reference answer beat each of {len(per)} canaries on at least "
            f"{min_pass_share:.0%} of {n_prompts} held-out prompts"
            + (f" (closest: {detail(worst)})" if worst else ""))


# --------------------------------------------------------------------------------------------------
# Running it

Scorer = Callable[[list, list[str]], list[float]]


def check_reward_model(examples: list[dict], scorer: Scorer, cfg: RMGuardConfig) -> RMGuardResult:
    """Score every example's reference and canaries with `scorer(prompts, texts) -> scores` (one
    call) and decide. `examples` as from `guard_examples` ({prompt, question, reference, other});
    the `other-question` canary is skipped on an example without `other`."""
    if not examples:
        raise ValueError("reward-model guard: no examples")
    prompts, texts, slots = [], [], []  # slot: (example index, canary name or None for the reference)
    first: dict[str, str] = {}
    for i, ex in enumerate(examples):
        prompts.append(ex["prompt"])
        texts.append(ex["reference"])
        slots.append((i, None))
        names = [n for n in cfg.canaries if n != "other-question" or ex.get("other")]
        for name, text in canaries(ex["question"], ex["reference"], ex.get("other") or "", names, cfg.pad_factor,
                                   cfg.loop_repeats, cfg.run_length, cfg.seed):
            prompts.append(ex["prompt"])
            texts.append(text)
            slots.append((i, name))
            first.setdefault(name, text)
    scores = scorer(prompts, texts)
    reference = [0.0] * len(examples)
    by_name: dict[str, list[float | None]] = {n: [None] * len(examples) for n in cfg.canaries}
    for (i, name), s in zip(slots, scores):
        if name is None:
            reference[i] = s
        else:
            by_name[name][i] = s
    return decide(reference, by_name, cfg.min_pass_share, cfg.min_margin, first)


def rm_scorer(rm, tokenizer, batch_size: int = 32, helpfulness_weight: float = 0.0,
              harmlessness_weight: float = 1.0) -> Scorer:
    """A scorer for `check_reward_model` that scores as stage 4 pays: (helpfulness_weight x score of the
    final answer + harmlessness_weight x score of the whole response) / their sum. The defaults score
    the whole response only (as the reward-model stage trains it)."""
    from stages.preference_rl import answer_view  # noqa: PLC0415
    from stages.reward_model import score  # noqa: PLC0415

    total = helpfulness_weight + harmlessness_weight
    if total <= 0:
        helpfulness_weight, harmlessness_weight, total = 0.0, 1.0, 1.0

    def scorer(prompts: list, texts: list[str]) -> list[float]:
        full = score(rm, tokenizer, prompts, texts, batch_size) if harmlessness_weight else [0.0] * len(texts)
        ans = (score(rm, tokenizer, prompts, [answer_view(t) for t in texts], batch_size)
               if helpfulness_weight else [0.0] * len(texts))
        return [(helpfulness_weight * a + harmlessness_weight * f) / total for a, f in zip(ans, full)]

    return scorer


def run_guard(cfg: RMGuardConfig, rm, tokenizer, rows: list[dict], ctx, batch_size: int = 32,
              helpfulness_weight: float = 0.0, harmlessness_weight: float = 1.0, stage: str = "reward-model") -> dict:
    """Run the reward-model guard on held-out rows {prompt, chosen}, publish its `rm-guard` table and
    return its summary (with `action`: "trusted", "zero-weight"). A failure raises UserError when
    `cfg.on_fail` is "stop", else it is published as a warning."""
    examples = guard_examples(rows, cfg.n_prompts)
    if not examples:
        raise UserError(f"{stage}: reward-model guard: no held-out rows with a `chosen` answer to build canaries from")
    result = check_reward_model(examples, rm_scorer(rm, tokenizer, batch_size, helpfulness_weight,
                                                    harmlessness_weight), cfg)
    log.info("%s", result.message)
    ctx.reporter.table("rm-guard", result.table_rows(), description=(
        f"reward-model guard: share of {result.n_prompts} held-out prompts where the reference answer scores above "
        f"each canary (required {cfg.min_pass_share:.0%}); {'passed' if result.passed else 'FAILED'}"))
    summary = {**result.summary(), "action": "trusted" if result.passed else cfg.on_fail}
    if not result.passed:
        if cfg.on_fail == "stop":
            field = "rm_guard" if stage == "preference-rl" else "guard"
            raise UserError(f"{stage}: {result.message}",
                            f"{stage}: {field}.on_fail: stop; improve the reward model (its training data, or "
                            "reward-model `synthetic_negatives`), or set `zero-weight` to go on without trusting it")
        ctx.reporter.warning("rm-guard-failed", result.message + (
            ". The reward model's weights are set to 0 in preference RL." if stage == "preference-rl" else
            ". The version is kept (guard.on_fail: zero-weight); preference-rl checks it again."))
    return summary
