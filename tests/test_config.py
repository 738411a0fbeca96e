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
from stages.common import UserError

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
         "pipelines.tiny.stages.cold-start.trainer: no_such_arg: not a field of trl.SFTConfig"),
        (lambda d: d["pipelines"]["tiny"]["stages"]["cold-start"]["trainer"].update(output_dir="x"),
         "output_dir: set by r1flow"),
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
