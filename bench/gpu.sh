#!/usr/bin/env bash
# The GPU benchmarks in one go (8 minutes at most, children included; not yet run on a GPU):
# encoder images/s in fp32 and bf16, training steps/s per finetune mode (decoder modes on cached
# embeddings), peak CUDA memory of each, the evaluation pipeline vs the encoder alone (#20),
# evaluate.py images/s on 1 GPU and on every GPU.
# Runs on a machine without network (the lent H100/H200 image: Python 3.12, torch, lightning):
# the packages that image lacks travel as wheels in .whl/ (bench/gpu_wheels.sh fetches them
# where pip works) and are installed from there; sam_ft runs from this checkout.
# Each row is written as soon as it is measured (gpu_bench.md / gpu_bench.csv, and the log);
# a failing row (out of memory) costs that row only. Each step says so when it fails.
set -uo pipefail

usage() {
  cat <<'USAGE'
usage: bench/gpu.sh [--dry-run] [--budget SECONDS] [--wheels DIR] [OUT_DIR] [-- gpu.py options]

  OUT_DIR    where gpu_bench.md / gpu_bench.csv and gpu_bench.log go
             (default: $OUT when set, else ./bench_gpu)
  --dry-run  run the same code on a CPU with the tiny model and tiny counts (checks the script;
             the numbers mean nothing)
  --budget   seconds for the whole bench, its child processes included (default 480)
  --wheels   wheels of the missing packages, installed without network
             (default: .whl/ in this checkout; used where a package is missing;
             bench/gpu_wheels.py fetches them)
  -h, --help this text

Needs a CUDA GPU (fails at once without one, unless --dry-run).
USAGE
}

dry_run=0
budget=480
out="${OUT:-./bench_gpu}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
wheels="$root/.whl"
extra=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --budget) shift; budget="${1:?--budget needs seconds}" ;;
    --wheels) shift; wheels="${1:?--wheels needs a folder}" ;;
    --) shift; extra=("$@"); break ;;
    -*) echo "bench/gpu.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done

python="${PYTHON:-python3}"
failed() {  # step, what went wrong, exit status
  echo "bench/gpu.sh: step '$1' failed: $2" >&2
  exit "${3:-4}"
}
step() { echo "== bench/gpu.sh step: $1" >&2; }

step "python"
"$python" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null ||
  failed python "$python does not run or is older than 3.10 (PYTHON= names another)"

step "import torch"
if ! err="$("$python" -c 'import torch' 2>&1)"; then
  failed "import torch" "$(tail -n 1 <<<"$err")"
fi

if ((!dry_run)); then
  step "CUDA GPU"
  if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False)." >&2
    echo "Run it on a GPU machine, or with --dry-run to check the script on a CPU." >&2
    exit 3
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

# sam_ft from this checkout; the carried wheels (before the image's own packages) only where
# a package is missing, so a machine that has them all (a dev install) keeps its own.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
probe='import segment_anything, monai, nibabel, hydra, omegaconf, albumentations
import sam_ft.data.datamodule, sam_ft.evaluate, sam_ft.train'
step "import sam_ft and its packages"
err="$("$python" -c "$probe" 2>&1)"
imported=$?
if ((imported != 0)) && compgen -G "$wheels/*.whl" >/dev/null; then
  step "install wheels from $wheels (no network): $(tail -n 1 <<<"$err")"
  site="${TMPDIR:-/tmp}/sam_ft_bench_site"
  if ! err="$("$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "$wheels"/*.whl 2>&1)"; then
    failed "install wheels" "$(tail -n 3 <<<"$err" | tr '\n' ' ')"
  fi
  export PYTHONPATH="$site:$PYTHONPATH"
  step "import sam_ft and its packages (from the wheels)"
  err="$("$python" -c "$probe" 2>&1)"
  imported=$?
fi
if ((imported != 0)); then
  failed "import sam_ft" "$(tail -n 1 <<<"$err") (bench/gpu_wheels.py fetches the missing wheels)"
fi

step "bench ($budget s at most)"
args=(--out "$out")
((dry_run)) && args+=(--dry-run)
mkdir -p "$out" || failed "output folder" "cannot create $out"
# Its own process group, stopped whole at the budget (evaluate.py's ranks and workers too).
PYTHONUNBUFFERED=1 "$python" "$here/_budget.py" "$budget" "$out/gpu_bench.log" -- \
  "$python" "$here/gpu.py" "${args[@]}" "${extra[@]}"
status=$?
if ((status == 124)); then
  echo "bench/gpu.sh: stopped after $budget s; the rows measured are in $out/gpu_bench.md" >&2
elif ((status != 0)); then
  echo "bench/gpu.sh: step 'bench' failed (exit $status); see $out/gpu_bench.log" >&2
fi
exit "$status"
