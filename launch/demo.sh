#!/usr/bin/env bash
# `make demo`: SPO on the tiny random SDXL with a programmatic step-aware scorer (the colour named
# in the prompt, judged on each candidate's VAE-decoded predicted x0 at its own timestep), 2 CPU
# ranks through the deepspeed launcher under ZeRO-2 (configs/tiny_spo.yaml), then base vs tuned on
# held-out seeds. Leaves under runs/demo/: tensorboard/ events, checkpoints/, export/ (LoRA,
# diffusers + kohya keys), samples/ (fixed prompts/seeds over training), before.png / after.png,
# report.md. About 3-4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/demo}
VENV_BIN=${VENV_BIN:-.venv/bin}
export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# One BLAS/OpenMP thread per rank: 2 ranks on 2 cores. More threads oversubscribe the cores and
# make the tiny model's matmuls 10-20x slower.
export OMP_NUM_THREADS=1

rm -rf "$RUN"
mkdir -p "$RUN"
PORT=$("$VENV_BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start=$(date +%s)

echo "== SPO training: 2 CPU ranks, ZeRO-2 (configs/tiny_spo.yaml) =="
"$VENV_BIN/deepspeed" --num_gpus 2 --master_port "$PORT" --module spoxl.train \
  --config configs/tiny_spo.yaml --set run.output_dir="$RUN" "$@" 2>&1 \
  | grep --line-buffered -v -e "kernels-community" -e "torchvision (not installed)" || true
test -f "$RUN/export/pytorch_lora_weights.safetensors" || { echo "demo: training failed (no LoRA export in $RUN)" >&2; exit 1; }

echo "== base vs tuned on held-out seeds =="
"$VENV_BIN/python" -m spoxl.demo_report --run "$RUN" --seeds 16 2>&1 \
  | grep -v -e "kernels-community" -e "torchvision (not installed)"

echo
cat "$RUN/report.md"
echo "demo done in $(( $(date +%s) - start )) s; open TensorBoard with: tensorboard --logdir $RUN/tensorboard"
