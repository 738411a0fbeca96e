"""Shared plumbing for stage modules: the config base class, the run context, progress reporting,
and the user-error type the CLI turns into one-line messages."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, field_validator


class UserError(Exception):
    """A problem with the user's input (config, data, model path). The CLI prints each line of the
    message and exits with status 2. Use one line per problem: `where: what was expected`."""

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class StageConfig(BaseModel):
    """Base for every stage's config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# TRL config classes by name; validated lazily so `import stages.common` stays cheap.
_TRL_CLASSES = {"SFTConfig", "GRPOConfig", "DPOConfig", "RewardConfig"}
# Fields r1flow sets itself; users must not set them in flows.yaml.
_RESERVED_TRAINER_ARGS = {"output_dir", "seed", "use_cpu", "report_to"}
# Numeric TrainingArguments fields that must be positive / non-negative.
_POSITIVE = {"learning_rate", "num_train_epochs", "per_device_train_batch_size",
             "gradient_accumulation_steps", "num_generations", "max_completion_length",
             "per_device_eval_batch_size", "max_length", "max_prompt_length"}
_NON_NEGATIVE = {"weight_decay", "warmup_ratio", "warmup_steps", "beta", "logging_steps",
                 "save_steps", "max_grad_norm", "temperature", "save_total_limit"}


def trainer_args_validator(trl_class: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Return a function checking a `trainer:` mapping against the fields of TRL's `trl_class`
    (e.g. "GRPOConfig"): unknown keys, reserved keys and out-of-range numbers are errors."""
    assert trl_class in _TRL_CLASSES, trl_class

    def check(args: dict[str, Any]) -> dict[str, Any]:
        import trl  # noqa: PLC0415  (heavy import, only when a config is validated)

        fields = {f.name for f in dataclasses.fields(getattr(trl, trl_class))}
        problems = []
        for key, value in args.items():
            if key in _RESERVED_TRAINER_ARGS:
                problems.append(f"{key}: set by r1flow, remove it from the config")
            elif key not in fields:
                problems.append(f"{key}: not a field of trl.{trl_class}")
            elif key in _POSITIVE and isinstance(value, (int, float)) and value <= 0:
                problems.append(f"{key}: must be > 0 (got {value})")
            elif key in _NON_NEGATIVE and isinstance(value, (int, float)) and value < 0:
                problems.append(f"{key}: must be >= 0 (got {value})")
        if problems:
            raise ValueError("; ".join(problems))
        return args

    return check


def trainer_field(trl_class: str, field: str = "trainer"):
    """A pydantic validator for a stage config's trainer-arguments dict, checked against `trl_class`.
    Keys the user sets are merged over the field's defaults (its `default_factory`), so overriding
    one argument in flows.yaml keeps the stage's other tuned defaults."""
    check = trainer_args_validator(trl_class)

    def merge_and_check(cls, value):
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of trl.{trl_class} arguments (got {type(value).__name__})")
        factory = cls.model_fields[field].default_factory
        return check({**(factory() if factory else {}), **value})

    return field_validator(field, mode="before")(merge_and_check)


class Reporter:
    """Progress and results sink for stage code. The default does nothing (plain runs, tests);
    `pipeline.reporting.PrefectReporter` publishes Prefect artifacts. Keys are short
    lowercase-hyphen names (e.g. "metrics", "eval", "funnel"); the pipeline prefixes them with the
    pipeline and stage so artifact keys are stable across runs."""

    def progress(self, fraction: float, message: str = "") -> None:
        """Report overall progress of the stage in [0, 1]."""

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        """Publish a table (list of row dicts)."""

    def markdown(self, key: str, text: str, description: str = "") -> None:
        """Publish a Markdown document (summaries, sample completions, warnings)."""

    def link(self, key: str, target: str, description: str = "") -> None:
        """Publish a link to a folder or file (checkpoint, dataset, data card)."""

    def image(self, key: str, png_path: Path, description: str = "") -> None:
        """Publish a picture (e.g. a curve); implementations may embed it in Markdown."""

    def warning(self, key: str, text: str) -> None:
        """Publish a warning (e.g. reward hacking suspected). Defaults to Markdown."""
        self.markdown(key, f"**Warning**\n\n{text}")


@dataclasses.dataclass
class StageContext:
    """Everything a stage's `run(cfg, ctx)` needs besides its own config. See docs/DESIGN.md."""

    out_dir: Path
    work_dir: Path
    inputs: dict[str, Path]
    pipeline: Any  # pipeline.config.PipelineConfig; typed loosely to keep stages free of pipeline/
    seed: int = 0
    device: str = "cpu"
    reporter: Reporter = dataclasses.field(default_factory=Reporter)
    version_id: str = ""  # the id this run will register (for model/data cards)
    parents: dict[str, str] = dataclasses.field(default_factory=dict)  # upstream stage -> version id
    system_prompt: str | None = None  # added to every conversational prompt the stage loads (R1's format contract)
    rehearsal: bool = False  # `--rehearse`: a few steps and rows, to check the mechanics, not the quality

    def last_checkpoint(self, trainer_dir: Path) -> str | None:
        """The newest `checkpoint-N` folder under `trainer_dir`, to resume a killed run from."""
        ckpts = sorted(Path(trainer_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        return str(ckpts[-1]) if ckpts else None

    def resolve_model(self, ref: str) -> str:
        """`world:NAME` -> folder inside the world version; a local path must exist; anything else
        is treated as a hub id."""
        from stages.data import resolve_model  # noqa: PLC0415

        return resolve_model(ref, self.inputs.get("world"))

    def resolve_dataset(self, ref, required_columns: tuple[str, ...] = ()):
        """Load a dataset reference (see `stages.data`), with the pipeline's system prompt added to its
        conversational prompts."""
        from stages.data import load  # noqa: PLC0415

        return with_system_prompt(load(ref, self.inputs.get("world"), required_columns), self.system_prompt)


# R1-Zero's instruction (DeepSeek-R1 report, table 1), as open-r1 puts it in a system prompt. `system_prompt: r1`
# in flows.yaml selects it.
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>."
)


def resolve_system_prompt(value: str | None) -> str | None:
    """`r1` -> R1_SYSTEM_PROMPT; any other string as is; None -> None (the chat template's default)."""
    return R1_SYSTEM_PROMPT if value == "r1" else value


def add_system_prompt(prompt, system_prompt: str | None):
    """`prompt` with a system message first, unless it is not a conversation, already has one, or
    `system_prompt` is None."""
    if not system_prompt or not isinstance(prompt, list) or not prompt:
        return prompt
    if any(isinstance(m, dict) and m.get("role") == "system" for m in prompt):
        return prompt
    return [{"role": "system", "content": system_prompt}, *prompt]


def with_system_prompt(ds, system_prompt: str | None):
    """A `datasets.Dataset` whose `prompt` column carries the system prompt (see `add_system_prompt`)."""
    if not system_prompt or "prompt" not in ds.column_names:
        return ds
    return ds.map(lambda row: {"prompt": add_system_prompt(row["prompt"], system_prompt)})


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; keep CPU threads as configured (OMP_NUM_THREADS)."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
