"""A stage launched as a child process group vs in-process (issue 16): the tiny cold start from one world version,

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_launch.py [--steps 100] [--batch 16] [--out /tmp/bench-launch]

run three ways in one process, one after the other:
1. in-process:      `run(cfg, ctx)` inside the stage task (the default launcher);
2. accelerate x1:   `accelerate launch --num_processes 1` (the cost of the child process: interpreter start,
                    imports, config reload, the hand-off);
3. accelerate x2:   two gloo processes (DDP on CPU), each with half of every batch (same rows per step).
It prints, per way: the wall seconds of the whole stage (launch, training, saving, held-out evaluation, version
write) and the seconds inside `run` (training and saving, on the main rank), training samples/s (the trainer's own `train_samples_per_second`: all ranks' rows per second), final training
loss, held-out pass@1 and format rate, and each one's ratio to in-process. On a 2-core machine the two gloo
processes share the cores the single process used, so x2 measures the mechanics and its overhead, not a speed-up
(on a GPU node each rank has its own device).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORLD = {"n_cold_start": 300, "n_rl_prompts": 64, "n_eval": 16, "n_general_sft": 24, "n_general_prompts": 16,
         "n_general_eval": 8, "n_preference": 64, "pretrain_steps": 60, "pretrain_corpus_lines": 2000,
         "pretrain_batch_size": 16, "pretrain_seq_len": 128, "judge": False}


def write_config(out: Path, steps: int, batch: int) -> Path:
    raw = yaml.safe_load((ROOT / "flows.yaml").read_text())
    tiny = raw["pipelines"]["tiny"]
    tiny["world"].update(WORLD)
    tiny["eval"].update({"limit": 32, "k": 4, "max_new_tokens": 96})
    tiny["storage_root"] = str(out / "store")
    # cosine decay, as in tests/test_launch.py: at the tiny default's constant rate the held-out format rate of the
    # last step swings between runs at the same loss
    tiny["stages"]["cold-start"]["trainer"].update({"max_steps": steps, "per_device_train_batch_size": batch,
                                                    "save_steps": steps, "logging_steps": 10,
                                                    "lr_scheduler_type": "cosine", "warmup_steps": 5})
    pipes = {"in-process": tiny}
    for n in (1, 2):
        p = copy.deepcopy(tiny)
        p["stages"]["cold-start"]["launcher"] = {"kind": "accelerate", "num_processes": n}
        p["stages"]["cold-start"]["trainer"]["per_device_train_batch_size"] = batch // n
        pipes[f"accelerate-x{n}"] = p
    path = out / "flows.yaml"
    path.write_text(yaml.safe_dump({"default": "in-process", "pipelines": pipes}, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16, help="rows per optimizer step (split over the processes)")
    ap.add_argument("--out", default="/tmp/bench-launch")
    args = ap.parse_args()
    from pipeline.config import load_config
    from pipeline.flows import execute_stage
    from pipeline.store import Store

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_config(write_config(out, args.steps, args.batch))
    execute_stage(loaded, "in-process", "world")
    store, rows = Store(out / "store"), []
    for name in ("in-process", "accelerate-x1", "accelerate-x2"):
        t = time.monotonic()
        row = execute_stage(loaded, name, "cold-start", force=True)
        wall = time.monotonic() - t
        v = store.get(row["version"])
        m, ev = v.metrics, v.metrics["eval"]
        end = next(h for h in reversed(m["history"]) if "train_samples_per_second" in h)
        world = (m.get("launcher") or {}).get("world_size", 1)
        rows.append({"way": name, "world size": world, "run s": m["runtime_s"], "wall s": round(wall, 1),
                     "samples/s": round(end["train_samples_per_second"], 1), "final loss": m["final_loss"],
                     "pass@1": ev["pass@1"], "format": ev["format_rate"]})
    base = rows[0]
    print(f"\ntiny cold start, {args.steps} steps of {args.batch} rows, eval 32 prompts x 4 samples\n")
    print("| way | world size | wall s | ratio | inside run s | samples/s | ratio | final loss | pass@1 | format |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['world size']} | {r['wall s']} | {r['wall s'] / base['wall s']:.2f} | {r['run s']} | "
              f"{r['samples/s']} | {r['samples/s'] / base['samples/s']:.2f} | {r['final loss']:.3f} | "
              f"{r['pass@1']:.3f} | {r['format']:.3f} |")


if __name__ == "__main__":
    main()
