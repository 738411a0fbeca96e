"""The `smol` pipeline end to end (SmolLM2-135M-Instruct on reasoning-gym), measured: one row per stage with
held-out pass@1, format rate, mean completion length, wall seconds and the stage's share of the total,
plus training tokens/s per stage (from the trainers' logs) and the reward-model score next to the length.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_smol.py                 # the real run (hours on 2 cores)
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_smol.py --rehearse      # the same, shrunk (minutes)
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_smol.py --report-only   # print the table of the last run

It runs `r1flow run smol` (cached stages are reused: pass `--force` to re-run them) and then reads the
versions' manifests. Generation throughput of vLLM vs transformers on this model is measured by
`bench/bench_generation.py --model <world version>/base_model --dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def training_tokens_per_s(metrics: dict) -> float | None:
    """Tokens trained per second, from the trainer's log (`num_tokens` at the end / train runtime)."""
    history = metrics.get("history") or metrics.get("sft", {}).get("history") or []
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h]
    runtime = [h["train_runtime"] for h in history if "train_runtime" in h]
    if tokens and runtime and runtime[-1]:
        return tokens[-1] / runtime[-1]
    return None


def table(config: str, pipeline: str, rehearse: bool, summary: list[dict]) -> str:
    from pipeline.config import load_config  # noqa: PLC0415
    from pipeline.store import Store  # noqa: PLC0415

    loaded = load_config(config, rehearse=rehearse)
    store = Store(loaded.storage_root(pipeline))
    total = sum(r["seconds"] for r in summary) or 1.0
    lines = ["| stage | version | pass@1 | greedy | format | mean tokens | seconds | share | train tok/s | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary:
        v = store.get(row["version"])
        m, ev = v.metrics, v.metrics.get("eval", {})
        notes = []
        if row["stage"] == "world" and m.get("self_samples"):
            ss = m["self_samples"]
            notes.append(f"self-samples {ss['samples']} at {ss['tokens_per_s']} tok/s ({ss['backend']})")
            notes.append("rows " + ", ".join(f"{k} {n}" for k, n in m["sizes"].items()))
        if m.get("verifier_agreement"):
            va = m["verifier_agreement"]
            notes.append(f"accuracy vs task verifier: {va['agree']}/{va['n']} agree")
        if "funnel" in m:
            notes.append(f"kept {m['n_reasoning']} of {m['n_generated']}; judge: {m['judge']['mode']}")
            notes.append(f"generation {m['generation']['tokens_per_s']} tok/s ({m['generation']['backend']})")
        if "heldout_pairwise_accuracy" in m:
            notes.append(f"held-out pairwise accuracy {m['heldout_pairwise_accuracy']}")
        if "heldout_rm_score_before" in m:
            d = m.get("heldout_rm_detail", {})
            notes.append(f"RM score {m['heldout_rm_score_before']} -> {m['heldout_rm_score_after']}, length "
                         f"{d.get('before', {}).get('mean_tokens', '?'):.1f} -> {d.get('after', {}).get('mean_tokens', '?'):.1f} tokens")
        tps = training_tokens_per_s(m)

        def f(x, fmt="{:.3f}"):
            return "–" if x is None or x == "" else fmt.format(x)

        lines.append(f"| {row['stage']} | `{row['version']}` | {f(ev.get('pass@1'))} | {f(ev.get('greedy_accuracy'))} | "
                     f"{f(ev.get('format_rate'))} | {f(ev.get('mean_completion_tokens'), '{:.1f}')} | "
                     f"{row['seconds']:.0f} | {row['seconds'] / total:.0%} | {f(tps, '{:.0f}')} | {'; '.join(notes)} |")
    lines.append(f"\ntotal {total:.0f} s")
    samples = []
    for row in summary:
        ev = store.get(row["version"]).metrics.get("eval", {})
        for smp in ev.get("samples", [])[:2]:
            samples.append(f"- {row['stage']}: `{smp['prompt'][-80:]!s}` -> `{str(smp['completion'])[:160]}` "
                           f"(gold {smp['answer']}, correct {smp['correct']})")
    return "\n".join(lines + ["", "Samples (held-out, first of k):"] + samples)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "flows.yaml"))
    p.add_argument("--pipeline", default="smol")
    p.add_argument("--rehearse", action="store_true")
    p.add_argument("--force", nargs="*", default=None, help="stages to re-run even if cached")
    p.add_argument("--report-only", action="store_true", help="print the table of the last run's summary")
    args = p.parse_args()
    summary_path = ROOT / "runs" / f"{args.pipeline}{'-rehearse' if args.rehearse else ''}-summary.json"
    if not args.report_only:
        cmd = [sys.executable, "-m", "pipeline.cli", "--config", args.config, "run", args.pipeline,
               "--summary-json", str(summary_path)] + (["--rehearse"] if args.rehearse else []) \
            + (["--force", *args.force] if args.force else [])
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=ROOT)  # this checkout's code, whichever r1flow is installed
        print(f"r1flow run {args.pipeline}: exit {rc}, {time.time() - t0:.0f} s wall", file=sys.stderr)
        if rc:
            return rc
    summary = json.loads(summary_path.read_text())
    print(table(args.config, args.pipeline, args.rehearse, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
