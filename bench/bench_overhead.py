"""Pipeline overhead of re-running one stage: the bare stage work vs. the same stage through r1flow.

    OMP_NUM_THREADS=2 python bench/bench_overhead.py --stage cold-start [--pipeline tiny]

Needs the stage's upstream versions in the store (run the pipeline once first). In one run it times:
1. bare:  the stage module's `run(cfg, ctx)` plus the held-out evaluation, called directly into a
          temporary folder (no Prefect, no store, no CLI) — the stage's own work;
2. flow:  `stage_flow(..., force=True)` in this process (Prefect flow + task, store lookup, atomic
          version write with hashing, artifacts);
3. cli:   `r1flow stage NAME --force` as a fresh process (interpreter start, imports, Prefect's
          temporary API server, everything a user waits for).
and prints seconds and the ratio to the bare work. Forced re-runs register new versions; the bench
leaves them in the store (they are ordinary versions).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bare(loaded, pipeline: str, stage: str) -> float:
    from pipeline.config import stage_module
    from pipeline.flows import EVALUATED, resolve_upstream
    from pipeline.store import Store
    from stages.common import StageContext
    from stages.evaluate import evaluate

    _, pipe = loaded.get(pipeline)
    store = Store(loaded.storage_root(pipeline))
    parents = resolve_upstream(store, pipe, stage, None, None)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext(out_dir=Path(tmp) / "out", work_dir=Path(tmp) / "work",
                           inputs={s: store.require(v).path for s, v in parents.items()},
                           pipeline=pipe, seed=pipe.seed, device=pipe.device, parents=parents)
        ctx.out_dir.mkdir()
        t = time.perf_counter()
        stage_module(stage).run(pipe.stage_config(stage), ctx)
        if stage in EVALUATED:
            world = ctx.inputs.get("world", ctx.out_dir if stage == "world" else None)
            evaluate(str(ctx.out_dir / EVALUATED[stage]), pipe.eval, world)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="cold-start")
    ap.add_argument("--pipeline", default="tiny")
    ap.add_argument("--config", default=str(ROOT / "flows.yaml"))
    args = ap.parse_args()

    from pipeline.config import load_config
    from pipeline.flows import stage_flow

    loaded = load_config(args.config)
    rows = [("bare stage work (run + eval)", bare(loaded, args.pipeline, args.stage))]

    t = time.perf_counter()
    stage_flow(config_file=str(loaded.path), pipeline=args.pipeline, stage=args.stage, force=True)
    rows.append(("stage_flow in-process (Prefect + store)", time.perf_counter() - t))

    t = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "r1flow"), "--config", args.config, "--pipeline", args.pipeline,
                    "stage", args.stage, "--force"], check=True, env=os.environ.copy(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows.append(("r1flow stage --force (new process)", time.perf_counter() - t))

    base = rows[0][1]
    print(f"\nstage {args.stage}, pipeline {args.pipeline}, {os.environ.get('OMP_NUM_THREADS', '?')} threads")
    print(f"{'what':44s} {'seconds':>8s} {'x bare':>7s}")
    for name, sec in rows:
        print(f"{name:44s} {sec:8.1f} {sec / base:7.2f}")


if __name__ == "__main__":
    main()
