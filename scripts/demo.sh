#!/usr/bin/env bash
# Install, then export the built-in SmolLM2-135M for the Raspberry Pi 4B profile and validate it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/slm-export --target rpi4 --model smollm2-135m --out build/rpi4 "$@"
