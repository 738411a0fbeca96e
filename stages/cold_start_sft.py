"""Stage 1 `cold-start`: supervised fine-tuning on long chain-of-thought examples with TRL's SFTTrainer,
so the model answers as `<think>reasoning</think><answer>final</answer>`.

The dataset is conversational prompt/completion; TRL applies the chat template and computes the loss
on the assistant completion only (`completion_only_loss`). A killed run resumes from the newest
checkpoint in `ctx.work_dir / "trainer"`. Model loading and saving live in `stages.models`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from stages.common import StageConfig, StageContext, UserError, trainer_field
from stages.data import DatasetRef
from stages.models import final_loss, last_checkpoint, load_policy, progress_callback, release_memory, save_model

log = logging.getLogger(__name__)


def default_sft_args() -> dict[str, Any]:
    """The tiny world's SFT settings: a deliberately light cold start. On the tiny world the model
    learns the format within ~50 steps and the digit copying in a sharp transition between steps ~250
    and ~380; 320 constant-lr steps stop inside it (held-out pass@1 about 0.13, greedy 0.16), leaving
    room for RL. 376 cosine steps (8 epochs) reach pass@1 about 0.8."""
    return {
        "learning_rate": 3e-3,
        "per_device_train_batch_size": 32,
        "max_steps": 320,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 10,
        "weight_decay": 0.0,
        "max_length": 256,
        "logging_steps": 10,
        "save_steps": 40,
        "save_total_limit": 2,
    }


class Config(StageConfig):
    """Stage 1 settings (`stages.cold-start` in flows.yaml)."""

    model: str | None = Field(None, description="model to fine-tune: `world:base_model`, a local path or a hub id; "
                                                "None uses the pipeline's base model")
    dataset: DatasetRef = Field("world:cold_start", description="conversational prompt/completion data "
                                                                "(columns prompt, completion)")
    max_examples: int | None = Field(None, gt=0, description="use only the first N examples (None: all)")
    trainer: dict[str, Any] = Field(default_factory=default_sft_args,
                                    description="arguments passed through to trl.SFTConfig (output_dir, seed "
                                                "and use_cpu are set by r1flow; report_to: none unless set)")
    trust_remote_code: bool = Field(False, description="allow custom model code from the hub (off: safer)")

    _check_trainer = trainer_field("SFTConfig")


# ----------------------------------------------------------------------------- stage


def run(cfg: Config, ctx: StageContext, callbacks: list | None = None) -> dict:
    """Fine-tune on the cold-start set; writes ctx.out_dir/model and returns metrics with the log history."""
    from trl import SFTConfig, SFTTrainer  # noqa: PLC0415

    from stages.common import seed_everything  # noqa: PLC0415

    t0 = time.time()
    seed_everything(ctx.seed)
    base_ref = cfg.model or getattr(ctx.pipeline, "base_model", None) or "world:base_model"
    base = ctx.resolve_model(base_ref)
    ds = ctx.resolve_dataset(cfg.dataset, required_columns=("prompt", "completion"))
    if cfg.max_examples:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    ds = ds.select_columns(["prompt", "completion"])
    model, tok = load_policy(base, cfg.trust_remote_code)

    trainer_dir = Path(ctx.work_dir) / "trainer"
    args = SFTConfig(output_dir=str(trainer_dir), seed=ctx.seed, use_cpu=ctx.device == "cpu",
                     **{"save_strategy": "steps", "report_to": "none", **cfg.trainer})
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[progress_callback(ctx.reporter, "cold-start"), *(callbacks or [])])
    ctx.keep_tracker_logs(trainer)
    result = trainer.train(resume_from_checkpoint=last_checkpoint(ctx, trainer_dir))
    history = [dict(h) for h in trainer.state.log_history]
    metrics = {
        "train_loss": round(result.training_loss, 4),
        "final_loss": final_loss(history),
        "global_step": trainer.state.global_step,
        "num_examples": len(ds),
        "runtime_s": round(time.time() - t0, 1),
        "history": history,
    }
    dataset_label = cfg.dataset if isinstance(cfg.dataset, str) else cfg.dataset.path
    save_model(trainer, tok, ctx, "cold-start", dataset_label, base_ref, metrics)
    del trainer, model
    release_memory()
    ctx.reporter.progress(1.0, "cold-start done")
    return metrics
