#!/usr/bin/env bash
# Wheels of the pure-Python (and binary, non-torch) dependencies that benchmarks/gpu_check.sh needs on a GPU
# machine without network: downloaded HERE (PyPI reachable) into an ignored folder that travels with the tree.
#
#   bash benchmarks/gpu_wheels.sh [--python-version 3.11] [--dest bench-out/wheels]
#
# The GPU machine's Python decides which wheels fit: pass its version (python3 --version there). torch is never
# downloaded: the check runs on the torch installed there.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYVER=3.11
DEST=$ROOT/bench-out/wheels
PY=${PYTHON:-python3}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) PYVER=$2; shift 2 ;;
    --dest) DEST=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$DEST"
# the versions pyproject.toml asks for; their own dependencies come along (none of them needs torch)
$PY -m pip download --dest "$DEST" --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform any \
    "transformers==5.23.0" "tokenizers>=0.22" "safetensors>=0.5" "pyarrow>=17" "polars>=1.20" "pillow>=11" \
    "pyyaml>=6" "tqdm>=4.66" "numpy>=2.0"
du -sh "$DEST"
