"""Stage 3's sampling in shards (issue 16): 1 shard in-process vs 1 and 2 shards as Prefect tasks on a local Ray,

    .venv/bin/python bench/bench_shards.py [--model DIR] [--prompts FILE] [--limit 48] [--n 4] [--max-new-tokens 64]

on the `smol` stage-2 model and its RL prompts by default (the newest reasoning-rl and world versions under
runs/smol: run `r1flow run smol` first, or pass --model/--prompts), with the transformers backend. Each way
generates the same prompts through `stages.rejection_sft.generate_shard`, the function the stage hands to its
shard runner, and prints: seconds (wall, including Ray start and worker imports), samples/s, tokens/s, the ratio
of samples/s to in-process, and whether the samples equal the in-process ones exactly. On this 2-core machine
one in-process shard uses both cores (2 torch threads) and each Ray shard reserves one, so 2 shards measure the
mechanics and the overhead of Ray, not a speed-up; on a GPU node each shard has its own GPU (`num_gpus: 1`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def newest(pattern: str) -> Path | None:
    found = sorted((ROOT / "runs" / "smol" / "versions").glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: newest smol reasoning-rl)")
    ap.add_argument("--prompts", type=Path, default=None, help="jsonl with a `prompt` column (default: smol rl_prompts)")
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    model = args.model or (newest("reasoning-rl-*") / "model" if newest("reasoning-rl-*") else None)
    prompts_file = args.prompts or (newest("world-*") / "data" / "rl_prompts.jsonl" if newest("world-*") else None)
    if model is None or prompts_file is None or not prompts_file.is_file():
        sys.exit("bench_shards: no smol versions under runs/smol (run `r1flow run smol`) and no --model/--prompts")

    from pipeline.config import ShardsConfig
    from pipeline.shards import shard_mapper
    from stages.common import R1_SYSTEM_PROMPT, add_system_prompt, map_in_process
    from stages.generation import GenerationConfig, shard_bounds
    from stages.rejection_sft import generate_shard

    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()[: args.limit]]
    prompts = [add_system_prompt(r["prompt"], R1_SYSTEM_PROMPT) for r in rows]
    gen = GenerationConfig(backend="transformers", n=args.n, temperature=0.8, top_p=0.95,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, dtype="bfloat16")

    def jobs(count: int) -> list[dict]:
        return [{"model": str(model), "prompts": prompts[a:b], "generation": gen.model_dump(mode="json"),
                 "first_index": a, "trust_remote_code": False} for a, b in shard_bounds(len(prompts), gen.batch_size, count)]

    ways = [("in-process", 1, map_in_process),
            ("ray", 1, shard_mapper(ShardsConfig(count=1, runner="ray", num_cpus=2))),
            ("ray", 2, shard_mapper(ShardsConfig(count=2, runner="ray", num_cpus=1)))]
    results, base = [], None
    for runner, count, mapper in ways:
        t0 = time.time()
        out = [recs for shard in mapper(generate_shard, jobs(count)) for recs in shard]
        seconds = time.time() - t0
        samples = sum(len(r) for r in out)
        tokens = sum(x["num_tokens"] for r in out for x in r)
        base = base or (out, samples / seconds)
        results.append({"runner": runner, "shards": count, "seconds": round(seconds, 1),
                        "samples/s": round(samples / seconds, 2), "tokens/s": round(tokens / seconds, 1),
                        "ratio": round(samples / seconds / base[1], 2), "same samples": out == base[0]})
        print(f"done: {results[-1]}", file=sys.stderr, flush=True)
    print(f"\nmodel {model.parent.name}, {len(prompts)} prompts x {args.n} samples, <= {args.max_new_tokens} new tokens, "
          f"batches of {args.batch_size}, transformers bf16\n")
    keys = list(results[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in results:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    print("\nfirst sample:", json.dumps(base[0][0][0]["text"][:300]))


if __name__ == "__main__":
    main()
