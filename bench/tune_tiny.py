"""Run the tiny world's stages 0-2 outside Prefect and print held-out eval after each.

    python bench/tune_tiny.py --root /tmp/tiny [--stages world,base,cold-start,reasoning-rl]
        [--world '{"n_cold_start": 500}'] [--sft '{"trainer": {...}}'] [--rl '{...}'] [--eval '{...}']

Each stage writes to ROOT/<stage>/ (a stage is skipped when its folder already holds a model, so
you can re-tune one stage); the eval results go to ROOT/results.json.
"""

import argparse
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

from stages import cold_start_sft, evaluate, reasoning_rl
from stages.tiny import world
from stages.common import StageContext


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--stages", default="world,base,cold-start,reasoning-rl")
    ap.add_argument("--seed", type=int, default=0)
    for name in ("world", "sft", "rl", "eval"):
        ap.add_argument(f"--{name}", default="{}", help="JSON overrides of the stage config")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    root = Path(a.root)
    stages = a.stages.split(",")
    pipeline = SimpleNamespace(base_model="world:base_model")
    results_file = root / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    wdir = root / "world"
    ecfg = evaluate.Config(**json.loads(a.eval))

    def ctx(name, inputs):
        return StageContext(out_dir=root / name, work_dir=root / f"{name}.work", inputs=inputs, pipeline=pipeline,
                            seed=a.seed, parents={k: str(v) for k, v in inputs.items()})

    def record(name, metrics, model):
        t = time.time()
        ev = evaluate.evaluate(str(model), ecfg, wdir)
        results[name] = {"train": {k: v for k, v in metrics.items() if k != "history"},
                         "eval": {k: v for k, v in ev.items() if k != "samples"}, "samples": ev["samples"][:3]}
        results_file.write_text(json.dumps(results, indent=1, ensure_ascii=False))
        print(f"== {name}: pass@1 {ev['pass@1']:.3f} greedy {ev['greedy_accuracy']} format {ev['format_rate']:.3f} "
              f"tokens {ev['mean_completion_tokens']:.1f} (eval {time.time() - t:.0f}s) train {results[name]['train']}",
              flush=True)

    if "world" in stages and not (wdir / "base_model").exists():
        m = world.run(world.Config(**json.loads(a.world)), ctx("world", {}))
        print("== world", {k: v for k, v in m.items() if k not in ("history", "sha256")}, flush=True)
    if "base" in stages:
        record("base", {}, wdir / "base_model")
    if "cold-start" in stages:
        c = ctx("cold-start", {"world": wdir})
        m = cold_start_sft.run(cold_start_sft.Config(**json.loads(a.sft)), c)
        record("cold-start", m, root / "cold-start" / "model")
    if "reasoning-rl" in stages:
        c = ctx("reasoning-rl", {"world": wdir, "cold-start": root / "cold-start"})
        m = reasoning_rl.run(reasoning_rl.Config(**json.loads(a.rl)), c)
        record("reasoning-rl", m, root / "reasoning-rl" / "model")


if __name__ == "__main__":
    main()
