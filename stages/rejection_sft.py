"""Stage 3 `rejection-sft`: rejection sampling from the stage-2 model, then SFT on what was kept.

As in DeepSeek-R1: sample n completions per reasoning prompt from the stage-2 checkpoint (vLLM by
default), reject with rule filters (each rejection keeps its reason), let a judge model decide the
samples the rules cannot settle -- after the judge has rejected known-bad canaries -- keep the best
K per prompt, mix in general (non-reasoning) data, write a versioned dataset with a data card, and
fine-tune the *base* model on it (R1 does; `start_from: reasoning-rl` fine-tunes the stage-2 model).

Writes into ctx.out_dir:
    data/train.jsonl     {prompt, completion, source, prompt_id, reward, num_tokens, judged}
    data/rejected.jsonl  {prompt_id, question, answer, completion, rejected_by, reason}
    data/README.md       the data card (huggingface_hub DatasetCard, template data_cards/rejection_sft.md)
    model/               the fine-tuned checkpoint (safetensors + tokenizer + model card)
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from stages.common import StageConfig, StageContext, UserError, seed_everything, trainer_field
from stages.data import DatasetRef, as_spec
from stages.filters import FilterConfig, apply_filters, funnel
from stages.generation import GenerationConfig
from stages.judge import JudgeConfig, judge_with_guard, question_text
from stages.rewards import RewardsConfig, completion_text, score_completion

log = logging.getLogger(__name__)
CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "data_cards" / "rejection_sft.md"
HIST_BINS = 8


def default_sft_args() -> dict[str, Any]:
    """Stage-1 SFT settings with R1's two epochs for the stage-3 set."""
    from stages.cold_start_sft import default_sft_args as cold_start_args  # noqa: PLC0415

    return {**cold_start_args(), "num_train_epochs": 2}


class Config(StageConfig):
    """Stage 3 settings (`stages.rejection-sft` in flows.yaml)."""

    prompts: DatasetRef = Field(
        "world:rl_prompts",
        description="reasoning prompts to sample from (columns prompt, answer; optional language); "
                    "answer may be empty where no gold answer exists (the judge decides those)")
    general: DatasetRef | None = Field(
        "world:general_sft", description="general (non-reasoning) SFT data mixed in (columns prompt, "
                                         "completion); None for reasoning data only")
    generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(backend="vllm", n=8, temperature=0.8, top_p=0.95),
        description="sampling from the stage-2 model: backend (vllm by default), n samples per prompt, "
                    "temperature, max_new_tokens, ...")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="rule filters and their thresholds")
    judge: JudgeConfig | None = Field(
        default_factory=JudgeConfig,
        description="judge model for samples the rules cannot settle (guarded by canaries); None: rules "
                    "only, such samples are dropped")
    rewards: RewardsConfig = Field(
        default_factory=RewardsConfig, description="rule rewards used to rank the accepted samples of a prompt")
    keep_per_prompt: int = Field(2, ge=1, description="most accepted samples kept per prompt")
    prefer: Literal["reward_then_shortest", "shortest", "random"] = Field(
        "reward_then_shortest",
        description="which accepted samples of a prompt to keep: highest total rule reward, ties broken by "
                    "fewest tokens (reward_then_shortest); fewest tokens; or a seeded random choice")
    general_ratio: float = Field(
        0.33, ge=0, description="general rows mixed in per kept reasoning sample (R1: ~200k per ~600k, 0.33); "
                                "capped by the size of the general dataset")
    start_from: Literal["base", "reasoning-rl"] = Field(
        "base", description="model fine-tuned on the assembled set: the pipeline's base model (as R1) or the "
                            "stage-2 checkpoint")
    show_samples: int = Field(6, ge=0, description="accepted and rejected samples shown in the report")
    trainer: dict[str, Any] = Field(
        default_factory=default_sft_args,
        description="arguments passed through to trl.SFTConfig (output_dir, seed and use_cpu are set by "
                    "r1flow; report_to: none unless set)")

    _check_trainer = trainer_field("SFTConfig")


# --------------------------------------------------------------------------------------------------
# Pure steps (unit-tested)

def select_best(results: list[dict], k: int, prefer: str, seed: int = 0) -> list[dict]:
    """At most `k` accepted samples (`rejected_by` None) per prompt, in prompt order, by preference."""
    rng = random.Random(seed)
    by_prompt: dict[Any, list[dict]] = {}
    for r in results:
        if r["rejected_by"] is None:
            by_prompt.setdefault(r["prompt_id"], []).append(r)
    kept = []
    for pid, group in by_prompt.items():
        if prefer == "random":
            group = rng.sample(group, len(group))
        elif prefer == "shortest":
            group = sorted(group, key=lambda r: r["num_tokens"])
        else:
            group = sorted(group, key=lambda r: (-r["reward"], r["num_tokens"]))
        kept.extend(group[:k])
    return kept


def length_histogram(lengths: list[int], bins: int = HIST_BINS) -> list[dict]:
    """Equal-width bins over [min, max]: rows {bin: "lo-hi", count}."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((n - lo) // width for n in lengths)
    return [{"bin": f"{lo + i * width}-{lo + (i + 1) * width - 1}", "count": counts.get(i, 0)}
            for i in range((hi - lo) // width + 1)]


def judge_funnel_rows(base: list[dict], n_judged: int, n_judge_rejected: int, n_kept: int) -> list[dict]:
    """The rule funnel followed by the judge step and the keep-best-K step."""
    rows = [dict(r) for r in base]
    remaining = rows[-1]["remaining"]
    rows.append({"step": f"judge ({n_judged} judged)", "remaining": remaining - n_judge_rejected,
                 "rejected": n_judge_rejected})
    remaining -= n_judge_rejected
    rows.append({"step": "kept (best per prompt)", "remaining": n_kept, "rejected": remaining - n_kept})
    return rows


def _item(r: dict) -> dict:
    return {"question": question_text(r["prompt"]), "reference": r.get("answer") or "",
            "response": completion_text(r["completion"])}


# --------------------------------------------------------------------------------------------------

def generate_shard(job: dict, progress: Callable[[float], None] | None = None) -> list[list[dict]]:
    """One shard of the sampling: plain data in (`model`, `prompts`, `generation`, `first_index`,
    `trust_remote_code`), records out, so it runs wherever the pipeline puts it (in this process, or a Ray
    worker). Samples are seeded by prompt position: 2 shards give exactly the samples of 1 (transformers)."""
    from stages.generation import GenerationConfig, generate  # noqa: PLC0415

    return generate(job["model"], job["prompts"], GenerationConfig(**job["generation"]), progress=progress,
                    trust_remote_code=job["trust_remote_code"], first_index=job["first_index"])


def _generate_samples(cfg: Config, ctx: StageContext, policy: str, prompts_ds) -> tuple[list[dict], dict]:
    """n samples per prompt from the stage-2 model, one dict per sample; plus throughput stats. The prompts are
    cut into `ctx.shards` shards on batch boundaries, run by `ctx.map_shards` and merged in prompt order."""
    from stages.generation import shard_bounds  # noqa: PLC0415

    prompts = list(prompts_ds["prompt"])
    answers = list(prompts_ds["answer"])
    languages = list(prompts_ds["language"]) if "language" in prompts_ds.column_names else [None] * len(prompts)
    gen = cfg.generation.model_copy(update={"seed": cfg.generation.seed + ctx.seed})
    trust = bool(getattr(ctx.pipeline, "trust_remote_code", False))
    bounds = shard_bounds(len(prompts), gen.batch_size, ctx.shards)
    jobs = [{"model": policy, "prompts": prompts[a:b], "generation": gen.model_dump(mode="json"), "first_index": a,
             "trust_remote_code": trust} for a, b in bounds]
    t0 = time.time()
    shard_outputs = ctx.map_shards(
        generate_shard, jobs,
        progress=lambda f: ctx.reporter.progress(0.5 * f, f"generating: {f:.0%} of {len(prompts)} prompts"
                                                           + (f" in {len(jobs)} shards" if len(jobs) > 1 else "")))
    outputs = [records for shard in shard_outputs for records in shard]
    if len(outputs) != len(prompts):
        raise RuntimeError(f"sharded generation returned {len(outputs)} prompts' samples for {len(prompts)} prompts")
    seconds = time.time() - t0
    samples = []
    for pid, (prompt, answer, language, records) in enumerate(zip(prompts, answers, languages, outputs)):
        for j, rec in enumerate(records):
            samples.append({"prompt_id": pid, "sample": j, "prompt": prompt,
                            "answer": None if answer in (None, "") else answer,
                            "language": language, "completion": rec["text"], "num_tokens": rec["num_tokens"],
                            "finish_reason": rec["finish_reason"]})
    n_tokens = sum(s["num_tokens"] for s in samples)
    log.info("generated %d samples (%d tokens) in %.1f s: %.0f tok/s", len(samples), n_tokens, seconds,
             n_tokens / max(seconds, 1e-9))
    return samples, {"backend": gen.backend, "seconds": round(seconds, 1), "tokens": n_tokens, "shards": len(jobs),
                     "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1)}


def _apply_judge(cfg: Config, ctx: StageContext, results: list[dict], prompts_ds) -> dict:
    """Judge the samples the rules could not settle (after the guard); updates `results` in place and
    returns judge stats. A cross-check sample of rule-decided samples measures judge/rule agreement."""
    need = [r for r in results if r["needs_judge"]]
    stats: dict[str, Any] = {"needs_judge": len(need), "judged": 0, "accepted": 0, "rejected": 0,
                             "no_verdict": 0, "guard": None, "cross_checked": 0, "agreement": None}
    if cfg.judge is None:
        for r in need:
            r["rejected_by"], r["reason"] = "judge", "no judge configured: rules could not settle it"
        stats["mode"] = "rules-only (no judge)"
        return stats
    rng = random.Random(ctx.seed)
    decided = [r for r in results if r["correct"] is not None and r["rejected_by"] in (None, "correct", "duplicate")]
    cross = rng.sample(decided, min(cfg.judge.cross_check, len(decided)))
    # The guard runs whenever a judge is configured, even when the rules settled every sample: its outcome is
    # part of the dataset's record (a judge that would have been trusted blindly is worth knowing about).
    examples = [{"question": question_text(p), "reference": a}
                for p, a in zip(prompts_ds["prompt"], prompts_ds["answer"]) if a not in (None, "")]
    if not examples:
        raise UserError(f"rejection-sft.prompts: the judge guard needs prompts with reference answers "
                        f"(column `answer`); none of the {len(prompts_ds)} prompts has one")
    examples = examples[: cfg.judge.guard_examples]
    model = ctx.resolve_model(cfg.judge.model)
    guard, verdicts = judge_with_guard(
        cfg.judge, examples, [_item(r) for r in need + cross], model, seed=ctx.seed,
        trust_remote_code=bool(getattr(ctx.pipeline, "trust_remote_code", False)),
        progress=lambda f: ctx.reporter.progress(0.5 + 0.05 * f, "judging"), map_shards=ctx.map_shards,
        shards=ctx.shards)
    stats["guard"] = {"passed": guard.passed, "accept_share": round(guard.accept_share, 3),
                      "accepted_by_canary": guard.accepted_by_canary, "message": guard.message}
    stats["guard_rows"] = guard.rows
    ctx.reporter.table("judge-canaries", guard.rows, description=guard.message)
    if not guard.passed:
        if cfg.judge.on_guard_fail == "stop":
            raise UserError(f"rejection-sft.judge.model {cfg.judge.model!r}: {guard.message}",
                            "set judge.on_guard_fail: rules-only to continue without the judge")
        ctx.reporter.warning("judge-guard", f"{guard.message}. Continuing rules-only: the {len(need)} samples "
                                            f"the rules could not settle are dropped.")
        for r in need:
            r["rejected_by"], r["reason"] = "judge", "judge failed its canary guard (rules-only)"
        stats["mode"] = "rules-only (guard failed)"
        return stats
    stats["mode"] = "judge" if need else "judge (guard passed; the rules settled every sample)"
    for r, v in zip(need, verdicts[: len(need)]):
        r["judged"], r["judge_verdict"] = True, v
        if v is True:
            r["reason"] = "judge: correct"
        else:
            r["rejected_by"] = "judge"
            r["reason"] = "judge: incorrect" if v is False else "judge gave no verdict"
    stats.update(judged=len(need), accepted=sum(v is True for v in verdicts[: len(need)]),
                 rejected=sum(v is False for v in verdicts[: len(need)]),
                 no_verdict=sum(v is None for v in verdicts[: len(need)]))
    cross_verdicts = verdicts[len(need):]
    both = [(v, r["correct"]) for r, v in zip(cross, cross_verdicts) if v is not None]
    stats.update(cross_checked=len(cross), cross_no_verdict=sum(v is None for v in cross_verdicts),
                 agreement=round(sum(v == c for v, c in both) / len(both), 4) if both else None,
                 agreement_n=len(both),
                 judge_accepts_rule_wrong=sum(v is True and c is False for v, c in both),
                 judge_rejects_rule_correct=sum(v is False and c is True for v, c in both))
    return stats


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows), encoding="utf-8")


def _md_rows(rows: list[dict], keys: list[str]) -> str:
    return "\n".join("| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows)


def _label(ref) -> str:
    return as_spec(ref).path if ref is not None else "none"


def write_card(path: Path, cfg: Config, ctx: StageContext, info: dict) -> None:
    """Render data_cards/rejection_sft.md into `path` (a huggingface_hub DatasetCard); the numbers are
    also in the card's YAML metadata under `r1flow`."""
    from huggingface_hub import DatasetCard, DatasetCardData  # noqa: PLC0415

    n = info["n_train"]
    size = "n<1K" if n < 1000 else "1K<n<10K" if n < 10000 else "10K<n<100K" if n < 100000 else "100K<n<1M"
    meta = {k: info[k] for k in ("n_train", "n_reasoning", "n_general", "n_rejected", "n_generated", "funnel",
                                 "kept_correct_share", "length_histogram")}
    meta["judge"] = {k: v for k, v in info["judge"].items() if k != "guard_rows"}
    meta["sources"] = dict(ctx.parents)
    data = DatasetCardData(language=["en"], license="apache-2.0", size_categories=[size],
                           task_categories=["text-generation"], pretty_name="r1flow rejection-sampled SFT data",
                           tags=["r1flow", "rejection-sampling", "deepseek-r1-recipe"], r1flow=meta)
    judge = info["judge"]
    if judge.get("guard"):
        g = judge["guard"]
        judge_summary = f"{judge['mode']}; {g['message']}."
        agreement = ("n/a" if judge.get("agreement") is None else
                     f"{judge['agreement']:.1%} on {judge['agreement_n']} rule-decided samples")
        judge_section = (f"Model `{cfg.judge.model}`. Guard: {g['message']}.\n\n"
                         f"Samples the rules could not settle: {judge['needs_judge']}; judged "
                         f"{judge['judged']}: {judge['accepted']} accepted, {judge['rejected']} rejected, "
                         f"{judge['no_verdict']} without a verdict.\n\n"
                         f"Agreement with the rules where both decided: {agreement} "
                         f"(judge accepted {judge.get('judge_accepts_rule_wrong', 0)} rule-wrong samples, "
                         f"rejected {judge.get('judge_rejects_rule_correct', 0)} rule-correct ones).")
    else:
        judge_summary = judge["mode"] + "."
        judge_section = f"Judge: {judge['mode']} ({judge['needs_judge']} samples needed it)."
    hist = info["length_histogram"]
    top = max((h["count"] for h in hist), default=1) or 1
    kc = info["kept_correct_share"]
    card = DatasetCard.from_template(
        data, template_path=str(CARD_TEMPLATE), version_id=ctx.version_id or "unregistered",
        n_prompts=info["n_prompts"], prompts_source=_label(cfg.prompts), n_per_prompt=cfg.generation.n,
        policy_version=ctx.parents.get("reasoning-rl", "?"), backend=cfg.generation.backend,
        temperature=cfg.generation.temperature, filter_order=", ".join(cfg.filters.order),
        judge_summary=judge_summary, keep_per_prompt=cfg.keep_per_prompt, prefer=cfg.prefer,
        n_general=info["n_general"], general_source=_label(cfg.general), general_ratio=cfg.general_ratio,
        n_reasoning=info["n_reasoning"], n_train=n, n_rejected=info["n_rejected"],
        funnel_rows=_md_rows(info["funnel"], ["step", "remaining", "rejected"]),
        kept_correct="n/a" if kc is None else f"{kc:.1%} of {info['kept_rule_decided']} rule-decidable samples",
        judge_section=judge_section,
        histogram_rows="\n".join(f"| {h['bin']} | {h['count']} | {'#' * round(20 * h['count'] / top)} |" for h in hist),
        source_rows="\n".join(f"| {k} | `{v}` |" for k, v in ctx.parents.items()) or "| - | - |",
        example=json.dumps(info["example"], ensure_ascii=False) if info["example"] else "")
    card.save(path)


def _sample_rows(rows: list[dict], n: int) -> list[dict]:
    return [{"prompt_id": r["prompt_id"], "question": question_text(r["prompt"])[:80], "answer": r.get("answer"),
             "completion": completion_text(r["completion"])[:300], "filter": r["rejected_by"] or "kept",
             "reason": r["reason"]} for r in rows[:n]]


def run(cfg: Config, ctx: StageContext) -> dict:
    """Generate -> filter -> judge -> keep best K -> mix general data -> write the dataset + card -> SFT."""
    t0 = time.time()
    seed_everything(ctx.seed)
    if "reasoning-rl" not in ctx.inputs:
        raise UserError("rejection-sft: needs a reasoning-rl version to sample from (enable `reasoning-rl`)")
    policy = Path(ctx.inputs["reasoning-rl"]) / "model"
    if not (policy / "config.json").is_file():
        raise UserError(f"rejection-sft: expected the stage-2 checkpoint at {policy} (config.json missing)")
    prompts_ds = ctx.resolve_dataset(cfg.prompts, required_columns=("prompt", "answer"))
    # loaded before hours of generation and judging, so that a missing dataset or column fails now
    general = (ctx.resolve_dataset(cfg.general, required_columns=("prompt", "completion"))
               if cfg.general is not None else None)
    data_dir = Path(ctx.out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)

    # 1. generate, 2. rule filters, 3. judge
    samples, gen_stats = _generate_samples(cfg, ctx, str(policy), prompts_ds)
    results = apply_filters(samples, cfg.filters)
    for r in results:
        r["judged"], r["judge_verdict"] = False, None
    rule_funnel = funnel(results, order=cfg.filters.order)
    judge_stats = _apply_judge(cfg, ctx, results, prompts_ds)

    # 4. keep the best K per prompt
    for r in results:
        if r["rejected_by"] is None:
            scores = score_completion(r["completion"], cfg.rewards, answer=r["answer"], language=r["language"],
                                      num_tokens=r["num_tokens"])
            r["reward"] = round(scores["total"], 4)
    kept = select_best(results, cfg.keep_per_prompt, cfg.prefer, ctx.seed)
    kept_ids = {id(r) for r in kept}
    for r in results:
        if r["rejected_by"] is None and id(r) not in kept_ids:
            r["rejected_by"], r["reason"] = "keep-best", f"not among the best {cfg.keep_per_prompt} of its prompt ({cfg.prefer})"
    rule_decided = [r for r in kept if r["correct"] is not None]
    kept_correct = sum(r["correct"] is True for r in rule_decided) / len(rule_decided) if rule_decided else None
    n_judge_rejected = sum(r["rejected_by"] == "judge" for r in results)
    full_funnel = judge_funnel_rows(rule_funnel, judge_stats["judged"], n_judge_rejected, len(kept))

    # 5. mix general data and write the dataset
    train = [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": completion_text(r["completion"])}],
              "source": "reasoning", "prompt_id": r["prompt_id"], "reward": r["reward"], "num_tokens": r["num_tokens"],
              "judged": r["judged"]} for r in kept]
    n_general = 0
    nothing_kept = (f"no sample survived the filters ({len(results)} generated; funnel: "
                    + ", ".join(f"{r['step']} -{r['rejected']}" for r in full_funnel[1:]) + ")")
    if not kept and not ctx.rehearsal:
        raise UserError(f"rejection-sft: {nothing_kept}")
    if not kept:  # a rehearsal checks the mechanics: a two-step stage 2 writes nothing worth keeping
        log.warning("rehearsal: %s; fine-tuning on general rows only", nothing_kept)
        ctx.reporter.warning("rehearsal", f"Rehearsal: {nothing_kept}. The SFT step runs on general rows only.")
    if general is not None and (train or ctx.rehearsal):
        n_general = min(len(general), round(cfg.general_ratio * len(train)) if train else 8)
        picks = random.Random(ctx.seed).sample(range(len(general)), n_general)
        train += [{"prompt": general[i]["prompt"], "completion": general[i]["completion"], "source": "general",
                   "prompt_id": None, "reward": None, "num_tokens": None, "judged": None} for i in picks]
    if not train:
        raise UserError(f"rejection-sft: {nothing_kept}, and no general rows to train on")
    random.Random(ctx.seed).shuffle(train)
    rejected = [{"prompt_id": r["prompt_id"], "sample": r["sample"], "question": question_text(r["prompt"]),
                 "answer": r["answer"], "completion": completion_text(r["completion"]),
                 "rejected_by": r["rejected_by"], "reason": r["reason"]} for r in results if id(r) not in kept_ids]
    _write_jsonl(data_dir / "train.jsonl", train)
    _write_jsonl(data_dir / "rejected.jsonl", rejected)
    info = {"n_prompts": len(prompts_ds), "n_generated": len(results), "n_reasoning": len(kept),
            "n_general": n_general, "n_train": len(train), "n_rejected": len(rejected), "funnel": full_funnel,
            "kept_correct_share": None if kept_correct is None else round(kept_correct, 4),
            "kept_rule_decided": len(rule_decided), "kept_judged": sum(r["judged"] for r in kept),
            "length_histogram": length_histogram([r["num_tokens"] for r in kept]), "judge": judge_stats,
            "example": next((t for t in train if t["source"] == "reasoning"), None)}
    write_card(data_dir / "README.md", cfg, ctx, info)
    _report(cfg, ctx, info, results, kept)

    # 6. SFT on the assembled set
    start = ctx.resolve_model(getattr(ctx.pipeline, "base_model", None) or "world:base_model") \
        if cfg.start_from == "base" else str(policy)
    sft = train_sft(cfg, ctx, start, data_dir / "train.jsonl")
    metrics = {k: v for k, v in info.items() if k not in ("example",)}
    metrics["judge"] = {k: v for k, v in judge_stats.items() if k != "guard_rows"}
    metrics["generation"] = gen_stats
    metrics["rejected_by"] = dict(Counter(r["rejected_by"] for r in rejected))
    metrics["start_from"] = cfg.start_from
    metrics["sft"] = sft
    metrics["runtime_s"] = round(time.time() - t0, 1)
    ctx.reporter.progress(1.0, "rejection-sft done")
    return metrics


def _report(cfg: Config, ctx: StageContext, info: dict, results: list[dict], kept: list[dict]) -> None:
    rep = ctx.reporter
    rep.table("funnel", info["funnel"], description="rejection funnel: generated -> each rule filter -> judge -> kept")
    rep.table("accepted-samples", _sample_rows(kept, cfg.show_samples), description="kept reasoning samples")
    rejected = [r for r in results if r["rejected_by"] not in (None, "keep-best")]
    first: dict[str, dict] = {}
    for r in rejected:  # one sample per filter first, then the rest
        first.setdefault(r["rejected_by"], r)
    shown_ids = {id(r) for r in first.values()}
    shown = list(first.values()) + [r for r in rejected if id(r) not in shown_ids]
    rep.table("rejected-samples", _sample_rows(shown, cfg.show_samples), description="rejected samples and why")
    # The card's text, not a link: the folder is a staging folder until the version is registered.
    from huggingface_hub import DatasetCard  # noqa: PLC0415

    rep.markdown("data-card", DatasetCard.load(Path(ctx.out_dir) / "data" / "README.md").text,
                 description="stage-3 dataset card (data/README.md in the version folder)")
    kc = info["kept_correct_share"]
    rep.markdown("dataset", f"**{info['n_train']}** training rows: {info['n_reasoning']} kept reasoning samples "
                            f"+ {info['n_general']} general; {info['n_rejected']} rejected of {info['n_generated']} "
                            f"generated. Kept correct by the rule verifier: "
                            f"{'n/a' if kc is None else f'{kc:.1%}'}. Judge: {info['judge']['mode']}.")


def train_sft(cfg: Config, ctx: StageContext, start: str, train_file: Path) -> dict:
    """SFT of `start` on the assembled set with TRL's SFTTrainer, through stage 1's helpers."""
    import datasets  # noqa: PLC0415
    from trl import SFTConfig, SFTTrainer  # noqa: PLC0415

    from stages.models import final_loss, last_checkpoint, load_policy, progress_callback, release_memory, save_model  # noqa: PLC0415

    t0 = time.time()
    ds = datasets.load_dataset("json", data_files=str(train_file), split="train").select_columns(["prompt", "completion"])
    model, tok = load_policy(start, bool(getattr(ctx.pipeline, "trust_remote_code", False)))
    trainer_dir = Path(ctx.work_dir) / "trainer"
    args = SFTConfig(output_dir=str(trainer_dir), seed=ctx.seed, use_cpu=ctx.device == "cpu",
                     **{"save_strategy": "steps", "report_to": "none", **cfg.trainer})
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[progress_callback(_Offset(ctx.reporter, 0.6, 0.4), "rejection-sft SFT")])
    ctx.keep_tracker_logs(trainer)
    result = trainer.train(resume_from_checkpoint=last_checkpoint(ctx, trainer_dir))
    history = [dict(h) for h in trainer.state.log_history]
    metrics = {"train_loss": round(result.training_loss, 4), "final_loss": final_loss(history),
               "global_step": trainer.state.global_step, "num_examples": len(ds), "runtime_s": round(time.time() - t0, 1),
               "history": history}
    save_model(trainer, tok, ctx, "rejection-sft", f"{ctx.version_id or 'this version'}/data/train.jsonl",
               start if cfg.start_from == "reasoning-rl" else (getattr(ctx.pipeline, "base_model", None) or start), metrics)
    del trainer, model
    release_memory()
    return metrics


class _Offset:
    """A reporter view mapping progress [0, 1] onto [start, start + span] of the stage."""

    def __init__(self, reporter, start: float, span: float):
        self.reporter, self.start, self.span = reporter, start, span

    def progress(self, fraction: float, message: str = "") -> None:
        self.reporter.progress(self.start + self.span * fraction, message)
