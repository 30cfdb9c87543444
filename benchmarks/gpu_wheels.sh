#!/usr/bin/env bash
# Wheels of the pure-Python (and binary, non-torch) dependencies that benchmarks/gpu_check.sh needs on a GPU
# machine without network: downloaded HERE (PyPI reachable) into an ignored folder that travels with the tree.
#
#   bash benchmarks/gpu_wheels.sh [--python-version 3.11] [--dest bench-out/wheels] [PKG ...]
#
# The GPU machine's Python decides which wheels fit: pass its version (python3 --version there). torch is never
# downloaded: the check runs on the torch installed there. All of them with their dependencies are ~160 MB (pyarrow
# and polars ~40 MB each), more than a device run carries (64 MiB): name only the packages the machine lacks
# (gpu_check.sh lists them when it stops), e.g. `bash benchmarks/gpu_wheels.sh transformers tokenizers`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYVER=3.11
DEST=$ROOT/bench-out/wheels
PY=${PYTHON:-python3}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) PYVER=$2; shift 2 ;;
    --dest) DEST=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "gpu_wheels.sh: unknown argument $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
# the versions pyproject.toml asks for; their own dependencies come along (none of them needs torch)
PKGS=("$@")
if [[ ${#PKGS[@]} -eq 0 ]]; then
  PKGS=("transformers==5.23.0" "tokenizers>=0.22" "safetensors>=0.5" "pyarrow>=17" "polars>=1.20" "pillow>=11"
        "pyyaml>=6" "tqdm>=4.66" "numpy>=2.0")
fi
mkdir -p "$DEST"
$PY -m pip download --dest "$DEST" --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform any "${PKGS[@]}"
du -sh "$DEST"
