"""Stage 3: keep-best-K, length histogram, funnel rows, config validation (fast); and, on a small tiny
world with a real stage-2 stand-in, vLLM CPU generation inside the stage, the judge with its guard, the
written dataset and its card, and SFT (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from stages import rejection_sft
from stages.rejection_sft import Config, judge_funnel_rows, length_histogram, select_best


def _r(pid, reward, tokens, rejected_by=None):
    return {"prompt_id": pid, "reward": reward, "num_tokens": tokens, "rejected_by": rejected_by}


RESULTS = [_r(0, 1.5, 40), _r(0, 1.5, 30), _r(0, 1.0, 10), _r(0, 2.0, 90, "format"),
           _r(1, 0.5, 20), _r(2, 1.5, 50, "correct"), _r(3, 1.0, 60), _r(3, 1.5, 70)]


@pytest.mark.parametrize("k, prefer, expected", [
    (1, "reward_then_shortest", [(0, 30), (1, 20), (3, 70)]),
    (2, "reward_then_shortest", [(0, 30), (0, 40), (1, 20), (3, 70), (3, 60)]),
    (3, "reward_then_shortest", [(0, 30), (0, 40), (0, 10), (1, 20), (3, 70), (3, 60)]),
    (1, "shortest", [(0, 10), (1, 20), (3, 60)]),
    (5, "shortest", [(0, 10), (0, 30), (0, 40), (1, 20), (3, 60), (3, 70)]),
])
def test_select_best(k, prefer, expected):
    assert [(r["prompt_id"], r["num_tokens"]) for r in select_best(RESULTS, k, prefer)] == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_best_random_keeps_only_accepted_and_is_seeded(seed):
    kept = select_best(RESULTS, 2, "random", seed)
    assert all(r["rejected_by"] is None for r in kept)
    assert [r["prompt_id"] for r in kept] == [0, 0, 1, 3, 3]
    assert kept == select_best(RESULTS, 2, "random", seed)


@pytest.mark.parametrize("lengths, bins, expected", [
    ([], 8, []),
    ([5], 8, [("5-5", 1)]),
    ([5, 5, 5], 4, [("5-5", 3)]),
    ([0, 1, 2, 3], 2, [("0-1", 2), ("2-3", 2)]),
    ([10, 19, 20, 29, 30], 2, [("10-20", 3), ("21-31", 2)]),
    ([1, 100], 4, [("1-25", 1), ("26-50", 0), ("51-75", 0), ("76-100", 1)]),
])
def test_length_histogram(lengths, bins, expected):
    rows = length_histogram(lengths, bins)
    assert [(r["bin"], r["count"]) for r in rows] == expected
    assert sum(r["count"] for r in rows) == len(lengths)
    assert len(rows) <= bins


def test_judge_funnel_rows():
    base = [{"step": "generated", "remaining": 10, "rejected": 0}, {"step": "format", "remaining": 7, "rejected": 3}]
    rows = judge_funnel_rows(base, n_judged=2, n_judge_rejected=1, n_kept=4)
    assert [(r["remaining"], r["rejected"]) for r in rows] == [(10, 0), (7, 3), (6, 1), (4, 2)]
    assert rows[2]["step"] == "judge (2 judged)"
    assert base[-1] == {"step": "format", "remaining": 7, "rejected": 3}  # input left alone


@pytest.mark.parametrize("override, problem", [
    ({"trainer": {"output_dir": "x"}}, "set by r1flow"),
    ({"trainer": {"learning_rte": 1e-3}}, "not a field of trl.SFTConfig"),
    ({"keep_per_prompt": 0}, "greater than or equal to 1"),
    ({"prefer": "longest"}, "reward_then_shortest"),
    ({"start_from": "cold-start"}, "'base' or 'reasoning-rl'"),
    ({"judge": {"guard_max_accept_share": 1.5}}, "less than or equal to 1"),
    ({"judge": {"on_guard_fail": "ignore"}}, "'stop' or 'rules-only'"),
    ({"generation": {"backend": "tgi"}}, "'transformers' or 'vllm'"),
    ({"filters": {"order": ["format", "nonsense"]}}, "unknown filter"),
    ({"general_ratio": -1}, "greater than or equal to 0"),
    ({"keep_best": 2}, "Extra inputs are not permitted"),
])
def test_config_rejects(override, problem):
    with pytest.raises(ValidationError, match=problem):
        Config(**override)


def test_config_defaults_and_merge():
    cfg = Config(trainer={"num_train_epochs": 1}, judge=None)
    assert cfg.generation.backend == "vllm" and cfg.generation.n > 1
    assert cfg.trainer["num_train_epochs"] == 1 and "learning_rate" in cfg.trainer  # merged over defaults
    assert cfg.judge is None and Config().judge.model == "world:judge"
    assert Config().start_from == "base"


# ------------------------------------------------------------------------------------ end to end (slow)

from stages.common import Reporter, StageContext, UserError  # noqa: E402
from test_judge import always_accept_judge, base_world, cache_dir, small_world  # noqa: E402,F401  (shared fixtures)


class Recorder(Reporter):
    """A real Reporter that keeps what the stage publishes, so the test can read it back."""

    def __init__(self):
        self.tables, self.markdowns, self.links, self.warnings, self.progress_values = {}, {}, {}, {}, []

    def progress(self, fraction, message=""):
        self.progress_values.append(fraction)

    def table(self, key, rows, description=""):
        self.tables[key] = (rows, description)

    def markdown(self, key, text, description=""):
        self.markdowns[key] = text

    def link(self, key, target, description=""):
        self.links[key] = target

    def warning(self, key, text):
        self.warnings[key] = text


class Pipe:
    """The two pipeline settings a stage reads (`base_model`, `trust_remote_code`)."""

    base_model = "world:base_model"
    trust_remote_code = False


@pytest.fixture(scope="session")
def policy_version(request, base_world) -> Path:
    """Stand-in for a reasoning-rl version: the cold-start stage run on the small world (real TRL SFT)."""
    from stages import cold_start_sft

    out = cache_dir(request, "policy", "stages/tiny/world.py", "stages/cold_start_sft.py") / "version"
    if not (out / "model" / "config.json").is_file():
        ctx = StageContext(out_dir=out, work_dir=out.parent / "work", inputs={"world": base_world}, pipeline=Pipe(),
                           seed=0)
        cold_start_sft.run(cold_start_sft.Config(trainer={"num_train_epochs": 6, "save_steps": 1000}), ctx)
    return out


def _ctx(tmp_path, world, policy_version, reporter=None):
    return StageContext(out_dir=tmp_path / "out", work_dir=tmp_path / "work",
                        inputs={"world": world, "reasoning-rl": policy_version}, pipeline=Pipe(), seed=0,
                        reporter=reporter or Recorder(), version_id="rejection-sft-test",
                        parents={"world": "world-test", "reasoning-rl": "reasoning-rl-test"})


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


SMALL = dict(prompts={"path": "world:rl_prompts", "limit": 24}, keep_per_prompt=2, general_ratio=0.5,
             trainer={"num_train_epochs": 1, "save_steps": 1000, "logging_steps": 2})


@pytest.mark.slow
def test_run_end_to_end_with_vllm(tmp_path, small_world, policy_version):
    rec = Recorder()
    cfg = Config(**SMALL, generation={"backend": "vllm", "n": 4, "temperature": 0.8, "max_new_tokens": 96},
                 judge={"generation": {"backend": "transformers", "temperature": 0, "max_new_tokens": 96},
                        "cross_check": 24})
    ctx = _ctx(tmp_path, small_world, policy_version, rec)
    metrics = rejection_sft.run(cfg, ctx)
    out = ctx.out_dir

    train, rejected = _read(out / "data" / "train.jsonl"), _read(out / "data" / "rejected.jsonl")
    reasoning = [r for r in train if r["source"] == "reasoning"]
    assert metrics["generation"]["backend"] == "vllm" and metrics["n_generated"] == 24 * 4
    assert len(reasoning) + len(rejected) == metrics["n_generated"]
    assert len(reasoning) >= 1 and metrics["n_general"] == round(0.5 * len(reasoning))
    assert metrics["kept_correct_share"] >= 0.99
    from stages.rewards import extract_answer, verify_answer
    answers = {i: row["answer"] for i, row in enumerate(_read(small_world / "data" / "rl_prompts.jsonl")[:24])}
    for r in reasoning:  # every kept sample is correct by the rule verifier (the judge decided none here)
        assert verify_answer(answers[r["prompt_id"]], extract_answer(r["completion"][0]["content"])) or r["judged"]
    per_prompt = {}
    for r in reasoning:
        per_prompt[r["prompt_id"]] = per_prompt.get(r["prompt_id"], 0) + 1
    assert max(per_prompt.values()) <= 2
    assert all(r["rejected_by"] and r["reason"] for r in rejected)

    # the card matches the files
    from huggingface_hub import DatasetCard
    card = DatasetCard.load(out / "data" / "README.md")
    meta = card.data.to_dict()["r1flow"]
    assert meta["n_train"] == len(train) and meta["n_reasoning"] == len(reasoning)
    assert meta["n_rejected"] == len(rejected) and meta["n_general"] == len(train) - len(reasoning)
    funnel = meta["funnel"]
    assert funnel[0] == {"step": "generated", "remaining": 24 * 4, "rejected": 0}
    assert funnel[-1]["remaining"] == len(reasoning)
    counts = {}
    for r in rejected:
        counts[r["rejected_by"]] = counts.get(r["rejected_by"], 0) + 1
    for row in funnel[1:]:
        name = {"kept (best per prompt)": "keep-best"}.get(row["step"], row["step"].split(" (")[0])
        assert row["rejected"] == counts.get(name, 0), row
    assert f"| **train.jsonl total** | **{len(train)}** |" in card.text
    assert f"| rejected.jsonl | {len(rejected)} |" in card.text
    for row in funnel:
        assert f"| {row['step']} | {row['remaining']} | {row['rejected']} |" in card.text
    assert sum(h["count"] for h in meta["length_histogram"]) == len(reasoning)
    assert "`reasoning-rl-test`" in card.text and meta["sources"]["world"] == "world-test"

    # the judge ran behind its guard; the report has the funnel, samples, canaries and the card link
    assert metrics["judge"]["guard"]["passed"] and metrics["judge"]["cross_checked"] == 24
    assert metrics["judge"]["agreement"] is not None
    assert {"funnel", "accepted-samples", "rejected-samples", "judge-canaries"} <= set(rec.tables)
    assert len(rec.tables["judge-canaries"][0]) == 5 * cfg.judge.guard_examples
    # the card is shown as text: a link would point into the staging folder, gone once the version is registered
    assert rec.markdowns["data-card"] == card.text and "| rejected.jsonl |" in rec.markdowns["data-card"]
    assert not any(str(out) in str(target) for target in rec.links.values()), rec.links
    assert rec.progress_values and max(rec.progress_values) == 1.0
    # SFT started from the base model and wrote a loadable checkpoint
    assert (out / "model" / "model.safetensors").is_file() and metrics["start_from"] == "base"
    assert metrics["sft"]["num_examples"] == len(train)


@pytest.mark.slow
def test_run_stops_on_a_judge_that_accepts_everything(tmp_path, small_world, policy_version, always_accept_judge):
    judge_cfg = {"model": str(always_accept_judge), "cross_check": 8,
                 "generation": {"backend": "transformers", "temperature": 0, "max_new_tokens": 96}}
    cfg = Config(**SMALL, generation={"backend": "transformers", "n": 2, "max_new_tokens": 96}, judge=judge_cfg)
    with pytest.raises(UserError) as err:
        rejection_sft.run(cfg, _ctx(tmp_path, small_world, policy_version))
    message = str(err.value)
    assert "judge guard failed" in message
    for name in ("gibberish", "repeated-token", "bare-answer", "wrong-answer", "injection"):
        assert name in message

    # rules-only: the stage goes on without the judge, and says so
    rec = Recorder()
    cfg = Config(**{**SMALL, "trainer": {"max_steps": 2}}, generation={"backend": "transformers", "n": 2,
                 "max_new_tokens": 96}, judge={**judge_cfg, "on_guard_fail": "rules-only"})
    metrics = rejection_sft.run(cfg, _ctx(tmp_path / "b", small_world, policy_version, rec))
    assert metrics["judge"]["mode"] == "rules-only (guard failed)"
    assert "judge guard failed" in rec.warnings["judge-guard"]
    assert metrics["kept_correct_share"] >= 0.99


def test_a_bad_general_dataset_fails_before_generation(tmp_path, monkeypatch):
    """The general rows are loaded first: a general dataset without a `completion` column is named before
    any sample is generated or judged (it used to be loaded only after both)."""
    from stages import rejection_sft

    world = tmp_path / "world"
    (world / "data").mkdir(parents=True)
    (world / "data" / "rl_prompts.jsonl").write_text(
        json.dumps({"prompt": [{"role": "user", "content": "What is 1 + 2?"}], "answer": "3"}) + "\n")
    (world / "data" / "general_sft.jsonl").write_text(
        json.dumps({"prompt": [{"role": "user", "content": "Hello!"}], "reply": "Hi."}) + "\n")
    policy = tmp_path / "rl"
    (policy / "model").mkdir(parents=True)
    (policy / "model" / "config.json").write_text("{}")

    def generate(*args, **kwargs):
        raise AssertionError("generation started before the general dataset was checked")

    monkeypatch.setattr(rejection_sft, "_generate_samples", generate)
    cfg = Config(prompts="world:rl_prompts", general="world:general_sft")
    with pytest.raises(UserError, match="completion"):
        rejection_sft.run(cfg, _ctx(tmp_path, world, policy))
