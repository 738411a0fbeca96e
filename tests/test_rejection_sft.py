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
