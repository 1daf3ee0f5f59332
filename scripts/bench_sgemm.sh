#!/usr/bin/env bash
# Single-matmul f32 GFLOP/s at the training step's shapes: the gemm crate (what our ops and
# Candle's matmul use), OpenBLAS (Debian's libopenblas, through cblas_sgemm) and PyTorch's
# torch.mm (MKL), one thread each (THREADS=N for more), in one run:
#   bash scripts/bench_sgemm.sh
# Also the six products of one GELU expert with its hidden activations in rows or transposed, the
# two layouts of src/ops/expert_mlp/kernels.rs (one thread), which set its TRANSPOSED_ROWS.
# The Rust harness (scripts/sgemm/main.rs) builds in a throwaway crate under $TMPDIR, so the
# crate itself never links a BLAS. Installs libopenblas-dev with apt-get when it is missing.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
THREADS="${THREADS:-1}"
VENV="${VENV:-$HERE/.venv-bench}"
log() { echo "$*" >&2; }
die() {
  log "bench_sgemm: $*"
  exit 1
}
# shellcheck source=scripts/torch_venv.sh
source "$HERE/scripts/torch_venv.sh"
if ! ls /usr/lib/*/libopenblas.so >/dev/null 2>&1; then
  apt-get install -y --no-install-recommends libopenblas-dev >&2 ||
    { apt-get update >&2 && apt-get install -y --no-install-recommends libopenblas-dev >&2; } ||
    die "libopenblas-dev could not be installed"
fi
DIR="${TMPDIR:-/tmp}/gumbel-moe-sgemm"
mkdir -p "$DIR/src"
cat >"$DIR/Cargo.toml" <<'TOML'
[package]
name = "sgemm"
version = "0.1.0"
edition = "2021"
[dependencies]
gemm = { version = "0.19", default-features = false, features = ["x86-v4", "rayon"] }
rayon = "1"
TOML
echo 'fn main() { println!("cargo:rustc-link-lib=openblas"); }' >"$DIR/build.rs"
cp "$HERE/scripts/sgemm/main.rs" "$DIR/src/main.rs"
(cd "$DIR" && cargo build --release -q) >&2
setup_python
# OpenBLAS picks its kernels from the CPU model, which a VM may hide (it reported "Prescott", an
# SSE3 core, on an AVX-512 Xeon VM): also run it with the core type the CPU's flags support.
core=""
grep -qw avx512f /proc/cpuinfo && core=SkylakeX
[ -z "$core" ] && grep -qw avx2 /proc/cpuinfo && core=Haswell
detected="$(OPENBLAS_VERBOSE=2 "$DIR/target/release/sgemm" 0 2>&1 | sed -n 's/^Core: //p' | head -1)"
echo "## gemm crate and OpenBLAS (core as detected: ${detected:-?}), $THREADS thread(s)"
"$DIR/target/release/sgemm" "$THREADS"
if [ -n "$core" ]; then
  echo
  echo "## gemm crate and OpenBLAS with OPENBLAS_CORETYPE=$core, $THREADS thread(s)"
  OPENBLAS_CORETYPE="$core" "$DIR/target/release/sgemm" "$THREADS"
fi
echo
echo "## One GELU expert's six products, hidden activations in rows or transposed (ops::expert_mlp), one thread"
"$DIR/target/release/sgemm" layouts
echo
echo "## torch.mm, $THREADS thread(s) ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
"$PY" "$HERE/scripts/sgemm/torch_mm.py" "$THREADS"
