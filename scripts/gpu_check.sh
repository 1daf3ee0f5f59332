#!/usr/bin/env bash
# Builds ONE `--features cuda` binary here (examples/gpu_check.rs: CUDA vs CPU for every router
# op, forward and backward, then timings), puts it with run_on_gpu.sh under target/gpu/, and
# prints the device-tool call that runs it on the GPU machine.
# Needs the pinned CUDA 13.0 toolchain (bash $ROOT/../shared/gpu/setup_cuda_pip.sh). Builds in
# CARGO_TARGET_DIR (default target-cuda beside target/) so the CPU target/ is untouched; a first build takes
# ~10 min on 2 cores (candle-kernels).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ -f "$HOME/.local/cuda-pip/env.sh" ] || bash "$ROOT/../shared/gpu/setup_cuda_pip.sh"
# shellcheck disable=SC1091
source "$HOME/.local/cuda-pip/env.sh"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-cuda}"
bash scripts/check_kernels.sh
cargo build --release --features cuda --example gpu_check
mkdir -p target/gpu
cp "$CARGO_TARGET_DIR/release/examples/gpu_check" target/gpu/gpu_check
strip target/gpu/gpu_check 2>/dev/null || true
cp "$ROOT/../shared/gpu/run_on_gpu.sh" target/gpu/run_on_gpu.sh
echo "built target/gpu/gpu_check ($(du -h target/gpu/gpu_check | cut -f1))"
cat <<'MSG'
Run it on the GPU machine with the device tool (target/ is ignored, so carry it):
  run(command="bash target/gpu/run_on_gpu.sh target/gpu/gpu_check 2>&1 | tee $OUT/gpu_check.txt",
      carry=["target/gpu"], timeout_s=300)
It prints a correctness table (CUDA vs CPU: candidate/selection mismatches, relative errors of y,
of the backward op and of dlogits through the whole router) and a timing table; RESULT: PASS/FAIL.
MSG
