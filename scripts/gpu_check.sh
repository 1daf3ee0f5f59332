#!/usr/bin/env bash
# Builds the `--features cuda` binaries here (no GPU needed) and packs them for the GPU machine:
#   examples/gpu_check.rs  CUDA vs CPU for every custom op, forward and backward, then timings;
#   the gumbel-moe CLI     for a training run of configs/shakespeare-char-gpu.toml on the GPU.
# Both go xz-compressed to target/gpu/ with run_on_gpu.sh, scripts/gpu_run.sh and the dataset file
# (the GPU machine has no hub cache), and the script prints how to run them there.
# Needs the pinned CUDA 13.0 toolchain (bash $ROOT/../shared/gpu/setup_cuda_pip.sh). Builds in
# CARGO_TARGET_DIR (default target-cuda beside target/) so the CPU target/ is untouched; a first build
# takes ~15 min on 2 cores (candle-kernels). PACK_DIR overrides target/gpu.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ -f "$HOME/.local/cuda-pip/env.sh" ] || bash "$ROOT/../shared/gpu/setup_cuda_pip.sh"
# shellcheck disable=SC1091
source "$HOME/.local/cuda-pip/env.sh"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-cuda}"
PACK="${PACK_DIR:-$ROOT/target/gpu}"
bash scripts/check_kernels.sh >/dev/null
cargo build --release --features cuda --example gpu_check --bin gumbel-moe
mkdir -p "$PACK"
rm -f "$PACK"/*.xz
for b in examples/gpu_check gumbel-moe; do
  n="$(basename "$b")"
  cp "$CARGO_TARGET_DIR/release/$b" "$PACK/$n"
  strip "$PACK/$n" 2>/dev/null || true
  xz -T2 -6 -f "$PACK/$n"
done
cp "$ROOT/../shared/gpu/run_on_gpu.sh" scripts/gpu_run.sh "$PACK/"
cp "$ROOT/../shared/data/tinyshakespeare/input.txt" "$PACK/input.txt" 2>/dev/null \
  || find "$ROOT/../shared/data" -name input.txt -exec cp -L {} "$PACK/input.txt" \; -quit
ls -la "$PACK"
cat <<MSG
Copy ${PACK#"$ROOT"/} to a CUDA machine, into the same place in a checkout of this repository, and run
there, from the repository root:
  bash ${PACK#"$ROOT"/}/gpu_run.sh ${PACK#"$ROOT"/}
It prints the correctness table (CUDA vs CPU per op), the timing table, RESULT: PASS/FAIL, then
trains configs/shakespeare-char-gpu.toml for TRAIN_STEPS steps (default 150, at most TRAIN_S = 240 s)
and prints its tok/s.
MSG
