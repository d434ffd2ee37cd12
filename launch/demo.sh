#!/usr/bin/env bash
# `make demo`: SPO on the pretrained toy-world model (spoxl/toy/weights) with the world's exact
# prompt-fidelity scorer as the step-aware preference model (each candidate's VAE-decoded predicted
# x0 judged at its own timestep), 2 CPU ranks through the deepspeed launcher under ZeRO-2
# (configs/toy_spo.yaml, trained on the world's training captions), then `spoxl eval`: base vs
# tuned on the HELD-OUT captions (colour x shape x position combinations never trained on) and
# held-out seeds. Leaves under runs/demo/: tensorboard/ events, checkpoints/, export/ (LoRA,
# diffusers + kohya keys; export/ema/ the EMA the eval judges), samples/ (fixed prompts/seeds over training), eval/ (eval.json,
# table.md, grid.png: base | tuned, same seeds), report.md. See docs/toy_world.md.
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

echo "== SPO training on the toy model: 2 CPU ranks, ZeRO-2 (configs/toy_spo.yaml) =="
"$VENV_BIN/deepspeed" --num_gpus 2 --master_port "$PORT" --module spoxl.train \
  --config configs/toy_spo.yaml --set run.output_dir="$RUN" "$@" 2>&1 \
  | grep --line-buffered -v -e "kernels-community" -e "torchvision (not installed)" || true
test -f "$RUN/export/pytorch_lora_weights.safetensors" || { echo "demo: training failed (no LoRA export in $RUN)" >&2; exit 1; }
# The LoRA to judge: the EMA of the trained weights when the recipe keeps one (configs/toy_spo.yaml does)
LORA=$("$VENV_BIN/python" -m spoxl.demo_report --run "$RUN" --lora-path) \
  || { echo "demo: no tuned LoRA to evaluate in $RUN/export" >&2; exit 1; }

echo "== spoxl eval: base vs SPO on held-out captions and seeds ($LORA) =="
OMP_NUM_THREADS=2 "$VENV_BIN/spoxl" eval --model toy --lora "$LORA" --name spo \
  --prompts held-out --seeds "${EVAL_SEEDS:-4}" --scorer fidelity --out "$RUN/eval" 2>&1 \
  | grep -v -e "kernels-community" -e "torchvision (not installed)"
"$VENV_BIN/python" -m spoxl.demo_report --run "$RUN" --eval "$RUN/eval" 2>&1 \
  | grep -v -e "kernels-community" -e "torchvision (not installed)"

echo
cat "$RUN/report.md"
echo "demo done in $(( $(date +%s) - start )) s; open TensorBoard with: tensorboard --logdir $RUN/tensorboard"
