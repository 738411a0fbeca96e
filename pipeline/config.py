"""`flows.yaml`: pydantic models for pipelines, and loading with one-line-per-problem errors.

A file holds named pipelines (`pipelines:`) and the default one (`default:`). Each stage's settings
are the `Config` class of its module in `stages/` (every field documented there); this module only
composes them. Unknown keys anywhere are errors, so typos never pass silently."""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)

from stages.common import UserError

# CLI stage name -> module in stages/. Order is pipeline order.
STAGE_MODULES: dict[str, str] = {
    "world": "stages.tiny.world",
    "cold-start": "stages.cold_start_sft",
    "reasoning-rl": "stages.reasoning_rl",
    "rejection-sft": "stages.rejection_sft",
    "reward-model": "stages.reward_model",  # sub-step of stage 4 (skipped when a reward model is named)
    "preference-rl": "stages.preference_rl",
}
STAGES = list(STAGE_MODULES)
TRAINING_STAGES = STAGES[1:]
DEFAULT_CONFIG_FILE = "flows.yaml"


WORLD_KINDS = {"tiny": "stages.tiny.world", "import": "stages.prepare"}


def stage_module(stage: str, stage_cfg: Any = None):
    """The module that runs `stage`; for `world`, the one of its kind (tiny world or import)."""
    if stage == "world" and stage_cfg is not None:
        return importlib.import_module(WORLD_KINDS[getattr(stage_cfg, "kind", "tiny")])
    return importlib.import_module(STAGE_MODULES[stage])


def _world_kind(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("kind", "tiny")
    return getattr(value, "kind", "tiny")


def _field_name(stage: str) -> str:
    return stage.replace("-", "_")


# Stages that are rank-aware under a multi-process launch: training alone, or (reasoning-rl) GRPO whose reward-hacking
# monitor saves its healthy weights from the main process only and whose verifier agreement is summed over the ranks.
# rejection-sft and preference-rl sample, judge or score with a reward model inside the stage, which one process
# does today.
LAUNCHABLE_STAGES = ("cold-start", "reasoning-rl", "reward-model")


class LauncherConfig(BaseModel):
    """How a stage's training is launched (`launcher:` in a stage's block; pipeline/launch.py)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["in-process", "accelerate"] = Field(
        "in-process", description="`in-process`: the stage runs inside its Prefect task (one process, one device); "
                                  "`accelerate`: `accelerate launch` runs it as a child process group (DDP, or "
                                  "DeepSpeed/FSDP through config_file)")
    num_processes: int = Field(1, ge=1, description="processes in all (one per GPU; on CPU, gloo processes)")
    num_machines: int = Field(1, ge=1, description="machines taking part (each runs the same stage flow)")
    machine_rank: int = Field(0, ge=0, description="this machine's rank (0 on the machine that registers the version)")
    main_process_ip: str | None = Field(None, description="address of machine 0 when num_machines > 1")
    main_process_port: int | None = Field(None, ge=1, le=65535, description="rendezvous port (default: a free one)")
    config_file: str | None = Field(None, description="accelerate config (DeepSpeed ZeRO-2/3, FSDP: examples in "
                                                       "configs/accelerate/), relative to the flows file")

    @field_validator("config_file")
    @classmethod
    def _config_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = Path(os.path.expanduser(value))
        base = (info.context or {}).get("config_dir")
        full = path if path.is_absolute() or base is None else Path(base) / path
        if not full.is_file():
            raise ValueError(f"{full} not found (expected an accelerate config file: DeepSpeed, FSDP or DDP)")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.kind == "in-process" and (self.num_processes > 1 or self.num_machines > 1 or self.config_file):
            raise ValueError("num_processes, num_machines and config_file need `kind: accelerate`")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("main_process_ip: required when num_machines > 1 (the address of machine 0)")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank: {self.machine_rank} (expected < num_machines, {self.num_machines})")
        return self


# Stages whose sampling can be cut into shards (`shards:` in the stage's block; pipeline/shards.py).
SHARDED_STAGES = ("rejection-sft",)


class ShardsConfig(BaseModel):
    """Where a stage's sampling runs (`shards:` in the rejection-sft block; pipeline/shards.py). The prompts are
    cut on generation-batch boundaries into `count` shards, each a Prefect task, seeded by prompt position and
    merged in prompt order."""

    model_config = ConfigDict(extra="forbid")
    count: int = Field(1, ge=1, description="shards the prompts are cut into (at most one per generation batch)")
    runner: Literal["in-process", "ray"] = Field(
        "in-process", description="`in-process`: shards one after another in the stage's process; `ray`: Prefect "
                                  "tasks on a Ray task runner (prefect-ray), in parallel")
    address: str | None = Field(
        None, description="ray: an existing Ray cluster (`ray://head:10001`, or `auto` on a cluster node); None "
                          "starts a local Ray on this machine for the stage and stops it after")
    num_cpus: float = Field(1, gt=0, description="ray: CPUs each shard task reserves (and torch threads it uses)")
    num_gpus: float = Field(0, ge=0, description="ray: GPUs each shard task reserves (1 on a multi-GPU node: one "
                                                 "vLLM engine per GPU)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.runner == "in-process" and (self.address or self.num_gpus):
            raise ValueError("address and num_gpus need `runner: ray`")
        return self


def _launchable(stage: str) -> type[BaseModel]:
    """A stage's Config with the orchestration fields `launcher` (and `shards` where it samples)."""
    base = stage_module(stage).Config
    extra: dict[str, Any] = {}
    if stage in SHARDED_STAGES:
        extra["shards"] = (ShardsConfig, Field(default_factory=ShardsConfig,
                                               description="where the stage's sampling runs (prompt shards)"))
    return create_model(base.__name__, __base__=base, __module__=base.__module__,
                        launcher=(LauncherConfig, Field(default_factory=LauncherConfig,
                                                        description="how the stage's training is launched")),
                        **extra)


@lru_cache(maxsize=1)
def stages_model() -> type[BaseModel]:
    """`stages:` mapping: one optional block per training stage, keyed by its CLI name."""
    fields: dict[str, Any] = {
        _field_name(s): (_launchable(s) | None, Field(None, alias=s, description=f"settings of `{s}`"))
        for s in TRAINING_STAGES
    }
    return create_model(
        "StagesConfig", __config__=ConfigDict(extra="forbid", populate_by_name=True), **fields
    )


class OrchestrationConfig(BaseModel):
    """How Prefect runs the stages."""

    model_config = ConfigDict(extra="forbid")
    retries: dict[str, int] = Field(
        default_factory=dict, description="Prefect retries per stage for transient failures (e.g. {rejection-sft: 1})"
    )
    retry_delay_seconds: float = Field(10.0, ge=0, description="wait between retries")
    work_pools: dict[str, str] = Field(
        default_factory=dict,
        description="Prefect work pools for `r1flow deploy`: `pipeline` (the pipeline flow, and every stage not named) "
                    "and any stage (e.g. {pipeline: cpu, rejection-sft: gpu}); a deployed pipeline runs a stage on "
                    "another pool through that stage's deployment (pipeline/deploy.py)")

    @model_validator(mode="after")
    def _non_negative(self):
        bad = [f"retries.{k}: must be >= 0 (got {v})" for k, v in self.retries.items() if v < 0]
        bad += [f"retries.{k}: unknown stage (expected one of {', '.join(STAGES)})" for k in self.retries if k not in STAGES]
        bad += [f"work_pools.{k}: unknown key (expected pipeline or a stage: {', '.join(STAGES)})"
                for k in self.work_pools if k != "pipeline" and k not in STAGES]
        if bad:
            raise ValueError("; ".join(bad))
        return self


@lru_cache(maxsize=1)
def pipeline_model() -> type[BaseModel]:
    from pydantic import Discriminator, Tag  # noqa: PLC0415
    from typing import Annotated, Union  # noqa: PLC0415

    from stages import evaluate as evaluate_module  # noqa: PLC0415

    EvalConfig, StagesConfig = evaluate_module.Config, stages_model()
    WorldConfig = Annotated[Union[tuple(Annotated[importlib.import_module(module).Config, Tag(kind)]
                                        for kind, module in WORLD_KINDS.items())],
                            Discriminator(_world_kind)]

    class PipelineConfig(BaseModel):
        """One pipeline: where it starts, each stage's settings, where versions are stored."""

        model_config = ConfigDict(extra="forbid")
        description: str = Field("", description="one line shown by `r1flow validate`")
        device: Literal["cpu", "cuda"] = Field("cpu", description="where training and generation run")
        seed: int = Field(0, description="seed for every stage (data order, sampling, init)")
        storage_root: str = Field(
            "runs/{pipeline}", description="version store root; relative paths are relative to the config file"
        )
        base_model: str = Field(
            "world:base_model", description="`world:base_model` (tiny world), a local model folder, or a hub id"
        )
        trust_remote_code: bool = Field(False, description="allow models' own Python code; off unless you trust it")
        data_mirror: str | None = Field(
            None, description="folder laid out by hub id that replaces the hub (air-gapped clusters): models at "
                              "DIR/<org>/<name>/, datasets at DIR/<org>/<name>/<config or default>/<split>.jsonl; "
                              "relative to the config file; `--data-mirror DIR` or $R1FLOW_DATA_MIRROR override it")
        system_prompt: str | None = Field(
            None, description="system message added to every prompt the stages train, sample and evaluate on; `r1` "
                              "is R1's instruction to think in <think></think> and answer in <answer></answer>; "
                              "None keeps the chat template's default (recorded in every version's id)")
        world: WorldConfig | None = Field(
            None, description="`kind: tiny` (default): build the tiny synthetic world; `kind: import`: import the "
                              "base model and materialize the datasets once (stages/prepare.py)")
        eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation after every stage")
        stages: StagesConfig = Field(..., description="per-stage settings; a missing block means the stage is skipped")
        orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

        @model_validator(mode="after")
        def _world_refs(self):
            uses_world = self.base_model.startswith("world:")
            if uses_world and self.world is None:
                raise ValueError("base_model: refers to the tiny world (`world:`), but the pipeline has no `world:` block")
            bad = [s for s in TRAINING_STAGES if s not in LAUNCHABLE_STAGES and self.stage_config(s) is not None
                   and self.stage_config(s).launcher.kind != "in-process"]
            if bad:
                raise ValueError("; ".join(f"stages.{s}.launcher: kind accelerate runs {', '.join(LAUNCHABLE_STAGES)} "
                                           f"today ({s} samples or evaluates inside the stage, which is not rank-aware "
                                           f"yet; expected kind: in-process)" for s in bad))
            return self

        def stage_config(self, stage: str):
            if stage == "world":
                return self.world
            return getattr(self.stages, _field_name(stage))

        def enabled_stages(self) -> list[str]:
            return [s for s in STAGES if self.stage_config(s) is not None]

    return PipelineConfig


class FlowsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default: str
    pipelines: dict[str, Any]


def _format_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _format_error(prefix: str, err: dict) -> str:
    loc = _format_loc((*prefix, *err["loc"]) if prefix else err["loc"])
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind == "missing":
        return f"{loc}: required key is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    if kind not in ("value_error",) and not isinstance(got, (dict, list)):
        msg = f"{msg} (got {got!r})"
    return f"{loc}: {msg}"


def validation_problems(exc: ValidationError, prefix: tuple = ()) -> list[str]:
    lines = []
    for err in exc.errors():
        # a validator may pack several problems into one error, separated by "; "
        head, _, rest = _format_error(prefix, err).partition(": ")
        lines += [f"{head}: {part}" for part in rest.split("; ")]
    return lines


class Loaded:
    """A validated flows.yaml: the file's path and its pipelines. With `rehearse`, every pipeline is its
    shrunken rehearsal (pipeline/rehearse.py) and stores its versions under `<storage_root>-rehearse`."""

    def __init__(self, path: Path, default: str, pipelines: dict[str, BaseModel], rehearse: bool = False,
                 data_mirror: str | Path | None = None):
        self.path, self.default, self.pipelines, self.rehearse = path, default, pipelines, rehearse
        self.data_mirror = data_mirror  # overrides every pipeline's `data_mirror` (--data-mirror, $R1FLOW_DATA_MIRROR)
        self._resolved: dict[str, BaseModel] = {}

    def get(self, name: str | None):
        """(name, pipeline config): with the data mirror resolved to an absolute folder, and shrunk when
        rehearsing."""
        name = name or self.default
        if name not in self.pipelines:
            raise UserError(f"--pipeline {name!r}: not in {self.path} (has: {', '.join(self.pipelines)})")
        if name not in self._resolved:
            pipe = self.pipelines[name]
            mirror = self.mirror(name)
            if mirror is not None:
                pipe = pipe.model_copy(update={"data_mirror": str(mirror)})
            if self.rehearse:
                from pipeline.rehearse import rehearsal  # noqa: PLC0415

                pipe = rehearsal(pipe, self.storage_root(name))
            self._resolved[name] = pipe
        return name, self._resolved[name]

    def mirror(self, name: str) -> Path | None:
        """The pipeline's data mirror as an absolute folder (the override's relative to the working directory,
        flows.yaml's to the config file), or None; a folder that does not exist is a UserError."""
        if self.data_mirror:
            where, folder = "--data-mirror", Path(os.path.expanduser(str(self.data_mirror))).resolve()
        elif self.pipelines[name].data_mirror:
            folder = Path(os.path.expanduser(self.pipelines[name].data_mirror))
            where, folder = f"pipelines.{name}.data_mirror", folder if folder.is_absolute() else (self.path.parent / folder).resolve()
        else:
            return None
        if not folder.is_dir():
            raise UserError(f"{where}: {folder} is not a folder (expected a data mirror laid out by hub id)")
        return folder

    def storage_root(self, name: str) -> Path:
        root = Path(os.path.expanduser(self.pipelines[name].storage_root.format(pipeline=name)))
        root = root if root.is_absolute() else (self.path.parent / root).resolve()
        return root.with_name(root.name + "-rehearse") if self.rehearse else root


def load_config(path: str | Path | None = None, rehearse: bool = False, data_mirror: str | Path | None = None) -> Loaded:
    """Read and validate a flows file. Every problem becomes one line of a UserError. With `rehearse`,
    pipelines come out shrunk for a rehearsal (see `Loaded`); `data_mirror` (default $R1FLOW_DATA_MIRROR)
    replaces every pipeline's own."""
    path = Path(path or os.environ.get("R1FLOW_CONFIG", DEFAULT_CONFIG_FILE))
    data_mirror = data_mirror or os.environ.get("R1FLOW_DATA_MIRROR") or None
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with `default` and `pipelines`")
    try:
        top = FlowsFile.model_validate(raw)
    except ValidationError as exc:
        raise UserError(*(f"{path}: {p}" for p in validation_problems(exc))) from None
    problems, pipelines = [], {}
    model = pipeline_model()
    for name, body in top.pipelines.items():
        try:
            pipelines[name] = model.model_validate(body if body is not None else {},
                                                   context={"config_dir": path.resolve().parent})
        except ValidationError as exc:
            problems += [f"{path}: {p}" for p in validation_problems(exc, ("pipelines", name))]
    if top.default not in top.pipelines:
        problems.append(f"{path}: default: {top.default!r} is not one of the pipelines ({', '.join(top.pipelines)})")
    if problems:
        raise UserError(*problems)
    return Loaded(path.resolve(), top.default, pipelines, rehearse, data_mirror)
