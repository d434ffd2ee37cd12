#!/usr/bin/env bash
# Placeholder demo (foundation): samples a grid with the tiny SDXL model.
# The SPO issue replaces this with the tiny SPO training run through the deepspeed launcher.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/demo
.venv/bin/spoxl sample --model tiny --prompt "a red circle" --prompt "a blue square" \
  --images-per-prompt 4 --steps 20 --cfg 5 --out runs/demo/grid.png
