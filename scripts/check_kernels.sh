#!/usr/bin/env bash
# Checks the kernel sources without a GPU or a Mac, for every op in kernels/:
#  1. each kernels/*.metal as C++17 with g++ against kernels/metal_shim.h (names, types,
#     signatures); then each kernels/host_check*.cpp is built and run: it runs the Metal entry
#     points and the shared bodies (*.cuh, philox.h) on the host against simple loops and the
#     constants shared with the Rust tests.
#  2. each kernels/*.cu to PTX with nvcc (the pinned pip CUDA 13.0 from
#     $ROOT/../shared/gpu/setup_cuda_pip.sh when present, else nvcc on PATH; skipped without one),
#     checking that every `kernel void NAME(` of the same-named .metal file is a `.entry NAME(` of
#     the PTX (the entry points are the same in both languages), plus ptxas register/spill counts.
# Usage: bash scripts/check_kernels.sh        (from anywhere; exit status 1 on a failure)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K="$ROOT/kernels"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

entries() { # the Metal entry points of $1 (a .metal file)
  grep -oE "kernel void [a-z0-9_]+\(" "$1" | sed -E 's/kernel void ([a-z0-9_]+)\(/\1/'
}

echo "== metal (as C++, g++ $(g++ -dumpversion)) =="
for m in "$K"/*.metal; do
  g++ -std=c++17 -fsyntax-only -Wall -Wextra -Werror -Wno-attributes -x c++ -I"$K" "$m"
  [ -n "$(entries "$m")" ] || { echo "$(basename "$m"): no kernel entry points"; exit 1; }
  echo "$(basename "$m"): syntax/types ok ($(entries "$m" | tr '\n' ' '))"
done
for c in "$K"/host_check*.cpp; do
  g++ -std=c++17 -O1 -Wall -Wextra -Werror -Wno-attributes -Wno-unused-parameter -I"$K" "$c" -o "$TMP/hc"
  echo "-- $(basename "$c")"
  "$TMP/hc"
done

echo "== cuda =="
if [ -f "$HOME/.local/cuda-pip/env.sh" ]; then
  # shellcheck disable=SC1091
  source "$HOME/.local/cuda-pip/env.sh"
fi
if command -v "${NVCC:-nvcc}" >/dev/null 2>&1; then
  NV="${NVCC:-nvcc}"
  "$NV" --version | tail -1
  for cu in "$K"/*.cu; do
    n="$(basename "$cu" .cu)"
    "$NV" -O3 -std=c++17 --ptx -I"$K" -arch=sm_80 "$cu" -o "$TMP/$n.ptx"
    [ -f "$K/$n.metal" ] || { echo "$n.cu has no $n.metal twin"; exit 1; }
    for f in $(entries "$K/$n.metal"); do
      grep -q "\.entry $f(" "$TMP/$n.ptx" || { echo "ptx: entry point $f of $n.metal missing from $n.cu"; exit 1; }
    done
    # ptxas for Hopper: registers and spills per kernel.
    "$NV" -O3 -std=c++17 -cubin -I"$K" -arch=sm_90 -Xptxas -v "$cu" -o "$TMP/$n.cubin" 2>&1 \
      | grep -E "Compiling entry|registers|spill" || true
    echo "$n.cu: PTX ok ($(wc -l < "$TMP/$n.ptx") lines)"
  done
else
  echo "nvcc not found: CUDA check skipped (bash ../shared/gpu/setup_cuda_pip.sh installs one)"
fi
echo "check_kernels: ok"
