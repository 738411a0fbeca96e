"""Held-out evaluation of a checkpoint, as R1 reports it: pass@1 averaged over k samples at
temperature 0.6 / top-p 0.95, plus greedy accuracy, format rate and mean completion length.

Correctness uses the same verifier as the rewards (`stages.rewards.verify_answer` on
`extract_answer`), format the same check as the format reward. The pipeline calls `evaluate` after
every stage; `r1flow eval VERSION` calls it on one version.

With `general_dataset` set (the tiny pipeline: `world:general_eval`, held-out general questions with a
short reference `answer`), it also answers those prompts greedily and reports the general half:
`general_accuracy` (`stages.monitor.general_correct`, as the stage-4 monitor and report count it: the
`<answer>` block, lower-cased and reduced to words, is the reference or contains it with a few other
words), `general_exact_match` (the `<answer>` block is the reference, case and punctuation ignored),
per `family` when the rows have one, the answers' repetition and mean length, and a few samples.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field

from stages.common import StageConfig
from stages.data import DatasetRef

log = logging.getLogger(__name__)


class Config(StageConfig):
    """What to evaluate on and how to sample. Defaults fit the tiny world (about 20 s on 2 cores)."""

    dataset: DatasetRef = Field("world:eval", description="held-out prompts with gold answers (columns prompt, answer)")
    limit: int | None = Field(200, gt=0, description="evaluate only the first N prompts (None: all)")
    k: int = Field(4, ge=1, description="samples per prompt for pass@1 (mean correctness over k samples)")
    temperature: float = Field(0.6, gt=0, description="sampling temperature for pass@1 (R1: 0.6)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass for pass@1 (R1: 0.95)")
    max_new_tokens: int = Field(128, ge=1, description="most tokens per completion")
    greedy: bool = Field(True, description="also decode greedily once per prompt and report greedy_accuracy")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="generation backend (transformers is faster for tiny models on CPU)")
    dtype: str = Field("float32", description="weights dtype for generation: float32, bfloat16, float16, auto "
                                             "(bfloat16 on GPUs; vLLM on CPU needs float32 or bfloat16)")
    max_model_len: int | None = Field(
        None, ge=16, description="vLLM: longest prompt + completion in tokens; None: the longest prompt plus "
                                 "max_new_tokens. Checked against the model's own context window")
    enforce_eager: bool = Field(True, description="vLLM: no CUDA graphs (required on CPU; false on GPUs is faster)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM on GPU: share of GPU memory it may use")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs to shard the model over")
    batch_size: int = Field(64, ge=1, description="prompts per generation batch")
    seed: int = Field(1234, description="sampling seed (fixed so evaluations of different models are comparable)")
    num_samples: int = Field(6, ge=0, description="how many example completions to return under `samples`")
    general_dataset: DatasetRef | None = Field(
        None, description="held-out general prompts with short reference answers (columns prompt, answer; optional "
                          "family), answered greedily (first `limit` rows): general_accuracy, general_exact_match, "
                          "general_repetition, general_mean_tokens; None: the general half is not evaluated")


def generation_settings(cfg: Config, model_path: str, prompts: list) -> dict:
    """The generation settings of an evaluation: the eval config's, with vLLM's context length derived from
    the prompts when not set, and checked against the model's context window (a UserError when too long)."""
    from transformers import AutoConfig, AutoTokenizer  # noqa: PLC0415

    from stages.common import UserError  # noqa: PLC0415
    from stages.generation import prompt_texts  # noqa: PLC0415

    model_len = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    longest = 0
    if cfg.max_model_len is None or model_len:
        tok = AutoTokenizer.from_pretrained(model_path)
        longest = max((len(tok(t, add_special_tokens=False)["input_ids"]) for t in prompt_texts(tok, prompts)), default=0)
    need = max(cfg.max_model_len or 0, longest + cfg.max_new_tokens)
    if model_len and need > model_len:
        raise UserError(f"eval: prompts of up to {longest} tokens + max_new_tokens {cfg.max_new_tokens} (max_model_len "
                        f"{cfg.max_model_len}) exceed the {model_len} positions of {model_path}")
    return dict(backend=cfg.backend, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=cfg.batch_size,
                dtype=cfg.dtype, max_model_len=cfg.max_model_len or need, enforce_eager=cfg.enforce_eager,
                gpu_memory_utilization=cfg.gpu_memory_utilization, tensor_parallel_size=cfg.tensor_parallel_size)


def evaluate(model_path: str, cfg: Config, world_dir: Path | None, rewards_cfg=None,
             progress: Callable[[float], None] | None = None, system_prompt: str | None = None,
             mirror: str | Path | None = None) -> dict:
    """Evaluate `model_path` on `cfg.dataset` (prompts carry `system_prompt`, as in training; hub datasets come
    from the data `mirror` when one is set); returns JSON-able metrics (see module doc)."""
    from stages.common import with_system_prompt  # noqa: PLC0415
    from stages.data import load  # noqa: PLC0415
    from stages.generation import GenerationConfig, generate  # noqa: PLC0415
    from stages.rewards import extract_answer, format_reward, score_completion, verify_answer  # noqa: PLC0415

    t0 = time.time()
    ds = load(cfg.dataset, world_dir, required_columns=("prompt", "answer"), mirror=mirror)
    if cfg.limit:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    ds = with_system_prompt(ds, system_prompt)
    prompts, golds = list(ds["prompt"]), list(ds["answer"])
    languages = list(ds["language"]) if "language" in ds.column_names else [None] * len(prompts)
    gen = generation_settings(cfg, model_path, prompts)
    share = 0.8 if cfg.greedy else 1.0
    sampled = generate(model_path, prompts, GenerationConfig(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, **gen),
                       progress=(lambda f: progress(share * f)) if progress else None)
    greedy = generate(model_path, prompts, GenerationConfig(n=1, temperature=0.0, **gen),
                      progress=(lambda f: progress(share + (1 - share) * f)) if progress else None) if cfg.greedy else None

    def correct(text: str, gold) -> bool | None:
        return verify_answer(gold, extract_answer(text))

    per_prompt, formats, lengths, rewards, samples = [], [], [], [], []
    greedy_hits = []
    for i, (gold, lang) in enumerate(zip(golds, languages)):
        verdicts = [correct(r["text"], gold) for r in sampled[i]]
        judged = [v for v in verdicts if v is not None]
        if judged:  # an unparseable gold answer can't be judged: the prompt is left out
            per_prompt.append(sum(judged) / len(judged))
        formats.extend(format_reward([r["text"] for r in sampled[i]]))
        lengths.extend(r["num_tokens"] for r in sampled[i])
        if rewards_cfg is not None:
            row = {"answer": gold, **({"language": lang} if lang else {})}
            rewards.extend(score_completion(r["text"], rewards_cfg, **row)["total"] for r in sampled[i])
        if greedy is not None:
            g = correct(greedy[i][0]["text"], gold)
            if g is not None:
                greedy_hits.append(g)
        if len(samples) < cfg.num_samples:
            samples.append({"prompt": _prompt_text(prompts[i]), "completion": sampled[i][0]["text"],
                            "answer": str(gold), "correct": verdicts[0]})
    metrics = {
        "pass@1": _mean(per_prompt),
        "greedy_accuracy": _mean(greedy_hits) if greedy is not None else None,
        "format_rate": _mean(formats),
        "mean_completion_tokens": _mean(lengths),
        "n_prompts": len(prompts),
        "n_judged": len(per_prompt),
        "k": cfg.k,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "samples": samples,
        "seconds": round(time.time() - t0, 1),
    }
    if rewards_cfg is not None:
        metrics["mean_reward"] = _mean(rewards)
    if cfg.general_dataset is not None:
        metrics.update(general_metrics(model_path, cfg, world_dir, gen, system_prompt, mirror))
    log.info("eval %s: pass@1 %.3f greedy %s format %.3f (%d prompts, k=%d, %.0fs)", model_path, metrics["pass@1"],
             metrics["greedy_accuracy"], metrics["format_rate"], len(prompts), cfg.k, metrics["seconds"])
    return metrics


def general_metrics(model_path: str, cfg: Config, world_dir: Path | None, gen: dict,
                    system_prompt: str | None = None, mirror: str | Path | None = None) -> dict:
    """The general half of an evaluation: greedy answers to `cfg.general_dataset` (columns prompt, answer;
    optional family) scored against their short references (see module doc). `gen`: the evaluation's
    generation settings."""
    from stages.common import with_system_prompt  # noqa: PLC0415
    from stages.data import load  # noqa: PLC0415
    from stages.generation import GenerationConfig, generate  # noqa: PLC0415
    from stages.monitor import general_correct, repetition_rate  # noqa: PLC0415

    ds = load(cfg.general_dataset, world_dir, required_columns=("prompt", "answer"), mirror=mirror)
    if cfg.limit:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    ds = with_system_prompt(ds, system_prompt)
    prompts, refs = list(ds["prompt"]), list(ds["answer"])
    families = list(ds["family"]) if "family" in ds.column_names else [None] * len(prompts)
    records = [r[0] for r in generate(model_path, prompts, GenerationConfig(n=1, temperature=0.0, **gen))]
    texts = [r["text"] for r in records]
    verdicts = [general_correct(t, ref) for t, ref in zip(texts, refs)]
    exact = [general_exact_match(t, ref) for t, ref in zip(texts, refs)]
    by_family: dict[str, list[bool]] = {}
    for family, verdict in zip(families, verdicts):
        if family is not None and verdict is not None:
            by_family.setdefault(str(family), []).append(verdict)
    judged = [v for v in verdicts if v is not None]
    out = {
        "general_accuracy": _mean(judged) if judged else None,
        "general_exact_match": _mean([e for e in exact if e is not None]) if judged else None,
        "general_repetition": round(repetition_rate(texts, 3), 4),
        "general_mean_tokens": _mean([r["num_tokens"] for r in records]),
        "general_n_prompts": len(prompts),
        "general_samples": [{"prompt": _prompt_text(p), "completion": t, "answer": str(ref), "correct": v}
                            for p, t, ref, v in list(zip(prompts, texts, refs, verdicts))[:cfg.num_samples]],
    }
    if by_family:
        out["general_accuracy_by_family"] = {k: _mean(v) for k, v in sorted(by_family.items())}
    log.info("eval %s: general accuracy %s (exact %s) on %d prompts", model_path, out["general_accuracy"],
             out["general_exact_match"], len(prompts))
    return out


_WORDS = re.compile(r"[^\W_]+")


def general_exact_match(text: str, reference) -> bool | None:
    """Whether the final answer (the `<answer>` block; the whole text when there is none; several blocks:
    wrong) is the reference, case and punctuation ignored. None when there is no reference."""
    from stages.rewards import completion_text, extract_answer  # noqa: PLC0415

    if reference is None or not _WORDS.findall(str(reference).lower()):
        return None
    text = completion_text(text)
    answer = extract_answer(text) if "<answer>" in text else text
    return _WORDS.findall((answer or "").lower()) == _WORDS.findall(str(reference).lower())


def _mean(values) -> float:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 4) if values else 0.0


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m.get("role") == "user") or str(prompt)
