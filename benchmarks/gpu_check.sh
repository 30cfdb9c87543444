#!/usr/bin/env bash
# GPU check of `flava train`: flava_full, bf16, on every GPU of the machine (torchrun; NCCL whenever there are two or
# more), 30 steps on generated PMD-format shards; prints samples/s, MFU and peak memory (medians after warm-up).
#
#   bash benchmarks/gpu_check.sh                 # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry-run       # anywhere: generates the shards, prints the command, trains nothing
#
# Options (or the environment variables in brackets):
#   --steps N     optimizer steps (STEPS, 30)
#   --micro N     micro-batch per GPU (MICRO, 64: bf16 + activation checkpointing, as configs/flava_full.yaml)
#   --accum N     micro-batches per step and GPU (ACCUM, 2: exercises gradient caching of the contrastive loss)
#   --rows N      generated pair rows (ROWS, 4096), 256 px JPEGs with captions (tests/flava/shards.py)
#   --out DIR     work directory (OUT, a new temporary directory); keeps shards, run dir and logs
#   --dry-run     no training (DRY_RUN=1)
# The tokenizer is trained on the generated captions (30522 ids) and the codebook is random: nothing is downloaded.
set -euo pipefail

STEPS=${STEPS:-30}
MICRO=${MICRO:-64}
ACCUM=${ACCUM:-2}
ROWS=${ROWS:-4096}
OUT=${OUT:-}
DRY_RUN=${DRY_RUN:-0}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) STEPS=$2; shift 2 ;;
    --micro) MICRO=$2; shift 2 ;;
    --accum) ACCUM=$2; shift 2 ;;
    --rows) ROWS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in STEPS MICRO ACCUM ROWS; do
  if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then echo "gpu_check.sh: $v must be a positive integer, got '${!v}'" >&2; exit 2; fi
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

NGPU=0
if command -v nvidia-smi >/dev/null 2>&1; then
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [[ $NGPU -eq 0 && $DRY_RUN != 1 ]]; then
  echo "gpu_check.sh: no GPU (nvidia-smi -L lists none); use --dry-run to check the rest" >&2
  exit 1
fi
NPROC=$(( NGPU > 0 ? NGPU : 1 ))
GLOBAL=$(( MICRO * ACCUM * NPROC ))
CORES=$($PY -c 'import os; print(os.cpu_count() or 1)')
WORKERS=$(( CORES / NPROC - 1 ))
(( WORKERS < 1 )) && WORKERS=1
(( WORKERS > 8 )) && WORKERS=8

if [[ -z $OUT ]]; then OUT=$(mktemp -d -t flava_gpu_check.XXXXXX); fi
mkdir -p "$OUT"
DATA=$OUT/data
RUN=$OUT/run

if [[ ! -f $DATA/manifest.json ]]; then
  echo "generating $ROWS pair rows in $DATA"
  $PY -c "import sys; sys.path.insert(0, '.'); from tests.flava.shards import make_build; \
make_build(sys.argv[1], n=int(sys.argv[2]), size=256, shards=4, row_group_size=256)" "$DATA" "$ROWS"
fi

ARGS=(-m pmd_cli.flava train --config flava_full --data "$DATA" --out "$RUN" --steps "$STEPS"
      run.precision=bf16 run.device=cuda "run.micro_batch_size=$MICRO" "run.global_batch_size=$GLOBAL"
      run.checkpoint_every=100000 run.log_every=1 run.export_final=false run.progress=false run.tensorboard=false
      model.codebook=random model.allow_random_codebook=true data.tokenizer=null data.tokenizer_vocab_size=30522
      model.text_vocab_from_tokenizer=false "data.num_workers=$WORKERS")
# torchrun even for one GPU (one process, no process group); NCCL is chosen by the trainer for 2+ CUDA ranks
CMD=(torchrun --standalone --nproc_per_node "$NPROC" "${ARGS[@]}")
echo "GPUs: $NGPU  processes: $NPROC  backend: $([[ $NPROC -ge 2 ]] && echo nccl || echo none)  global batch: $GLOBAL" \
     "(micro $MICRO x accum $ACCUM x $NPROC)  loader workers/rank: $WORKERS"
echo "${CMD[*]}"
# the run config these overrides give must validate for this many processes (fails here, not after start-up)
$PY -c "import sys; from flava.run_config import load_run_config; \
load_run_config('flava_full', [a for a in sys.argv[2:] if '=' in a and not a.startswith('-')]).validate(int(sys.argv[1]))" \
  "$NPROC" "${ARGS[@]}"
command -v torchrun >/dev/null || { echo "gpu_check.sh: torchrun not on PATH" >&2; exit 1; }
if [[ $DRY_RUN == 1 ]]; then
  echo "dry run: shards in $DATA, nothing trained"
  exit 0
fi

rm -rf "$RUN"
"${CMD[@]}" 2>&1 | tee "$OUT/train.log"

$PY - "$RUN/metrics.jsonl" "$NPROC" <<'EOF'
import json, statistics, sys

rows = [json.loads(x) for x in open(sys.argv[1])]
warm = [r for r in rows if r["step"] > 5] or rows
def med(key, rs=warm):
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else None
out = {"gpus": int(sys.argv[2]), "steps": rows[-1]["step"], "samples_per_s": med("samples_per_s"),
       "mfu": med("mfu"), "peak_mem_gib": max((r.get("peak_mem_gib") or 0) for r in rows),
       "final_loss": rows[-1]["loss"]}
for kind in ("pairs", "images", "text"):
    rs = [r for r in warm if r["kind"] == kind]
    if rs:
        out[f"samples_per_s_{kind}"] = med("samples_per_s", rs)
        out[f"mfu_{kind}"] = med("mfu", rs)
print(json.dumps(out))
EOF
