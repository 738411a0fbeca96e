"""The data mirror (issue 12): hub ids of models and datasets read from a folder laid out by hub id, so a recipe
runs where the hub is unreachable. Fast: the mirror is tests/fixtures/hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.flows import identity_config
from stages.common import UserError
from stages.data import DatasetSpec, load, resolve_model

ROOT = Path(__file__).resolve().parent.parent
HUB = ROOT / "tests" / "fixtures" / "hub"
MATH = "DigitalLearningGmbH/MATH-lighteval"
QWEN = "qwen2.5-math-1.5b"


def test_a_hub_model_resolves_to_its_folder_in_the_mirror():
    assert resolve_model("Qwen/Qwen2.5-Math-1.5B", None, HUB) == str(HUB / "Qwen" / "Qwen2.5-Math-1.5B")
    assert resolve_model("Qwen/Qwen2.5-Math-1.5B", None) == "Qwen/Qwen2.5-Math-1.5B"  # no mirror: the hub id


def test_a_model_missing_from_the_mirror_is_an_error_naming_the_folder():
    with pytest.raises(UserError) as err:
        resolve_model("Qwen/Qwen2.5-Math-7B", None, HUB)
    assert str(err.value) == (f"model 'Qwen/Qwen2.5-Math-7B': not in the data mirror (expected a model folder with "
                              f"config.json at {HUB / 'Qwen' / 'Qwen2.5-Math-7B'})")


@pytest.mark.parametrize("split,first,n", [("train", 0, 96), ("train[64:]", 64, 32), ("train[:64]", 0, 64),
                                           ("train[-8:]", 88, 8)])
def test_a_hub_dataset_is_read_from_the_mirror_with_its_slice(split, first, n):
    whole = load(DatasetSpec(path=MATH, name="default"), None, mirror=HUB)
    part = load(DatasetSpec(path=MATH, name="default", split=split, columns={"prompt": "problem", "answer": "solution"}),
                None, ("prompt", "answer"), mirror=HUB)
    assert len(part) == n
    assert part[0]["prompt"] == [{"role": "user", "content": whole[first]["problem"]}]


def test_a_dataset_without_a_config_name_is_under_default():
    ds = load(DatasetSpec(path="HuggingFaceH4/MATH-500", split="test"), None, ("problem", "answer"), mirror=HUB)
    assert len(ds) == 12


@pytest.mark.parametrize("spec,expected", [
    (DatasetSpec(path="HuggingFaceH4/MATH-500", split="train"), "HuggingFaceH4/MATH-500/default/train.jsonl"),
    (DatasetSpec(path=MATH, name="algebra", split="train[:5]"), f"{MATH}/algebra/train.jsonl"),
    (DatasetSpec(path="nobody/nothing"), "nobody/nothing/default/train.jsonl"),
])
def test_a_dataset_missing_from_the_mirror_is_an_error_naming_the_file(spec, expected):
    with pytest.raises(UserError) as err:
        load(spec, None, mirror=HUB)
    assert str(err.value) == f"dataset {spec.path!r}: not in the data mirror (expected {HUB / expected} or .parquet)"


def test_local_files_are_read_as_they_are_with_a_mirror(tmp_path):
    local = tmp_path / "rows.jsonl"
    local.write_text('{"prompt": "p", "answer": "1"}\n')
    assert len(load(str(local), None, ("prompt", "answer"), mirror=HUB)) == 1


def _flows(tmp_path: Path, mirror: str | None) -> Path:
    raw = yaml.safe_load((ROOT / "flows.yaml").read_text())
    if mirror is not None:
        raw["pipelines"][QWEN]["data_mirror"] = mirror
    path = tmp_path / "flows.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_flows_yaml_mirror_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "mirror").mkdir()
    _, pipe = load_config(_flows(tmp_path, "mirror")).get(QWEN)
    assert pipe.data_mirror == str(tmp_path / "mirror")


def test_the_command_line_mirror_overrides_flows_yaml_and_reaches_the_version_id(tmp_path, monkeypatch):
    monkeypatch.delenv("R1FLOW_DATA_MIRROR", raising=False)
    flows = _flows(tmp_path, None)
    _, plain = load_config(flows).get(QWEN)
    _, mirrored = load_config(flows, data_mirror=HUB).get(QWEN)
    monkeypatch.setenv("R1FLOW_DATA_MIRROR", str(HUB))
    _, from_env = load_config(flows).get(QWEN)
    assert plain.data_mirror is None and mirrored.data_mirror == from_env.data_mirror == str(HUB)
    # rows from a mirror may differ from the hub's: a different source is a different version
    assert identity_config(plain, "cold-start") != identity_config(mirrored, "cold-start")
    assert identity_config(mirrored, "cold-start")["data_mirror"] == str(HUB)


def test_a_mirror_that_is_not_a_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("R1FLOW_DATA_MIRROR", raising=False)
    with pytest.raises(UserError) as err:
        load_config(_flows(tmp_path, "no-such-mirror")).get(QWEN)
    assert str(err.value) == (f"pipelines.{QWEN}.data_mirror: {tmp_path / 'no-such-mirror'} is not a folder "
                              f"(expected a data mirror laid out by hub id)")


def test_a_pinned_dataset_revision_reaches_the_hub_loader_and_the_version_id(monkeypatch, tmp_path):
    import datasets

    seen = {}

    def fake_load(path, name=None, split=None, revision=None):
        seen.update(path=path, name=name, split=split, revision=revision)
        return datasets.Dataset.from_list([{"prompt": "p", "answer": "1"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    spec = DatasetSpec(path=MATH, name="default", split="train[64:]", revision="0a1b2c3")
    load(spec, None, ("prompt", "answer"))
    assert seen == {"path": MATH, "name": "default", "split": "train[64:]", "revision": "0a1b2c3"}
    raw = yaml.safe_load((ROOT / "flows.yaml").read_text())
    raw["pipelines"][QWEN]["stages"]["reasoning-rl"]["dataset"]["revision"] = "0a1b2c3"
    pinned = tmp_path / "flows.yaml"
    pinned.write_text(yaml.safe_dump(raw, sort_keys=False))
    _, pipe = load_config(pinned).get(QWEN)
    _, unpinned = load_config(ROOT / "flows.yaml").get(QWEN)
    assert identity_config(pipe, "reasoning-rl")["stage"]["dataset"]["revision"] == "0a1b2c3"
    assert identity_config(pipe, "reasoning-rl") != identity_config(unpinned, "reasoning-rl")
