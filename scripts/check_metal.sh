#!/usr/bin/env bash
# Type-checks the Metal side of the crate for Apple silicon on this Linux machine: candle's Metal
# backend and our `metal_fwd` glue (pipelines, buffer bindings) with `cargo check` for
# aarch64-apple-darwin. Nothing is linked or run (no Mac here). The `hub` feature is off: hf-hub's
# TLS stack has a C build script (aws-lc-sys) that cannot build for the Apple target here.
# Builds in CARGO_TARGET_DIR (default target-metal beside target/).
# Usage: bash scripts/check_metal.sh        (exit status 1 when the check fails)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-apple-darwin; then
  rustup target add aarch64-apple-darwin
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-metal}"
cargo check --target aarch64-apple-darwin --no-default-features --features metal --lib --examples
echo "check_metal: ok"
