#!/usr/bin/env bash
# Checks the kernel sources without a GPU or a Mac:
#  1. kernels/gumbel_router.metal as C++17 with g++ against kernels/metal_shim.h (names, types,
#     signatures), then kernels/host_check.cpp, which runs the Metal entry points and the shared
#     row bodies (gumbel_router.cuh, philox.h) on the host: Philox known answers, noise constants
#     shared with tests/ops.rs, select / weights / bwd invariants.
#  2. kernels/gumbel_router.cu to PTX with nvcc (the pinned pip CUDA 13.0 from
#     $ROOT/../shared/gpu/setup_cuda_pip.sh when present, else nvcc on PATH; skipped without one),
#     checking that every entry point is in the PTX.
# Usage: bash scripts/check_kernels.sh        (from anywhere; exit status 1 on a failure)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K="$ROOT/kernels"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
ENTRIES="gumbel_select_f32 gumbel_weights_f32 gumbel_weights_bwd_f32"

echo "== metal (as C++, g++ $(g++ -dumpversion)) =="
g++ -std=c++17 -fsyntax-only -Wall -Wextra -Werror -Wno-attributes -x c++ -I"$K" "$K/gumbel_router.metal"
echo "gumbel_router.metal: syntax/types ok"
g++ -std=c++17 -O1 -Wall -Wextra -Werror -Wno-attributes -Wno-unused-parameter -I"$K" "$K/host_check.cpp" -o "$TMP/host_check"
"$TMP/host_check"
for f in $ENTRIES; do
  grep -q "kernel void $f(" "$K/gumbel_router.metal" || { echo "metal: entry point $f missing"; exit 1; }
done

echo "== cuda =="
if [ -f "$HOME/.local/cuda-pip/env.sh" ]; then
  # shellcheck disable=SC1091
  source "$HOME/.local/cuda-pip/env.sh"
fi
if command -v "${NVCC:-nvcc}" >/dev/null 2>&1; then
  NV="${NVCC:-nvcc}"
  "$NV" --version | tail -1
  "$NV" -O3 -std=c++17 --ptx -I"$K" -arch=sm_80 "$K/gumbel_router.cu" -o "$TMP/gumbel_router.ptx"
  for f in $ENTRIES; do
    grep -q "\.entry $f(" "$TMP/gumbel_router.ptx" || { echo "ptx: entry point $f missing"; exit 1; }
  done
  # ptxas for Hopper: registers and spills per kernel.
  "$NV" -O3 -std=c++17 -cubin -I"$K" -arch=sm_90 -Xptxas -v "$K/gumbel_router.cu" -o "$TMP/gumbel_router.cubin" 2>&1 \
    | grep -E "Compiling entry|registers|spill" || true
  echo "gumbel_router.cu: PTX ok ($(wc -l < "$TMP/gumbel_router.ptx") lines)"
else
  echo "nvcc not found: CUDA check skipped (bash ../shared/gpu/setup_cuda_pip.sh installs one)"
fi
echo "check_kernels: ok"
