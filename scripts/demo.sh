#!/usr/bin/env bash
# One command on a fresh machine: set everything up, then compile the real SmolLM2-135M at
# W8A16 and W4A16 and print the report table. Extra arguments go to `sagequant demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/sagequant demo "$@"
