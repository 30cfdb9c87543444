#!/usr/bin/env bash
# GPU check of the `flava train` path: FSDP2 in a one-process NCCL group (the multi-GPU code path on ONE GPU),
# flava_full in bf16, each step kind (pairs with gradient caching, images, text), FLOPs counted on the real step,
# a sharded DCP save (sync and async), load and resume. Writes ONE JSON (OUT/gpu_check.json, also on stdout) with
# samples/s per step kind, MFU (codebook and recompute FLOPs apart), peak memory, loader wait share per step and
# checkpoint times. Fits one 10-minute run on an H100. Nothing is downloaded (generated shards, tokenizer trained
# on their captions, random codebook).
#
#   bash benchmarks/gpu_check.sh [--out DIR] [-- key=value ...]     # on a GPU machine, torch as installed
#   bash benchmarks/gpu_check.sh --dry-run --out DIR                 # anywhere: tiny, CPU, gloo; all but the GPU
#
# Options (or the environment variables in brackets):
#   --out DIR     work directory (OUT, a new temporary directory): data, tokenizer, checkpoints, the JSON
#   --micro N     micro-batch (MICRO, 64; dry-run 4)      --accum N   micro-batches per step (ACCUM, 2)
#   --steps N     measured steps per kind (STEPS, 6)      --rows N    generated pair rows (ROWS, 1536)
#   --wheels DIR  wheels of the pure-Python dependencies (WHEELS, bench-out/wheels; see gpu_wheels.sh): the
#                 ones whose module python3 cannot import are installed from it with pip --no-index
#   --dry-run     CPU, no GPU (DRY_RUN=1)
#   -- ARGS       run config overrides for the check (run.activation_checkpointing=false, model.codebook_dtype=bf16,
#                 run.reshard_after_forward=false, run.compile=true, data.prefetch_window=false, ...)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-}
MICRO=${MICRO:-}
ACCUM=${ACCUM:-2}
STEPS=${STEPS:-}
ROWS=${ROWS:-}
WHEELS=${WHEELS:-$ROOT/bench-out/wheels}
DRY_RUN=${DRY_RUN:-0}
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --micro) MICRO=$2; shift 2 ;;
    --accum) ACCUM=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --rows) ROWS=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in MICRO ACCUM STEPS ROWS; do
  if [[ -n ${!v} ]] && ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_check.sh: $v must be a positive integer, got '${!v}'" >&2; exit 2
  fi
done
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# the project's pure-Python dependencies, from the carried wheels where python3 lacks them (no network there)
missing=()
for pair in transformers:transformers tokenizers:tokenizers safetensors:safetensors pyarrow:pyarrow \
            polars:polars PIL:pillow yaml:pyyaml tqdm:tqdm numpy:numpy; do
  mod=${pair%%:*}; pkg=${pair#*:}
  $PY -c "import $mod" 2>/dev/null || missing+=("$pkg")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ ! -d $WHEELS ]]; then
    echo "gpu_check.sh: $PY lacks ${missing[*]} and there is no wheel folder $WHEELS (bash benchmarks/gpu_wheels.sh)" >&2
    exit 1
  fi
  echo "installing ${missing[*]} from $WHEELS (no index)"
  $PY -m pip install --quiet --no-index --find-links "$WHEELS" "${missing[@]}"
fi

if [[ $DRY_RUN != 1 ]]; then
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: torch sees no CUDA device; use --dry-run to check the rest" >&2
    exit 1
  fi
fi
if [[ -z $OUT ]]; then OUT=$(mktemp -d -t flava_gpu_check.XXXXXX); fi
ARGS=(--out "$OUT" --accum "$ACCUM")
[[ -n $MICRO ]] && ARGS+=(--micro "$MICRO")
[[ -n $STEPS ]] && ARGS+=(--steps "$STEPS")
[[ -n $ROWS ]] && ARGS+=(--rows "$ROWS")
[[ $DRY_RUN == 1 ]] && ARGS+=(--dry-run)
echo "torch $($PY -c 'import torch; print(torch.__version__)'), out $OUT" >&2
$PY -W "ignore::UserWarning" benchmarks/gpu_check.py "${ARGS[@]}" "${EXTRA[@]}"
