"""Generation throughput of both backends (vLLM, transformers) on the same model and prompts, in one run.

    OMP_NUM_THREADS=2 python bench/bench_generation.py --model runs/tiny/world-.../base_model \
        --prompts runs/tiny/world-.../data/rl_prompts.jsonl --num-prompts 64 --n 4 --max-new-tokens 128

Both go through `stages.generation.generate`, the code the stages run. Prints one row per backend:
sequences, generated tokens, wall seconds including model load / engine start, seconds inside the
backends' own generate calls (timed by wrapping `vllm.LLM.generate` and transformers'
`GenerationMixin.generate`), tokens/s for both, then the vLLM / transformers ratios. Sampling settings
are identical; each backend generates until the model stops or max_new_tokens, and tokens/s counts the
tokens actually generated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load_prompts(path: str | None, num: int) -> list:
    if path is None:
        return [[{"role": "user", "content": f"What is {100 + 7 * i} + {35 + 3 * i}?"}] for i in range(num)]
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows[:num]]


def timed(cls, name: str, clock: dict) -> None:
    """Wrap `cls.name` so the seconds spent inside it add up in clock["s"]."""
    inner = getattr(cls, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            clock["s"] += time.perf_counter() - t

    setattr(cls, name, wrapper)


def bench(backend: str, model: str, prompts: list, args) -> dict:
    from stages.generation import GenerationConfig, generate  # noqa: PLC0415

    cfg = GenerationConfig(backend=backend, n=args.n, temperature=args.temperature, top_p=0.95,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=0,
                           dtype=args.dtype, max_model_len=args.max_model_len)
    if backend == "transformers":  # warm-up: first-call overheads (threads, allocator) out of the timing
        generate(model, prompts[:2], cfg.model_copy(update={"n": 1, "max_new_tokens": 4}))
    CLOCK[backend]["s"] = 0.0
    t0 = time.perf_counter()
    out = generate(model, prompts, cfg)
    total = time.perf_counter() - t0
    tokens = sum(r["num_tokens"] for recs in out for r in recs)
    seqs = sum(len(recs) for recs in out)
    return {"backend": backend, "sequences": seqs, "tokens": tokens, "total_s": total, "gen_s": CLOCK[backend]["s"]}


CLOCK = {"vllm": {"s": 0.0}, "transformers": {"s": 0.0}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder (e.g. a tiny world's base_model)")
    p.add_argument("--prompts", help="jsonl with a `prompt` column (default: synthetic addition prompts)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256, help="prompts per generate call")
    p.add_argument("--backends", default="vllm,transformers")
    p.add_argument("--dtype", default="float32", help="weights dtype of both backends (float32, bfloat16)")
    p.add_argument("--max-model-len", type=int, default=512, help="vLLM: longest prompt + completion")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from transformers.generation.utils import GenerationMixin  # noqa: PLC0415
    from vllm import LLM  # noqa: PLC0415

    timed(LLM, "generate", CLOCK["vllm"])
    timed(GenerationMixin, "generate", CLOCK["transformers"])
    prompts = load_prompts(args.prompts, args.num_prompts)
    rows = [bench(backend, args.model, prompts, args) for backend in args.backends.split(",")]
    print(f"\nmodel {args.model}; {len(prompts)} prompts x {args.n} samples, max_new_tokens {args.max_new_tokens}, "
          f"temperature {args.temperature}, {args.dtype}, OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS')}")
    print(f"{'backend':<14}{'sequences':>10}{'tokens':>9}{'wall s':>9}{'gen s':>9}{'tok/s wall':>12}{'tok/s gen':>11}")
    for r in rows:
        print(f"{r['backend']:<14}{r['sequences']:>10}{r['tokens']:>9}{r['total_s']:>9.1f}{r['gen_s']:>9.1f}"
              f"{r['tokens'] / r['total_s']:>12.0f}{r['tokens'] / max(r['gen_s'], 1e-9):>11.0f}")
    by = {r["backend"]: r for r in rows}
    if "vllm" in by and "transformers" in by:
        v, t = by["vllm"], by["transformers"]
        print(f"ratio vLLM / transformers tokens/s: {(v['tokens'] / v['gen_s']) / (t['tokens'] / t['gen_s']):.2f}x "
              f"generating, {(v['tokens'] / v['total_s']) / (t['tokens'] / t['total_s']):.2f}x including "
              f"model load / engine start")


if __name__ == "__main__":
    main()
