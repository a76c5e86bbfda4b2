#!/usr/bin/env bash
# The GPU benchmarks in one go (8 minutes at most, then stopped; not yet run on a GPU): encoder
# images/s in fp32 and bf16, training steps/s per finetune mode (decoder modes on cached
# embeddings), peak CUDA memory of each, the evaluation pipeline vs the encoder alone (#20),
# evaluate.py images/s on 1 GPU and on every GPU.
# Writes one table, gpu_bench.md (and gpu_bench.csv), to the output folder.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: bench/gpu.sh [--dry-run] [OUT_DIR] [-- extra bench/gpu.py options]

  OUT_DIR    where gpu_bench.md / gpu_bench.csv and gpu_bench.log go
             (default: $OUT when set, else ./bench_gpu)
  --dry-run  run the same code on a CPU with the tiny model and tiny counts (checks the script;
             the numbers mean nothing)
  -h, --help this text

Needs a CUDA GPU (fails at once without one, unless --dry-run). Limit: 8 minutes.
USAGE
}

dry_run=0
out="${OUT:-./bench_gpu}"
extra=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    -*) echo "bench/gpu.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
args=(--out "$out")
if ((dry_run)); then
  args+=(--dry-run)
else
  if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False)." >&2
    echo "Run it on a GPU machine, or with --dry-run to check the script on a CPU." >&2
    exit 3
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

mkdir -p "$out"
# One process group for the whole bench, so the time limit also stops evaluate.py's children.
set +e
timeout --foreground --kill-after=20 480 "$python" "$here/gpu.py" "${args[@]}" "${extra[@]}" \
  2>&1 | tee "$out/gpu_bench.log"
status=${PIPESTATUS[0]}
set -e
if ((status == 124)); then
  echo "bench/gpu.sh: stopped after 8 minutes; partial log in $out/gpu_bench.log" >&2
fi
exit "$status"
