"""flows.yaml validation: the shipped pipelines validate; each kind of mistake gives one line per
problem naming the field path, and the CLI exits 2 without a traceback."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config
from stages.common import TRL_CHOICES, UserError, grpo_batch_problems, trainer_problems

ROOT = Path(__file__).resolve().parent.parent
FLOWS = ROOT / "flows.yaml"
SHIPPED = yaml.safe_load(FLOWS.read_text())


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "flows.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def problems_of(tmp_path, data) -> list[str]:
    with pytest.raises(UserError) as exc:
        load_config(write(tmp_path, data))
    return exc.value.problems


def mutated(fn):
    data = copy.deepcopy(SHIPPED)
    fn(data)
    return data


def test_shipped_file_validates_with_cpu_and_gpu_pipelines():
    loaded = load_config(FLOWS)
    assert loaded.default == "tiny"
    assert loaded.pipelines["tiny"].device == "cpu"
    gpu = [p for p in loaded.pipelines.values() if p.device == "cuda"]
    assert gpu, "flows.yaml needs at least one GPU recipe"
    assert all(not p.base_model.startswith("world:") for p in gpu)
    for pipe in loaded.pipelines.values():
        assert pipe.trust_remote_code is False
        assert "cold-start" in pipe.enabled_stages()


def test_misspelled_stage_and_negative_learning_rate_are_both_named(tmp_path):
    def breakit(d):
        stages = d["pipelines"]["tiny"]["stages"]
        stages["cold-strat"] = stages.pop("cold-start")
        stages["reasoning-rl"]["trainer"]["learning_rate"] = -1e-4

    lines = problems_of(tmp_path, mutated(breakit))
    assert any("pipelines.tiny.stages.cold-strat: unknown key" in l for l in lines), lines
    assert any("pipelines.tiny.stages.reasoning-rl.trainer" in l and "learning_rate: must be > 0" in l for l in lines), lines


@pytest.mark.parametrize(
    "breakit, expected",
    [
        (lambda d: d["pipelines"]["tiny"].update(seeed=1), "pipelines.tiny.seeed: unknown key"),
        (lambda d: d["pipelines"]["tiny"].update(device="tpu"), "pipelines.tiny.device"),
        (lambda d: d["pipelines"]["tiny"].update(seed="abc"), "pipelines.tiny.seed"),
        (lambda d: d["pipelines"]["tiny"]["stages"]["cold-start"]["trainer"].update(no_such_arg=1),
         "pipelines.tiny.stages.cold-start.trainer.no_such_arg: not a field of trl.SFTConfig"),
        (lambda d: d["pipelines"]["tiny"]["stages"]["cold-start"]["trainer"].update(output_dir="x"),
         "pipelines.tiny.stages.cold-start.trainer.output_dir: set by r1flow"),
        (lambda d: d["pipelines"]["tiny"]["stages"]["cold-start"]["trainer"].update(report_to="wandbb"),
         "pipelines.tiny.stages.cold-start.trainer.report_to: unknown tracker 'wandbb'"),
        (lambda d: d["pipelines"]["tiny"]["stages"]["reasoning-rl"]["trainer"].update(report_to=["swanlab"]),
         "pipelines.tiny.stages.reasoning-rl.trainer.report_to: tracker 'swanlab' needs the `swanlab` package"),
        (lambda d: d["pipelines"]["tiny"]["stages"]["cold-start"].update(typo_key=1),
         "pipelines.tiny.stages.cold-start.typo_key: unknown key"),
        (lambda d: d["pipelines"]["tiny"].pop("world"), "base_model: refers to the tiny world"),
        (lambda d: d.update(default="nope"), "default: 'nope' is not one of the pipelines"),
        (lambda d: d.update(extra_top=1), "extra_top: unknown key"),
        (lambda d: d["pipelines"]["tiny"].update(orchestration={"retries": {"cold-start": -1}}),
         "retries.cold-start: must be >= 0"),
        (lambda d: d["pipelines"]["tiny"].update(orchestration={"retries": {"cold-strat": 1}}),
         "retries.cold-strat: unknown stage"),
    ],
)
def test_each_kind_of_error_names_its_field(tmp_path, breakit, expected):
    lines = problems_of(tmp_path, mutated(breakit))
    assert any(expected in l for l in lines), lines
    assert all(l.startswith(str(tmp_path)) for l in lines), lines


def test_problems_in_two_pipelines_are_all_reported(tmp_path):
    def breakit(d):
        for p in d["pipelines"].values():
            p["seeed"] = 1

    lines = problems_of(tmp_path, mutated(breakit))
    assert len([l for l in lines if "seeed: unknown key" in l]) == len(SHIPPED["pipelines"])


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    lines = problems_of(tmp_path, "default: tiny\npipelines:\n  tiny: [unclosed\n")
    assert len(lines) == 1 and (":3:" in lines[0] or ":4:" in lines[0]), lines


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_validate_exit_codes(tmp_path, capsys):
    assert main(["validate", str(FLOWS)]) == 0
    bad = write(tmp_path, mutated(lambda d: d["pipelines"]["tiny"].update(seeed=1)))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "seeed: unknown key" in err and "Traceback" not in err


def test_console_script_exit_2_without_traceback(tmp_path):
    bad = write(tmp_path, mutated(lambda d: d["pipelines"]["tiny"]["stages"]["reasoning-rl"]["trainer"].update(learning_rate=-1)))
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "learning_rate: must be > 0" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------- trainer values
# `trainer:` blocks are built into their TRL config at validation time: a value TRL would refuse, or that it
# accepts but fails on once training starts, is one line naming the field.

QWEN = "qwen2.5-math-1.5b"


def qwen_trainer(stage: str):
    return lambda d: d["pipelines"][QWEN]["stages"][stage]["trainer"]


def set_trainer(stage: str, **values):
    return lambda d: qwen_trainer(stage)(d).update(values)


def line(tmp_path, stage: str, field: str, message: str) -> str:
    return f"{tmp_path / 'flows.yaml'}: pipelines.{QWEN}.stages.{stage}.trainer.{field}: {message}"


@pytest.mark.parametrize("stage, values, field, message", [
    ("cold-start", {"learning_rate": "fast"}, "learning_rate", "expected a number (got 'fast')"),
    ("reasoning-rl", {"vllm_mode": "colocat"}, "vllm_mode", "must be one of 'server', 'colocate' (got 'colocat')"),
    ("reasoning-rl", {"loss_type": "dapoo"}, "loss_type",
     "must be one of 'grpo', 'dr_grpo', 'dapo', 'bnpo', 'cispo', 'sapo', 'luspo', 'vespo' (got 'dapoo')"),
    ("reasoning-rl", {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2}, "num_generations",
     "the generation batch, per_device_train_batch_size (3) x gradient_accumulation_steps (2) = 6, must be divisible "
     "by num_generations (8): every prompt's group of completions must fit in one batch (TRL's GRPO rule, world "
     "size 1)"),
    ("preference-rl", {"num_generations": 1}, "num_generations", "GRPO needs at least 2 generations per prompt (got 1)"),
    ("rejection-sft", {"learning_rate": "5e-5"}, "learning_rate",
     "expected a number (got '5e-5') -- YAML reads a number with an exponent but no dot (5e-5) as text: write 5.0e-5"),
    ("cold-start", {"bf16": "yes"}, "bf16", "expected true or false or null (got 'yes')"),
    ("cold-start", {"tf32": "on"}, "tf32", "expected true or false or null (got 'on')"),
    ("cold-start", {"max_steps": 1.5}, "max_steps", "expected an integer (got 1.5)"),
    ("cold-start", {"loss_type": "nlll"}, "loss_type", "must be one of 'nll', 'dft', 'chunked_nll' (got 'nlll')"),
    # raised by TRL / transformers themselves when the config is built
    ("cold-start", {"fp16": True}, "fp16", "At most one of fp16 and bf16 can be True, but not both"),
    ("reasoning-rl", {"generation_batch_size": 62}, "generation_batch_size",
     "generation_batch_size (62) must be divisible by the global batch, per_device_train_batch_size (4) (TRL's GRPO "
     "rule)"),
    ("reasoning-rl", {"generation_batch_size": 60}, "num_generations",
     "the generation batch, generation_batch_size (60), must be divisible by num_generations (8): every prompt's "
     "group of completions must fit in one batch (TRL's GRPO rule, world size 1)"),
])
def test_bad_trainer_value_is_one_line_naming_the_field(tmp_path, stage, values, field, message):
    lines = problems_of(tmp_path, mutated(set_trainer(stage, **values)))
    assert lines == [line(tmp_path, stage, field, message)], lines


@pytest.mark.parametrize("values, field, start", [
    ({"lr_scheduler_type": "cosin"}, "lr_scheduler_type", "cosin is not a valid SchedulerType, please select one of"),
    ({"optim": "adamw"}, "optim", "adamw is not a valid OptimizerNames"),
    ({"save_strategy": "step"}, "save_strategy", "step is not a valid SaveStrategy"),
])
def test_values_trl_refuses_when_built_fail_validation(tmp_path, values, field, start):
    lines = problems_of(tmp_path, mutated(set_trainer("rejection-sft", **values)))
    assert len(lines) == 1 and lines[0].startswith(line(tmp_path, "rejection-sft", field, start)), lines


def test_several_bad_values_give_one_line_each_and_the_cli_exits_2(tmp_path, capsys):
    def breakit(d):
        qwen_trainer("cold-start")(d)["learning_rate"] = "fast"
        qwen_trainer("reasoning-rl")(d).update(vllm_mode="colocat", loss_type="dapoo")
        qwen_trainer("preference-rl")(d)["num_generations"] = 6

    bad = write(tmp_path, mutated(breakit))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 4, err
    for stage, field in [("cold-start", "learning_rate"), ("reasoning-rl", "vllm_mode"),
                         ("reasoning-rl", "loss_type"), ("preference-rl", "num_generations")]:
        assert sum(f"pipelines.{QWEN}.stages.{stage}.trainer.{field}: " in l for l in errors) == 1, err


def test_gpu_flags_do_not_fail_on_a_machine_without_a_gpu(tmp_path):
    """bf16 (and tf32, which transformers refuses without an Ampere GPU) validate on this CPU-only machine."""
    data = mutated(lambda d: [qwen_trainer(s)(d).update(bf16=True, tf32=True)
                              for s in ("cold-start", "reasoning-rl", "rejection-sft", "preference-rl")])
    pipe = load_config(write(tmp_path, data)).pipelines[QWEN]
    assert pipe.stages.cold_start.trainer["tf32"] is True and pipe.stages.cold_start.trainer["bf16"] is True


def test_validation_builds_nothing_on_disk_and_leaves_the_environment_alone(tmp_path, monkeypatch):
    import os
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None
    try:
        before = dict(os.environ)
        assert trainer_problems("SFTConfig", {"torch_compile_backend": "inductor", "learning_rate": 0.123}) == []
        assert dict(os.environ) == before
        assert list(tmp_path.iterdir()) == []
    finally:
        tempfile.tempdir = None


@pytest.mark.parametrize("args", [
    {"per_device_train_batch_size": 8, "num_generations": 8},
    {"per_device_train_batch_size": 6, "num_generations": 4},
    {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "num_generations": 6},
    {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "num_generations": 8},
    {"per_device_train_batch_size": 4, "steps_per_generation": 4, "num_generations": 16},
    {"per_device_train_batch_size": 4, "steps_per_generation": 3, "num_generations": 8},
    {"per_device_train_batch_size": 4, "generation_batch_size": 24, "num_generations": 8},
    {"per_device_train_batch_size": 4, "generation_batch_size": 32, "num_generations": 8},
    {"per_device_train_batch_size": 4, "generation_batch_size": 30, "num_generations": 5},
    {"per_device_train_batch_size": 4, "generation_batch_size": 16, "steps_per_generation": 4},
    {"per_device_train_batch_size": 2, "num_generations": 1},
    {"per_device_train_batch_size": 4, "num_generations": 4, "eval_strategy": "steps", "eval_steps": 5,
     "per_device_eval_batch_size": 6},
    {"per_device_train_batch_size": 4, "num_generations": 4, "eval_strategy": "steps", "eval_steps": 5,
     "per_device_eval_batch_size": 6, "num_generations_eval": 3},
])
def test_grpo_batch_rule_mirrors_trl(args, tmp_path):
    """r1flow's wording of TRL's GRPO batch rule refuses exactly what trl.GRPOConfig refuses (world size 1)."""
    import dataclasses
    import warnings

    import trl

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **args)
        trl_refuses = False
    except ValueError:
        trl_refuses = True
    defaults = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig) if f.default is not dataclasses.MISSING}
    assert bool(grpo_batch_problems({**defaults, **args})) == trl_refuses
    assert bool(trainer_problems("GRPOConfig", args)) == trl_refuses


@pytest.mark.parametrize("trl_class, field", [(c, f) for c, fields in TRL_CHOICES.items() for f in fields])
def test_choices_r1flow_checks_are_the_ones_trl_documents(trl_class, field):
    """TRL types these fields as plain strings; r1flow's lists of their values must still be TRL's (a TRL upgrade
    that adds or renames one fails here)."""
    import dataclasses

    import trl

    help_ = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(getattr(trl, trl_class))}[field]
    for value in TRL_CHOICES[trl_class][field]:
        if isinstance(value, str):
            assert f"'{value}'" in help_ or f"`{value}`" in help_ or f"{value}'" in help_, (field, value, help_)


def test_stage_defaults_merged_under_run_defaults_are_what_is_built():
    """preference-rl merges GRPO_DEFAULTS under `trainer:` at run time: validation builds the same mapping."""
    from stages import preference_rl

    run = preference_rl.GRPO_DEFAULTS  # per_device_train_batch_size 16
    assert trainer_problems("GRPOConfig", {"num_generations": 16}, run_defaults=run) == []
    assert [f for f, _ in trainer_problems("GRPOConfig", {"num_generations": 16})] == ["num_generations"]
