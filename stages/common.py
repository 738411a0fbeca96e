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
# Fields r1flow sets itself; users must not set them in flows.yaml. (`report_to` is the user's: "none" unless set.)
_RESERVED_TRAINER_ARGS = {"output_dir", "seed", "use_cpu"}
# Trackers `report_to` may name, and the package each needs (checked at validate, not after hours of training).
TRACKERS = {"none": None, "all": None, "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio",
            "mlflow": "mlflow", "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive",
            "swanlab": "swanlab", "neptune": "neptune", "codecarbon": "codecarbon", "azure_ml": "azureml"}
# Trainer fields that change where logs go, never what is trained: kept out of version ids.
NOT_IN_VERSION_ID = ("report_to", "run_name", "disable_tqdm")
# Numeric TrainingArguments fields that must be positive / non-negative.
_POSITIVE = {"learning_rate", "num_train_epochs", "per_device_train_batch_size",
             "gradient_accumulation_steps", "num_generations", "max_completion_length",
             "per_device_eval_batch_size", "max_length", "max_prompt_length"}
_NON_NEGATIVE = {"weight_decay", "warmup_ratio", "warmup_steps", "beta", "logging_steps",
                 "save_steps", "max_grad_norm", "temperature", "save_total_limit"}
# String fields TRL types as plain `str` and checks only once training runs (GRPOTrainer's loss, its vLLM set-up,
# its reward scaling): the values its own help text lists (tests/test_config.py checks the help still lists them).
TRL_CHOICES: dict[str, dict[str, tuple]] = {
    "GRPOConfig": {
        "vllm_mode": ("server", "colocate"),
        "vllm_model_impl": ("transformers", "vllm"),
        "loss_type": ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
        "scale_rewards": ("group", "batch", "none", True, False),
        "importance_sampling_level": ("token", "sequence"),
        "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
        "vllm_importance_sampling_mode": ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
    },
}
# Fields kept out of the throwaway build (their types are still checked): `tf32` raises on a machine without an
# Ampere GPU and switches TF32 on for the whole process where there is one; `deepspeed` needs the package and
# sets environment variables. `bf16`/`fp16` are built: with use_cpu=True TrainingArguments accepts them anywhere.
_NOT_BUILT = {"tf32", "deepspeed"}
_THROWAWAY_OUTPUT_DIR = "r1flow-validate-never-written"


def _trl_class(trl_class: str):
    import trl  # noqa: PLC0415  (heavy import, only when a config is validated)

    return getattr(trl, trl_class)


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls) -> dict[str, Any]:
    import typing  # noqa: PLC0415

    if cls in _FIELD_TYPES:
        return _FIELD_TYPES[cls]
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: fall back to the raw ones
        hints = {}
    _FIELD_TYPES[cls] = {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}
    return _FIELD_TYPES[cls]


def _accepts(tp: Any, value: Any) -> bool:
    """Whether `value` (as read from YAML) has the type `tp` of a TRL field; annotations it cannot judge
    accept (the real build decides)."""
    import enum  # noqa: PLC0415
    import types  # noqa: PLC0415
    import typing  # noqa: PLC0415

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in {m.value for m in tp}
    if tp in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _describe(tp: Any) -> str:
    import enum  # noqa: PLC0415
    import types  # noqa: PLC0415
    import typing  # noqa: PLC0415

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in typing.get_args(tp)))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list", tuple: "a list", type(None): "null"}
    if tp in names:
        return names[tp]
    if origin in names:
        return names[origin]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _one_line(text: str) -> str:
    """A message on one line, without the "; " that separates problems in validation messages."""
    return " ".join(str(text).split()).replace("; ", ", ")[:400]


def _field_problems(trl_class: str, args: dict[str, Any]) -> list[tuple[str | None, str]]:
    """Key, type, range and choice problems of `args` as (field, message) pairs."""
    cls = _trl_class(trl_class)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types_ = _field_types(cls)
    choices_of = TRL_CHOICES.get(trl_class, {})
    problems: list[tuple[str | None, str]] = []
    for key, value in args.items():
        if key in _RESERVED_TRAINER_ARGS:
            problems.append((key, "set by r1flow, remove it from the config"))
            continue
        if key == "report_to":
            problems += [(key, problem) for problem in tracker_problems(value)]
            continue
        if key not in fields:
            problems.append((key, f"not a field of trl.{trl_class}"))
            continue
        choices = choices_of.get(key) or (fields[key].metadata or {}).get("choices")
        if choices is not None and value is not None and (value in list(choices)):
            continue  # a listed value (scale_rewards also takes true/false)
        if not _accepts(types_[key], value):
            hint = ""
            if isinstance(value, str) and _looks_numeric(value):
                hint = " -- YAML reads a number with an exponent but no dot (5e-5) as text: write 5.0e-5"
            problems.append((key, f"expected {_describe(types_[key])} (got {value!r}){hint}"))
        elif choices is not None and value is not None:
            listed = ", ".join(repr(c) for c in choices)
            problems.append((key, f"must be one of {listed} (got {value!r})"))
        elif key in _POSITIVE and isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            problems.append((key, f"must be > 0 (got {value})"))
        elif key in _NON_NEGATIVE and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            problems.append((key, f"must be >= 0 (got {value})"))
    return problems


def tracker_problems(report_to: Any) -> list[str]:
    """Problems with a `report_to` value (a tracker name or a list of them): unknown names, and trackers
    whose package is not installed (TRL would fail only when training starts)."""
    import importlib.util  # noqa: PLC0415

    names = [report_to] if isinstance(report_to, str) else report_to
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return [f"expected a tracker name or a list of them ({', '.join(TRACKERS)}), got {report_to!r}"]
    problems = []
    for name in names:
        if name not in TRACKERS:
            problems.append(f"unknown tracker {name!r} (expected one of {', '.join(TRACKERS)})")
        elif TRACKERS[name] and importlib.util.find_spec(TRACKERS[name]) is None:
            problems.append(f"tracker {name!r} needs the `{TRACKERS[name]}` package (pip install {TRACKERS[name]})")
    return problems


def grpo_batch_problems(args: dict[str, Any], world_size: int = 1) -> list[tuple[str, str]]:
    """TRL's GRPO batch rules (trl.GRPOConfig.__post_init__), mirrored with r1flow's wording for the effective
    `args` (TRL's defaults filled in): the generation batch -- per_device_train_batch_size x world size x
    steps_per_generation (by default gradient_accumulation_steps), or generation_batch_size when set -- must hold
    whole groups of num_generations completions; num_generations >= 2; an evaluation batch must also hold whole
    groups. r1flow trains on one process (world size 1)."""
    pdb = args.get("per_device_train_batch_size")
    gas = args.get("gradient_accumulation_steps")
    gbs, spg = args.get("generation_batch_size"), args.get("steps_per_generation")
    num_gen = args.get("num_generations")
    ints = [v for v in (pdb, gas, gbs, spg, num_gen) if v is not None]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints) or None in (pdb, gas, num_gen):
        return []  # type and range problems are reported by the field checks
    procs = f" x {world_size} processes" if world_size != 1 else ""
    if gbs is None and spg is None:
        gbs, how = pdb * world_size * gas, (f"per_device_train_batch_size ({pdb}){procs} x "
                                           f"gradient_accumulation_steps ({gas})")
    elif gbs is not None and spg is None:
        if gbs % (pdb * world_size):
            return [("generation_batch_size", f"generation_batch_size ({gbs}) must be divisible by the global batch, "
                                              f"per_device_train_batch_size ({pdb}){procs} (TRL's GRPO rule)")]
        how = f"generation_batch_size ({gbs})"
    elif gbs is None:
        gbs, how = pdb * world_size * spg, f"per_device_train_batch_size ({pdb}){procs} x steps_per_generation ({spg})"
    else:
        return [("steps_per_generation", "generation_batch_size and steps_per_generation cannot both be set "
                                         "(TRL's GRPO rule)")]
    problems = []
    eval_strategy = args.get("eval_strategy", "no")
    eval_gen = args.get("num_generations_eval") or num_gen
    eval_pdb = args.get("per_device_eval_batch_size")
    if (str(getattr(eval_strategy, "value", eval_strategy)) != "no" and isinstance(eval_pdb, int)
            and isinstance(eval_gen, int) and eval_gen > 0 and (eval_pdb * world_size) % eval_gen):
        problems.append(("per_device_eval_batch_size",
                         f"the evaluation batch, per_device_eval_batch_size ({eval_pdb}){procs}, must be divisible "
                         f"by the generations per prompt in evaluation ({eval_gen}) (TRL's GRPO rule)"))
    if gbs % num_gen:
        problems.append(("num_generations",
                         f"the generation batch, {how}{'' if how.startswith('generation_batch_size') else f' = {gbs}'}, "
                         f"must be divisible by num_generations ({num_gen}): "
                         f"every prompt's group of completions must fit in one batch (TRL's GRPO rule, world size "
                         f"{world_size})"))
    if num_gen < 2:
        problems.append(("num_generations", f"GRPO needs at least 2 generations per prompt (got {num_gen})"))
    return problems


def _culprit(message: str, args: dict[str, Any]) -> str | None:
    """The field a TRL error message is about: the first of `args`' keys it names, else the first whose text value
    it quotes (e.g. "cosin is not a valid SchedulerType"); None when it names none."""
    import re  # noqa: PLC0415

    def first(pattern_of):
        hits = [(m.start(), key) for key, value in args.items()
                if (pat := pattern_of(key, value)) and (m := re.search(pat, message))]
        return min(hits)[1] if hits else None

    return (first(lambda k, v: rf"(?<![\w]){re.escape(k)}(?![\w])")
            or first(lambda k, v: rf"(?<![\w]){re.escape(v)}(?![\w])" if isinstance(v, str) and v else None))


def _build_problems(trl_class: str, args: dict[str, Any]) -> list[tuple[str | None, str]]:
    """Build trl.`trl_class` for real from `args` (a throwaway output_dir, use_cpu=True, nothing written) and turn
    what it raises into (field, message) pairs. Environment variables it sets are restored."""
    import tempfile  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    cls = _trl_class(trl_class)
    kwargs = {k: v for k, v in args.items() if k not in _NOT_BUILT}
    environ = dict(os.environ)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(output_dir=os.path.join(tempfile.gettempdir(), _THROWAWAY_OUTPUT_DIR), use_cpu=True,
                **{**kwargs, "report_to": "none"})  # the tracker is checked by tracker_problems, not started
    except (ValueError, TypeError) as exc:
        return [(_culprit(str(exc), kwargs), _one_line(exc))]
    except Exception as exc:  # noqa: BLE001  (an import a field needs, ...): still one line, never a traceback
        return [(_culprit(str(exc), kwargs), _one_line(f"trl.{trl_class} could not be built "
                                                        f"({type(exc).__name__}: {exc})"))]
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
    return []


_PROBLEM_CACHE: dict[str, list[tuple[str | None, str]]] = {}


def trainer_problems(trl_class: str, args: dict[str, Any],
                     run_defaults: dict[str, Any] | None = None) -> list[tuple[str | None, str]]:
    """Every problem of a `trainer:` mapping as (field or None, message): unknown and reserved keys, values of the
    wrong type or outside their range or choices, GRPO's batch rule, and whatever trl.`trl_class` raises when it is
    built for real from `{**run_defaults, **args}` (the settings the stage passes at run time). The build only runs
    when the field checks pass, and its result is cached per distinct mapping."""
    import json  # noqa: PLC0415

    assert trl_class in _TRL_CLASSES, trl_class
    merged = {**(run_defaults or {}), **args}
    key = json.dumps([trl_class, merged], sort_keys=True, default=repr)
    if key not in _PROBLEM_CACHE:
        problems = _field_problems(trl_class, merged)
        if not problems and trl_class == "GRPOConfig":
            cls = _trl_class(trl_class)
            trl_defaults = {f.name: f.default for f in dataclasses.fields(cls)
                            if f.default is not dataclasses.MISSING}
            problems = grpo_batch_problems({**trl_defaults, **merged})
        if not problems:
            problems = _build_problems(trl_class, merged)
        _PROBLEM_CACHE[key] = problems
    return list(_PROBLEM_CACHE[key])


def trainer_args_validator(trl_class: str, run_defaults: dict[str, Any] | None = None
                           ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Return a function checking a `trainer:` mapping against TRL's `trl_class` (e.g. "GRPOConfig"), see
    `trainer_problems`. It raises a pydantic ValidationError (a ValueError) with one error per problem, located at
    the field, so `r1flow validate` prints `...stages.S.trainer.FIELD: what is wrong`. `run_defaults`: settings the
    stage merges under the mapping at run time (they are built with it, not added to it)."""
    assert trl_class in _TRL_CLASSES, trl_class

    def check(args: dict[str, Any]) -> dict[str, Any]:
        from pydantic import ValidationError  # noqa: PLC0415
        from pydantic_core import InitErrorDetails, PydanticCustomError  # noqa: PLC0415

        problems = trainer_problems(trl_class, args, run_defaults)
        if problems:
            raise ValidationError.from_exception_data(f"trl.{trl_class}", [
                InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": _one_line(msg)}),
                                 loc=(field,) if field else (), input=args.get(field) if field else args)
                for field, msg in problems])
        return args

    return check


def trainer_field(trl_class: str, field: str = "trainer", run_defaults: dict[str, Any] | None = None):
    """A pydantic validator for a stage config's trainer-arguments dict, checked against `trl_class`.
    Keys the user sets are merged over the field's defaults (its `default_factory`), so overriding
    one argument in flows.yaml keeps the stage's other tuned defaults. `run_defaults`: settings the stage
    merges under the dict only when it builds the TRL config (e.g. preference-rl's GRPO_DEFAULTS), so that
    validation builds what the run builds."""
    check = trainer_args_validator(trl_class, run_defaults)

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

    def image(self, key: str, png_path: Path, description: str = "", caption: str | None = None) -> None:
        """Publish a picture (e.g. a curve); implementations may embed it in Markdown. `caption`: the line
        under it (default: the file's path, for a picture that stays on disk)."""

    def warning(self, key: str, text: str) -> None:
        """Publish a warning (e.g. reward hacking suspected). Defaults to Markdown."""
        self.markdown(key, f"**Warning**\n\n{text}")


def map_in_process(fn: Callable[..., Any], jobs: list, progress: Callable[[float], None] | None = None) -> list:
    """`StageContext.map_shards` without an orchestrator: `fn(job, progress=...)` for each job, one after another
    in this process, results in job order; `progress` gets the fraction of all the work done."""
    out = []
    for i, job in enumerate(jobs):
        step = (lambda f, i=i: progress((i + f) / len(jobs))) if progress else None
        out.append(fn(job, progress=step))
    return out


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
    data_mirror: Path | None = None  # hub ids of models and datasets are read from this folder (stages/data.py)
    shards: int = 1  # how many pieces the stage cuts its sampling into (`shards.count`; stage 3)
    # map_shards(fn, jobs, progress=None): fn(job) for every job, results in job order, progress(fraction) as it
    # goes. The pipeline passes one that runs the jobs as Prefect tasks on Ray (pipeline/shards.py).
    map_shards: Callable[..., list] = dataclasses.field(default_factory=lambda: map_in_process)

    def last_checkpoint(self, trainer_dir: Path) -> str | None:
        """The newest `checkpoint-N` folder under `trainer_dir`, to resume a killed run from."""
        ckpts = sorted(Path(trainer_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        return str(ckpts[-1]) if ckpts else None

    def keep_tracker_logs(self, trainer) -> None:
        """Point a TensorBoard tracker (`report_to: tensorboard`) at the version folder's `logs/tensorboard`, so
        its event files are published with the version (TRL would write them under the work folder, which is
        removed once the version is registered). `TENSORBOARD_LOGGING_DIR` in the environment still wins."""
        for callback in trainer.callback_handler.callbacks:
            if type(callback).__name__ == "TensorBoardCallback" and getattr(callback, "logging_dir", "") is None:
                callback.logging_dir = str(Path(self.out_dir) / "logs" / "tensorboard")

    def resolve_model(self, ref: str) -> str:
        """`world:NAME` -> folder inside the world version; a local path must exist; anything else
        is treated as a hub id (its folder in the data mirror, when one is set)."""
        from stages.data import resolve_model  # noqa: PLC0415

        return resolve_model(ref, self.inputs.get("world"), self.data_mirror)

    def resolve_dataset(self, ref, required_columns: tuple[str, ...] = ()):
        """Load a dataset reference (see `stages.data`), with the pipeline's system prompt added to its
        conversational prompts."""
        from stages.data import load  # noqa: PLC0415

        return with_system_prompt(load(ref, self.inputs.get("world"), required_columns, self.data_mirror),
                                  self.system_prompt)


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
