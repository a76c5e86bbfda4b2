#!/usr/bin/env bash
# Evaluation throughput on a GPU (issue #20): images/s of the study's protocol (S2-S6 x 4 jitter
# levels, oracle selection, 2D and 3D metrics, CSVs) with every worker (eval.workers=null: the
# cores left after the main process) against the encoder alone on the same images, for ViT-B
# and ViT-H (random weights). Target: eval_vs_encoder_rate >= 0.8.
#
#   bash bench/gpu.sh [images] [size]     # defaults: 64 slices of 512 x 512
set -euo pipefail
cd "$(dirname "$0")/.."
images="${1:-64}"
size="${2:-512}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: no CUDA device; nothing measured" >&2
    exit 1
fi
for model in vit_b vit_h; do
    echo "== ${model}"
    python bench/eval_throughput.py --pipeline --model "${model}" --device cuda \
        --workers auto --images "${images}" --size "${size}" --threads 1
done
