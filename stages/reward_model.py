"""Stage `reward-model`: train a sequence-classification reward model on preference pairs.

A sub-step of stage 4 whose output is its own version: when `flows.yaml` names no reward model for
`preference-rl`, this stage trains one with TRL's `RewardTrainer` (Bradley-Terry loss on
{prompt, chosen, rejected}) from a causal LM (`AutoModelForSequenceClassification`, one label) and
writes it to `<version>/model` (safetensors + tokenizer). A held-out share of the pairs is never
trained on; the stage reports the pairwise accuracy there (chosen scored above rejected), writes those
pairs to `<version>/heldout_pairs.jsonl`, and runs the reward-model guard (`stages/rm_guard.py`) on them:
canaries (loops, punctuation and newline runs, padding, another question's answer, gibberish) must
score below the held-out chosen answer. A failing guard stops the stage (`guard.on_fail: stop`) or is
recorded in the metrics with a warning (`zero-weight`; preference-rl runs the guard again).

    rm, tok = load_reward_model("runs/tiny/reward-model-.../model", "cpu")
    score(rm, tok, prompts=[[{"role": "user", "content": "Hi"}]], responses=["Hello!"])  # -> [1.7]
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pydantic import Field

from stages.common import StageConfig, StageContext, UserError, seed_everything, trainer_field
from stages.data import DatasetRef, as_spec
from stages.rm_guard import RMGuardConfig

log = logging.getLogger(__name__)

# Trainer settings r1flow uses unless `trainer:` overrides them (sized for the tiny world on CPU).
TRAINER_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 2,
    "per_device_train_batch_size": 16,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 5,
    "logging_steps": 10,
    "max_length": 384,
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 1,
    "gradient_checkpointing": False,
    "bf16": False,
}


class Config(StageConfig):
    """Settings of the `reward-model` stage (`stages: reward-model:` in flows.yaml)."""

    dataset: DatasetRef = Field(
        "world:preference",
        description="preference pairs with `prompt`, `chosen`, `rejected` (conversations or plain text)")
    model: str = Field(
        "world:base_model",
        description="causal LM (or sequence classifier) the reward model starts from: `world:NAME`, a local "
                    "folder or a hub id; a one-output score head is added")
    heldout_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of the pairs held out of training to measure pairwise accuracy")
    score_batch_size: int = Field(32, ge=1, description="batch size when scoring held-out pairs")
    synthetic_negatives: float = Field(
        0.0, ge=0, le=4,
        description="add this many synthetic pairs per training pair: a training pair's chosen answer against a "
                    "degenerate copy of it (a phrase loop, a punctuation or newline run, filler padding, gibberish) "
                    "or against the chosen answer of another training prompt (`stages.rm_guard.synthetic_pairs`; "
                    "training split only, other random draws than the guard's). The guard then checks these "
                    "kinds on held-out prompts; it cannot vouch for kinds of text nobody thought of")
    guard: RMGuardConfig = Field(
        default_factory=RMGuardConfig,
        description="reward-model guard run on the trained model with canaries built from the held-out pairs "
                    "(`dataset` is ignored here: the held-out split is used)")
    trainer: dict[str, Any] = Field(
        default_factory=dict,
        description="trl.RewardConfig fields, merged over TRAINER_DEFAULTS (output_dir, seed and use_cpu "
                    "are set by r1flow; report_to: none unless set)")

    _check_trainer = trainer_field("RewardConfig", run_defaults=TRAINER_DEFAULTS)


def _to_message(response: Any) -> list[dict]:
    """A response as a one-message assistant turn (strings and message lists both accepted)."""
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    if isinstance(response, dict):
        return [response]
    return list(response)


def _to_prompt(prompt: Any) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def load_reward_model(ref_or_path: str, device: str = "cpu", trust_remote_code: bool = False,
                      dtype: str = "float32"):
    """Load a sequence-classification reward model and its tokenizer (pad token set, eval mode) in `dtype`.
    `ref_or_path` is a local folder or a hub id; a missing folder or a model without exactly one
    output raises UserError."""
    from pathlib import Path  # noqa: PLC0415

    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: PLC0415

    path = Path(ref_or_path).expanduser()
    if ref_or_path.startswith((".", "/", "~")) and not (path / "config.json").is_file():
        raise UserError(f"reward model {ref_or_path!r}: no model folder (config.json) at {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            ref_or_path, trust_remote_code=trust_remote_code, dtype=dtype, use_safetensors=True)
    except OSError as exc:
        raise UserError(f"reward model {ref_or_path!r}: could not be loaded ({str(exc).splitlines()[0][:200]})") from exc
    if model.config.num_labels != 1:
        raise UserError(f"reward model {ref_or_path!r}: expected a sequence classifier with one output "
                        f"(num_labels=1), got {model.config.num_labels}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def score(rm, tokenizer, prompts: list, responses: list, batch_size: int = 32, max_length: int = 1024) -> list[float]:
    """Reward-model scores of (prompt, response) pairs, formatted exactly as TRL's RewardTrainer and
    GRPOTrainer do (chat template over prompt + assistant response). Prompts are conversations or
    strings; responses strings or assistant messages."""
    import torch  # noqa: PLC0415

    if len(prompts) != len(responses):
        raise ValueError(f"score: {len(prompts)} prompts for {len(responses)} responses")
    texts = [tokenizer.apply_chat_template(_to_prompt(p) + _to_message(r), tokenize=False)
             for p, r in zip(prompts, responses)]
    out: list[float] = []
    device = next(rm.parameters()).device
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, padding_side="right",
                          truncation=True, max_length=max_length, add_special_tokens=False).to(device)
        with torch.inference_mode():
            out.extend(rm(**batch).logits[:, 0].float().tolist())
    return out


def pairwise_accuracy(rm, tokenizer, pairs, batch_size: int = 32) -> dict[str, Any]:
    """Share of pairs whose chosen response scores above the rejected one, overall and (when the
    pairs have a `rejected_kind` column) per kind; plus the mean margin."""
    chosen = score(rm, tokenizer, pairs["prompt"], pairs["chosen"], batch_size)
    rejected = score(rm, tokenizer, pairs["prompt"], pairs["rejected"], batch_size)
    wins = [c > r for c, r in zip(chosen, rejected)]
    result: dict[str, Any] = {
        "pairwise_accuracy": sum(wins) / max(len(wins), 1),
        "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / max(len(wins), 1),
        "n_pairs": len(wins),
    }
    if "rejected_kind" in pairs.column_names:
        by_kind: dict[str, list[bool]] = {}
        for kind, win in zip(pairs["rejected_kind"], wins):
            by_kind.setdefault(kind, []).append(win)
        result["by_kind"] = {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())}
    return result


def length_balance(pairs) -> dict[str, Any]:
    """How the lengths (characters) of chosen and rejected responses compare, overall and per
    `rejected_kind` when pairs have one: mean lengths and the share of pairs whose chosen response is
    the longer one. Far from 0.5, the pairs can teach a reward model length instead of quality."""
    from stages.rewards import completion_text  # noqa: PLC0415

    rows = list(pairs)

    def stats(sub: list) -> dict[str, Any]:
        c = [len(completion_text(r["chosen"])) for r in sub]
        j = [len(completion_text(r["rejected"])) for r in sub]
        n = max(len(sub), 1)
        return {"pairs": len(sub), "mean_chosen_chars": round(sum(c) / n, 1), "mean_rejected_chars": round(sum(j) / n, 1),
                "chosen_longer_share": round(sum(a > b for a, b in zip(c, j)) / n, 4)}

    out = {"all": stats(rows)}
    if rows and "rejected_kind" in rows[0]:
        for kind in sorted({r["rejected_kind"] for r in rows}):
            out[kind] = stats([r for r in rows if r["rejected_kind"] == kind])
    return out


def length_balance_markdown(balance: dict[str, Any]) -> str:
    """`length_balance` as a Markdown table (for data cards)."""
    lines = ["| pairs | n | mean chosen chars | mean rejected chars | chosen longer |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['pairs']} | {v['mean_chosen_chars']} | {v['mean_rejected_chars']} | "
              f"{v['chosen_longer_share']:.0%} |" for k, v in balance.items()]
    return "\n".join(lines)


def run(cfg: Config, ctx: StageContext) -> dict:
    """Train the reward model into ctx.out_dir/model; return held-out pairwise accuracy and the log."""
    import trl  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    t0 = time.time()
    seed_everything(ctx.seed)
    pairs = ctx.resolve_dataset(cfg.dataset, required_columns=("prompt", "chosen", "rejected"))
    if len(pairs) < 4:
        raise UserError(f"reward-model.dataset {as_spec(cfg.dataset).path!r}: {len(pairs)} preference pairs, need at least 4")
    split = pairs.train_test_split(test_size=cfg.heldout_fraction, seed=ctx.seed)
    train, heldout = split["train"], split["test"]
    model_ref = ctx.resolve_model(cfg.model)
    trust = bool(getattr(ctx.pipeline, "trust_remote_code", False))
    tokenizer = AutoTokenizer.from_pretrained(model_ref, trust_remote_code=trust)
    tokenizer.padding_side = "right"

    trainer_dir = ctx.work_dir / "trainer"
    args = trl.RewardConfig(
        output_dir=str(trainer_dir), seed=ctx.seed, use_cpu=ctx.device == "cpu",
        trust_remote_code=trust, **{"report_to": "none", **TRAINER_DEFAULTS, **cfg.trainer})
    keep = [c for c in ("prompt", "chosen", "rejected", "margin") if c in train.column_names]
    train_set = train.select_columns(keep)
    n_synthetic = 0
    if cfg.synthetic_negatives > 0:
        import datasets  # noqa: PLC0415

        from stages.rm_guard import synthetic_pairs  # noqa: PLC0415

        synth = synthetic_pairs(list(train), cfg.synthetic_negatives, ctx.seed)
        n_synthetic = len(synth)
        if synth:
            if isinstance(train[0]["chosen"], str):  # plain-text pairs: synthetic ones in the same form
                synth = [{**p, "chosen": p["chosen"][0]["content"], "rejected": p["rejected"][0]["content"]}
                         for p in synth]
            rows = list(train_set) + [{k: p.get(k, 0.0) for k in keep} for p in synth]
            train_set = datasets.Dataset.from_list(rows).shuffle(seed=ctx.seed)
    trainer = trl.RewardTrainer(model=model_ref, args=args, train_dataset=train_set, processing_class=tokenizer)
    ctx.reporter.progress(0.05, f"training reward model on {len(train_set)} pairs ({n_synthetic} synthetic)")
    ctx.keep_tracker_logs(trainer)
    trainer.train(resume_from_checkpoint=ctx.last_checkpoint(trainer_dir))

    out = ctx.out_dir / "model"
    trainer.model.config.pad_token_id = tokenizer.pad_token_id
    trainer.save_model(str(out))  # safetensors (transformers default) + tokenizer
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; the version's manifest keeps the config
    balance = length_balance(train)
    ctx.reporter.table("length-balance", [{"pairs": k, **v} for k, v in balance.items()],
                       description="training pairs: do chosen answers tend to be longer? (0.5 = balanced; far from "
                                   "it, a reward model can learn length instead of quality)")
    ctx.reporter.progress(0.9, "scoring held-out pairs")
    rm, rm_tok = load_reward_model(str(out), ctx.device, trust)
    held = pairwise_accuracy(rm, rm_tok, heldout, cfg.score_batch_size)
    log.info("reward model: held-out pairwise accuracy %.3f on %d pairs", held["pairwise_accuracy"], held["n_pairs"])
    metrics = {
        "heldout_pairwise_accuracy": round(held["pairwise_accuracy"], 4),
        "heldout_mean_margin": round(held["mean_margin"], 4),
        "heldout_accuracy_by_kind": held.get("by_kind", {}),
        "length_balance": balance,
        "n_train_pairs": len(train), "n_synthetic_pairs": n_synthetic, "n_heldout_pairs": len(heldout),
        "train_loss": trainer.state.log_history[-1].get("train_loss") if trainer.state.log_history else None,
        "history": [row for row in trainer.state.log_history if "loss" in row],
        "runtime_s": round(time.time() - t0, 1),
    }
    ctx.reporter.table("rm-heldout", [{"rejected_kind": k, "pairwise_accuracy": v}
                                      for k, v in held.get("by_kind", {}).items()]
                       + [{"rejected_kind": "all", "pairwise_accuracy": round(held["pairwise_accuracy"], 4)}],
                       description="reward model: share of held-out pairs where chosen scores above rejected")
    (ctx.out_dir / "heldout_pairs.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in heldout), encoding="utf-8")
    if cfg.guard.enabled:
        from stages.rm_guard import run_guard  # noqa: PLC0415

        ctx.reporter.progress(0.95, "reward-model guard: scoring canaries")
        metrics["rm_guard"] = run_guard(cfg.guard, rm, rm_tok, list(heldout), ctx, cfg.score_batch_size)
        metrics["summary"] = {"rm_guard": "passed" if metrics["rm_guard"]["passed"] else "FAILED"}
    ctx.reporter.progress(1.0, "reward model trained")
    return metrics
