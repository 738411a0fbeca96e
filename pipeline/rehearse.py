"""`--rehearse`: any pipeline shrunk to a few steps and rows per stage, to check its mechanics on CPU in
minutes before real compute is spent (templates, data columns, filters, judge, reward model, evaluation,
store, Prefect), never its quality. Rehearsal versions live under their own storage root
(`<storage_root>-rehearse`), so they never mix with real ones, and stages see `ctx.rehearsal` (stage 3
then accepts a run where no sample survived the filters, which a two-step cold start always produces).

The shrinking works on the validated config: trainer blocks get `max_steps: 2` and small batches,
datasets are capped to a few rows, generation to a few short samples, guards continue on failure (their
outcome is still recorded), and evaluation generates with transformers. Everything else (templates, stage
backends, filters, rewards) stays as configured.

A rehearsal runs on CPU: a `device: cuda` pipeline rehearses with `device: cpu`, vLLM without CUDA graphs
(`enforce_eager`) and GRPO generating with transformers (TRL's colocated vLLM needs CUDA), the GPU-only parts a
rehearsal cannot check. A hub model whose weights are not at hand (a data mirror of configs and tokenizers) or
that is over STAND_IN_MAX_PARAMS is replaced by a stand-in (`stages.models.shrink_model`: its architecture,
context window, special tokens and chat template, two narrow layers of random weights), built once under
`<storage_root>-rehearse/stand-ins/<org>/<name>/`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

REHEARSAL_ROWS = 24  # rows kept of every dataset
STAND_IN_MAX_PARAMS = 500_000_000  # larger hub models get a stand-in (a rehearsal runs on CPU in minutes)
STEPS = {"max_steps": 2, "save_steps": 1, "logging_steps": 1, "gradient_accumulation_steps": 1}
GRPO = {"num_generations": 2, "per_device_train_batch_size": 4, "max_completion_length": 32}
BATCH = {"per_device_train_batch_size": 4}
# the tiny world at the size of the test suite's world (about 10 s)
TINY_WORLD = dict(n_cold_start=40, n_rl_prompts=40, n_eval=20, n_general_sft=20, n_general_prompts=20,
                  n_general_eval=10, n_preference=30, pretrain_steps=30, pretrain_corpus_lines=600,
                  pretrain_batch_size=8, pretrain_seq_len=64, judge=False)


def cap_dataset(ref: Any, rows: int = REHEARSAL_ROWS) -> Any:
    """A dataset reference limited to `rows` rows (a reasoning-gym task generates only that many)."""
    from stages.data import DatasetSpec  # noqa: PLC0415

    if ref is None:
        return None
    if isinstance(ref, str):
        return DatasetSpec(path=ref, limit=rows)
    if hasattr(ref, "reasoning_gym"):
        task = ref.reasoning_gym
        return ref.model_copy(update={"reasoning_gym": task.model_copy(update={"size": min(task.size, rows)})})
    return ref.model_copy(update={"limit": min(ref.limit or rows, rows)})


def _short(gen, n: int = 2, tokens: int = 48):
    update = {"n": min(gen.n, n), "max_new_tokens": min(gen.max_new_tokens, tokens)}
    if "enforce_eager" in type(gen).model_fields:
        update["enforce_eager"] = True  # on CPU: no CUDA graphs, no compilation
    return gen.model_copy(update=update)


def _trainer(args: dict, grpo: bool = False) -> dict:
    out = {**args, **STEPS}
    out.pop("num_train_epochs", None)
    for key, value in (GRPO if grpo else BATCH).items():
        out[key] = min(out.get(key, value), value) if key != "num_generations" else value
    if grpo:
        out["use_vllm"] = False  # TRL's colocated vLLM needs CUDA: GRPO generates with transformers on CPU
        out["per_device_train_batch_size"] = GRPO["per_device_train_batch_size"]
        out.pop("generation_batch_size", None)
        out.pop("steps_per_generation", None)
    return out


def _monitor(m):
    # one check at the start and one at the last step: both code paths, half the generation of every-step checks
    return m.model_copy(update={"n_prompts": 2, "max_new_tokens": min(m.max_new_tokens, 32), "eval_every": STEPS["max_steps"],
                                "dataset": cap_dataset(m.dataset) if m.dataset is not None else None,
                                "general_n_prompts": min(m.general_n_prompts, 2),
                                "general_max_new_tokens": min(m.general_max_new_tokens or 32, 32)})


def _rm_guard(g):
    """The guard runs and is reported, but a two-step reward model cannot pass it: continue at weight 0."""
    return g.model_copy(update={"n_prompts": min(g.n_prompts, 4), "on_fail": "zero-weight",
                                "dataset": cap_dataset(g.dataset) if g.dataset is not None else None})


# text the stand-in tokenizers learn their merges from (prompts, R1's tags, arithmetic and LaTeX)
STAND_IN_CORPUS = [
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer.",
    "<think> reasoning process here </think><answer> answer here </answer>",
    "What is $3 + 4$? Compute $12 \\times 7$. The answer is $\\boxed{84}$. \\frac{1}{2} 0123456789 + - * / = ( )",
    "Give me two sentences about the sea. Explain how a bicycle works to a ten-year-old. Sorry, I can not help.",
]


def _model_refs(p) -> list[tuple[Any, str]]:
    """(config object, field) of every model reference a pipeline names."""
    st = p.stages
    refs: list[tuple[Any, str]] = [(p, "base_model")]
    refs += [(c, "model") for c in (st.cold_start, st.reasoning_rl, st.reward_model, st.preference_rl) if c is not None]
    if st.preference_rl is not None:
        refs.append((st.preference_rl, "reward_model"))
    if st.rejection_sft is not None and st.rejection_sft.judge is not None:
        refs.append((st.rejection_sft.judge, "model"))
    return refs


def stand_in(ref: str | None, mirror: str | None, root: Path) -> str | None:
    """The folder of `ref`'s stand-in (built on first use), or None when the rehearsal uses `ref` itself: not a
    hub id, no config.json at hand (mirror or HF cache) to shrink from, or weights at hand and a size CPU takes."""
    import json  # noqa: PLC0415

    from pipeline.plan import find_model_dir, param_count  # noqa: PLC0415
    from stages.data import is_hub_id  # noqa: PLC0415

    if not ref or not is_hub_id(ref):
        return None
    folder = find_model_dir(ref, mirror)
    if folder is None:
        return None
    if any(folder.glob("*.safetensors")) and param_count(json.loads((folder / "config.json").read_text())) <= STAND_IN_MAX_PARAMS:
        return None
    out = root / "stand-ins" / ref
    if not (out / "stand_in.json").is_file():
        from stages.models import shrink_model  # noqa: PLC0415

        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shrink_model(folder, tmp, ref, STAND_IN_CORPUS)
        try:
            os.replace(tmp, out)  # atomic; another process may have built it meanwhile
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def rehearsal(pipe, root: Path | None = None):
    """A copy of the validated pipeline `pipe`, shrunk for a rehearsal; hub models that need one are replaced by
    stand-ins under `root` (the rehearsal's storage root; None: no stand-ins)."""
    p = pipe.model_copy(deep=True)
    p.device = "cpu"
    # Evaluation generates with transformers in a rehearsal: five vLLM engine starts would be a third of it, and
    # the vLLM path is the one the world's self-samples and stage 3 take anyway (same `stages.generation`).
    p.eval = p.eval.model_copy(update={"limit": 4, "k": 2, "max_new_tokens": min(p.eval.max_new_tokens, 48),
                                       "greedy": False, "backend": "transformers"})
    world = p.world
    if world is not None and world.kind == "tiny":
        p.world = world.model_copy(update=TINY_WORLD)
    elif world is not None:
        update: dict[str, Any] = {"datasets": {k: cap_dataset(v) for k, v in world.datasets.items()}}
        if world.self_samples is not None:
            update["self_samples"] = world.self_samples.model_copy(
                update={"generation": _short(world.self_samples.generation, 2, 64)})
        p.world = world.model_copy(update=update)
    st = p.stages
    if st.cold_start is not None:
        st.cold_start = st.cold_start.model_copy(update={"max_examples": 16, "trainer": _trainer(st.cold_start.trainer)})
    if st.reasoning_rl is not None:
        c = st.reasoning_rl
        st.reasoning_rl = c.model_copy(update={"max_prompts": 8, "trainer": _trainer(c.trainer, grpo=True),
                                               "monitor": _monitor(c.monitor)})
    if st.rejection_sft is not None:
        c = st.rejection_sft
        update = {"prompts": cap_dataset(c.prompts, 8), "general": cap_dataset(c.general, 8),
                  "generation": _short(c.generation), "trainer": _trainer(c.trainer)}
        if c.judge is not None:  # the guard runs; a judge failing it sends the stage on rules-only
            update["judge"] = c.judge.model_copy(update={"guard_examples": 1, "cross_check": 2,
                                                         "on_guard_fail": "rules-only",
                                                         "generation": _short(c.judge.generation, 1, 48)})
        st.rejection_sft = c.model_copy(update=update)
    if st.reward_model is not None:
        c = st.reward_model
        st.reward_model = c.model_copy(update={"dataset": cap_dataset(c.dataset, 32), "trainer": _trainer(c.trainer),
                                               "guard": _rm_guard(c.guard)})
    if st.preference_rl is not None:
        c = st.preference_rl
        update = {"num_prompts": 8, "trainer": _trainer(c.trainer, grpo=True), "monitor": _monitor(c.monitor),
                  "rm_guard": _rm_guard(c.rm_guard),
                  "eval_general": cap_dataset(c.eval_general, 4), "eval_generation": _short(c.eval_generation, 1, 32),
                  "prompts": cap_dataset(c.prompts), "general_prompts": cap_dataset(c.general_prompts),
                  "dpo": c.dpo.model_copy(update={"num_prompts": 8, "generation": _short(c.dpo.generation, 2, 32)}),
                  "dpo_trainer": _trainer(c.dpo_trainer)}
        st.preference_rl = c.model_copy(update=update)
    if root is not None:
        for obj, field in _model_refs(p):
            folder = stand_in(getattr(obj, field), p.data_mirror, Path(root))
            if folder is not None:
                setattr(obj, field, folder)
    return p
