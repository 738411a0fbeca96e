"""Rehearsing a GPU recipe on CPU (issue 12): `r1flow run qwen2.5-math-1.5b --rehearse --data-mirror
tests/fixtures/hub` runs every stage of the recipe against the fixture mirror, with stand-ins for models whose
weights are not at hand (stages.models.shrink_model: the model's architecture, context window, special tokens and
chat template; two narrow layers of random weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.rehearse import stand_in

ROOT = Path(__file__).resolve().parent.parent
HUB = ROOT / "tests" / "fixtures" / "hub"
QWEN = "qwen2.5-math-1.5b"
QWEN_MODEL = "Qwen/Qwen2.5-Math-1.5B"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rehearse")
    for ref in (QWEN_MODEL, "Skywork/Skywork-Reward-V2-Llama-3.1-8B"):
        assert stand_in(ref, str(HUB), root) == str(root / "stand-ins" / ref)
    return root / "stand-ins"


def test_a_stand_in_keeps_the_architecture_template_and_stop_tokens(stand_ins):
    from transformers import AutoConfig, AutoTokenizer

    folder = stand_ins / QWEN_MODEL
    real = json.loads((HUB / QWEN_MODEL / "config.json").read_text())
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == real["model_type"] and config.architectures == real["architectures"]
    assert config.max_position_embeddings == real["max_position_embeddings"] == 4096
    assert config.num_hidden_layers == 2 and (folder / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(folder)
    real_template = json.loads((HUB / QWEN_MODEL / "tokenizer_config.json").read_text())["chat_template"]
    assert tok.chat_template == real_template and tok.eos_token == "<|endoftext|>"
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and tok.decode(tok(text).input_ids) == text
    gen = json.loads((folder / "generation_config.json").read_text())
    stops = tok.convert_ids_to_tokens(gen["eos_token_id"])
    assert set(stops) == {"<|im_end|>", "<|endoftext|>"}  # the end of turn and the eos, as the plan says
    assert "Rehearsal stand-in for Qwen/Qwen2.5-Math-1.5B" in (folder / "README.md").read_text()


def test_a_reward_model_stand_in_has_a_score_head(stand_ins):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(stand_ins / "Skywork/Skywork-Reward-V2-Llama-3.1-8B")
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1
    assert config.pad_token_id is not None  # a classifier scores padded batches


def test_no_stand_in_for_models_at_hand_or_unknown(tmp_path):
    assert stand_in("world:base_model", str(HUB), tmp_path) is None
    assert stand_in(str(HUB / QWEN_MODEL), str(HUB), tmp_path) is None  # a local folder is used as it is
    assert stand_in("nobody/unknown-model", str(HUB), tmp_path) is None  # nothing to shrink from
    assert not (tmp_path / "stand-ins").exists()


def test_the_rehearsal_of_the_recipe_uses_stand_ins_on_cpu(tmp_path):
    raw = yaml.safe_load((ROOT / "flows.yaml").read_text())
    raw["pipelines"][QWEN]["storage_root"] = str(tmp_path / "store")
    flows = tmp_path / "flows.yaml"
    flows.write_text(yaml.safe_dump(raw, sort_keys=False))
    _, pipe = load_config(flows, rehearse=True, data_mirror=HUB).get(QWEN)
    root = tmp_path / "store-rehearse" / "stand-ins"
    assert pipe.device == "cpu" and pipe.base_model == str(root / QWEN_MODEL)
    assert pipe.stages.rejection_sft.judge.model == str(root / "Qwen/Qwen2.5-7B-Instruct")
    assert pipe.stages.preference_rl.reward_model == str(root / "Skywork/Skywork-Reward-V2-Llama-3.1-8B")
    assert pipe.stages.reasoning_rl.trainer["use_vllm"] is False  # TRL's colocated vLLM needs CUDA
    assert pipe.stages.rejection_sft.generation.enforce_eager is True
    _, real = load_config(flows, data_mirror=HUB).get(QWEN)
    assert real.base_model == QWEN_MODEL and real.device == "cuda"  # the real run is untouched


@pytest.mark.slow
def test_rehearse_the_qwen_recipe_end_to_end_against_the_fixture_mirror(tmp_path):
    """Every stage of the shipped GPU recipe, through Prefect, on CPU: the datasets from the fixture mirror through
    the recipe's own specs, the models replaced by stand-ins, the judge guard and the reward-model guard run and
    recorded. About 4 minutes on 2 cores."""
    raw = yaml.safe_load((ROOT / "flows.yaml").read_text())
    qwen = raw["pipelines"][QWEN]
    qwen["storage_root"] = str(tmp_path / "store")
    config = tmp_path / "flows.yaml"
    config.write_text(yaml.safe_dump({"default": QWEN, "pipelines": {QWEN: qwen}}, sort_keys=False))
    summary = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "R1FLOW_DATA_MIRROR")}
    env.update(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), R1FLOW_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--config", str(config), "run", QWEN, "--rehearse",
                           "--data-mirror", str(HUB), "--summary-json", str(summary)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(summary.read_text())
    assert [r["stage"] for r in rows] == ["cold-start", "reasoning-rl", "rejection-sft", "preference-rl"]
    from pipeline.store import Store

    store = Store(tmp_path / "store-rehearse")
    assert store.verify() == [] and not (tmp_path / "store").exists()
    chain = {r["stage"]: store.get(r["version"]) for r in rows}
    manifest = json.loads((chain["cold-start"].path / "manifest.json").read_text())
    assert manifest["config"]["data_mirror"] == str(HUB)
    assert manifest["config"]["base_model"].endswith("stand-ins/" + QWEN_MODEL)
    # the cold start trained on R1's traces from the mirror, in R1's format (the plan checked its first rows)
    assert chain["cold-start"].metrics["eval"]["n_prompts"] == 4
    stage3 = chain["rejection-sft"]
    assert stage3.metrics["generation"]["backend"] == "vllm"
    assert stage3.metrics["judge"]["guard"]["message"] in (stage3.path / "data" / "README.md").read_text()
    stage4 = chain["preference-rl"].metrics
    assert "rm_guard" in stage4 and "heldout_rm_score_after" in stage4
