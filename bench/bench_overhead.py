"""Pipeline overhead of re-running one stage: the bare stage work vs. the same stage through r1flow.

    OMP_NUM_THREADS=2 python bench/bench_overhead.py --stage cold-start [--pipeline tiny]

Needs the stage's upstream versions in the store (run the pipeline once first). In one run it times:
1. bare:  the stage module's `run(cfg, ctx)` plus the held-out evaluation, called directly into a
          temporary folder (no Prefect, no store, no CLI) — the stage's own work;
2. flow:  `stage_flow(..., force=True)` in this process (Prefect flow + task, store lookup, atomic
          version write with hashing, artifacts);
3. cli:   `r1flow stage NAME --force` as a fresh process (interpreter start, imports, Prefect's
          temporary API server, everything a user waits for).
4. script: the bare stage work as a fresh process (`python bench/bench_overhead.py --bare-only`:
          interpreter start and imports, then 1.) -- what running the stage's own script costs;
5. cli+ui: `r1flow stage NAME --force` as a fresh process while a Prefect server (`r1flow ui`) is up,
          so the run reports to it instead of starting a temporary server.
For each it prints the wall time, the stage's own work inside that same run (run + eval, timed around
`run()` and `evaluate()`: for r1flow runs the `seconds` in the new version's manifest) and their ratio.
Comparing within a run keeps the training's run-to-run variation (often +-10% on a shared CPU) out of
the ratio; the overhead column is what the orchestration (or a fresh interpreter) adds.
Forced re-runs register new versions; the bench leaves them in the store (they are ordinary versions).
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
    ap.add_argument("--bare-only", action="store_true", help="only run the bare stage work (used for row 4)")
    args = ap.parse_args()

    from pipeline.config import load_config

    loaded = load_config(args.config)
    if args.bare_only:
        print(f"BARE_SECONDS {bare(loaded, args.pipeline, args.stage)}")
        return
    from pipeline import ui
    from pipeline.flows import stage_flow
    from pipeline.store import Store

    store = Store(loaded.storage_root(args.pipeline))
    cli = [str(Path(sys.executable).parent / "r1flow"), "--config", args.config, "--pipeline", args.pipeline,
           "stage", args.stage, "--force"]
    no_server = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    no_server["R1FLOW_STATE_DIR"] = tempfile.mkdtemp(prefix="r1flow-no-ui-")  # no `r1flow ui` record: temporary server

    def new_version_work() -> float:
        return float(store.latest(args.stage).metrics["seconds"])

    def timed_cli(env) -> tuple[float, float]:
        t = time.perf_counter()
        subprocess.run(cli, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t, new_version_work()

    rows = []
    work = bare(loaded, args.pipeline, args.stage)
    rows.append(("1. bare stage work (run + eval), in-process", work, work))

    t = time.perf_counter()
    stage_flow(config_file=str(loaded.path), pipeline=args.pipeline, stage=args.stage, force=True)
    rows.append(("2. stage_flow in-process (Prefect + store)", time.perf_counter() - t, new_version_work()))

    rows.append(("3. r1flow stage --force (new process)", *timed_cli(no_server)))

    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--config", args.config, "--pipeline", args.pipeline,
                          "--stage", args.stage, "--bare-only"], check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    rows.append(("4. bare stage work as a script (new process)", wall, float(out.split("BARE_SECONDS")[-1])))

    with tempfile.TemporaryDirectory() as home:
        port = ui.free_port()
        server = ui.start_server(port=port, home=Path(home))
        try:
            rows.append(("5. r1flow stage --force, `r1flow ui` up (new process)",
                         *timed_cli({**os.environ, "PREFECT_API_URL": ui.api_url(port)})))
        finally:
            ui.stop_server(server)

    print(f"\nstage {args.stage}, pipeline {args.pipeline}, {os.environ.get('OMP_NUM_THREADS', '?')} threads")
    print(f"{'what':56s} {'wall s':>7s} {'work s':>7s} {'overhead s':>10s} {'wall/work':>9s}")
    for name, wall, work in rows:
        print(f"{name:56s} {wall:7.1f} {work:7.1f} {wall - work:10.1f} {wall / work:9.2f}")


if __name__ == "__main__":
    main()
