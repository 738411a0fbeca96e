"""What the tiny pipeline's models write on the general half: greedy replies of the stage-3 and stage-4 models to
the first N distinct held-out general prompts, next to the reference reply, plus each stage's eval summary and
the reward-model guard. Read this next to the metrics (a rising score with worse replies is reward hacking).

    .venv/bin/python bench/tiny_general_answers.py [--summary runs/tiny-summary.json] [--store runs/tiny] [-n 10]
"""

import argparse
import json
from pathlib import Path

from stages.monitor import greedy_answers

KEYS = ("pass@1", "greedy_accuracy", "general_accuracy", "general_repetition", "rm_score",
        "rm_score_delta_length_controlled", "rm_guard")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--summary", default="runs/tiny-summary.json", help="written by `r1flow run --summary-json`")
    ap.add_argument("--store", default="runs/tiny", help="the pipeline's storage root")
    ap.add_argument("-n", type=int, default=10, help="distinct held-out general prompts to answer")
    ap.add_argument("--stages", default="rejection-sft,preference-rl")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = json.loads(Path(a.summary).read_text())
    print("| stage | seconds | " + " | ".join(KEYS) + " |\n|---|---|" + "---|" * len(KEYS))
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']:.0f} | " + " | ".join(str(r.get(k, "")) for k in KEYS) + " |")
    versions = {r["stage"]: Path(a.store) / "versions" / r["version"] for r in rows}
    general = [json.loads(line) for line in (versions["world"] / "data" / "general_eval.jsonl").read_text().splitlines()]
    prompts = list({g["prompt"][-1]["content"]: g for g in general}.values())[:a.n]
    for stage in a.stages.split(","):
        model_dir = versions[stage] / "model"
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        texts, _ = greedy_answers(model, tok, [p["prompt"] for p in prompts], 128)
        print(f"\n{stage} ({versions[stage].name}), greedy:")
        for p, text in zip(prompts, texts):
            print(f"  {p['prompt'][-1]['content']!r} (reference {p.get('answer')!r}) -> {text!r}")


if __name__ == "__main__":
    main()
