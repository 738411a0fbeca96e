"""Build the tiny judge on an existing tiny world with different phase lengths and print a table: seconds,
held-out agreement with the rule verifier (overall and on near misses), canary acceptance.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_tiny_judge.py --world runs/tiny/versions/world-... \
        --drill 800,400 [--full 300]

Each row copies the world's base model and data into a temporary folder and runs
`stages.tiny.judge.build_tiny_judge` there (the world version is never touched). Run on an idle machine:
seconds are wall-clock.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

from stages.tiny.judge import TINY_JUDGE_PHASES, build_tiny_judge


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", required=True, help="a tiny world version folder (base_model/, data/)")
    ap.add_argument("--drill", default=str(TINY_JUDGE_PHASES["drill"]["max_steps"]), help="comma-separated steps")
    ap.add_argument("--full", default=str(TINY_JUDGE_PHASES["full"]["max_steps"]), help="steps of the full phase")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    world = Path(a.world)
    rows = []
    for drill in [int(s) for s in a.drill.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "world"
            copy.mkdir()
            for part in ("base_model", "data"):
                shutil.copytree(world / part, copy / part)
            m = build_tiny_judge(copy, a.seed, phases={"drill": {"max_steps": drill}, "full": {"max_steps": int(a.full)}})
        rows.append({"drill": drill, "full": int(a.full), "seconds": m["seconds"], "agreement": m["heldout_agreement"],
                     "near-miss": m["agreement_by_kind"].get("near-miss"), "canary accept": m["canary_accept_share"],
                     "drill loss": None if m["drill_final_loss"] is None else round(m["drill_final_loss"], 3)})
        print(rows[-1], flush=True)
    base = rows[0]["seconds"]
    print("\n| drill steps | full steps | seconds | x first row | agreement | near-miss | canary accept | drill loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['drill']} | {r['full']} | {r['seconds']:.0f} | {r['seconds'] / base:.2f} | {r['agreement']:.3f} | "
              f"{r['near-miss']} | {r['canary accept']} | {r['drill loss']} |")


if __name__ == "__main__":
    main()
