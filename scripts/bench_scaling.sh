#!/usr/bin/env bash
# CPU training-step throughput as the model grows, gumbel-moe against the same model in PyTorch
# eager, in one run:
#   bash scripts/bench_scaling.sh
#
# Points (each with its MoE and its dense twin, model.moe_every=0):
#   E=16, E=64, E=256   the default config (configs/shakespeare-char-cpu.toml: RMSNorm, SwiGLU
#                       experts in every block, untied head) with model.moe.num_experts=E;
#                       CPU_CFG=configs/shakespeare-char-cpu-v1.toml gives the previous default
#                       (GELU experts of 256 in blocks 2 and 4, tied head)
#   gpu-shape           configs/shakespeare-char-gpu.toml on the CPU: 6 layers x 384, T = 256,
#                       16 experts of 1536, top-1 in every block; 16 sequences a step (2
#                       micro-batches of 8), dropout 0
# Cells per point and repeat, back to back so that a change of load hits all of them:
#   ours        examples/bench_step (MoE and dense twin), the default model.router.impl = "fused"
#   reference   the same with model.router.impl = "reference" (the plain-tensor router, dispatch
#               and experts), MoE only
#   PyTorch     scripts/torch_gpt.py, MoE (one nn.Module per expert, as HF Mixtral) and dense; the
#               faster of the config's micro-batches in turn and all of a step's sequences in one
#               batch counts
# Every cell uses THREADS cores in all: ours as train.threads = THREADS workers (at most
# grad_accum) with the rest as intra-op threads, PyTorch as torch.set_num_threads(THREADS).
# The table gives medians over the repeats, the ratios and each cell's range.
#
# Environment:
#   POINTS="E=16 E=64 E=256 gpu-shape"   STEPS=20 (default-config points)   STEPS_BIG=4 (gpu-shape)
#   REPEATS=3   THREADS=2   NO_BUILD=1 (use the existing binary)   RAW=file (every measurement, TSV)
#   CPU_CFG=config of the E=N points (default configs/shakespeare-char-cpu.toml)
#   PYTHON=/path/to/python with torch; else the venv .venv-bench/ (scripts/torch_venv.sh)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CARGO_TARGET_DIR:-$HERE/target}/release/examples/bench_step"
POINTS="${POINTS:-E=16 E=64 E=256 gpu-shape}"
STEPS="${STEPS:-20}"
STEPS_BIG="${STEPS_BIG:-4}"
REPEATS="${REPEATS:-3}"
THREADS="${THREADS:-2}"
WARMUP=3 # bench_step's fixed warm-up
CPU_CFG="${CPU_CFG:-$HERE/configs/shakespeare-char-cpu.toml}"
GPU_CFG="$HERE/configs/shakespeare-char-gpu.toml"
VENV="${VENV:-$HERE/.venv-bench}"
log() { echo "$*" >&2; }
die() {
  log "bench_scaling: $*"
  exit 1
}
# shellcheck source=scripts/torch_venv.sh
source "$HERE/scripts/torch_venv.sh"

setup_python
if [ "${NO_BUILD:-0}" != 1 ]; then
  (cd "$HERE" && cargo build --release --example bench_step) >&2
fi
[ -x "$BIN" ] || die "no $BIN"

# point NAME -> CFG, SETS (for both sides), STEPS_N, ACCUM
point() {
  case "$1" in
  E=*)
    CFG="$CPU_CFG"
    SETS=("model.moe.num_experts=${1#E=}")
    STEPS_N="$STEPS"
    ;;
  gpu-shape)
    CFG="$GPU_CFG"
    SETS=(train.device=cpu model.dropout=0 train.batch_size=8 train.grad_accum=2)
    STEPS_N="$STEPS_BIG"
    ;;
  *) die "unknown point $1 (E=N or gpu-shape)" ;;
  esac
  ACCUM="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb")).get("train", {}).get("grad_accum", 1))' "$CFG")"
  for s in "${SETS[@]}"; do
    case "$s" in train.grad_accum=*) ACCUM="${s#*=}" ;; esac
  done
}

RESULTS="$(mktemp)"
trap 'rm -f "$RESULTS"' EXIT
record() { # point model side rep tok/s
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"
}

# ours POINT REP SIDE ARGS...: one bench_step run; SIDE ours (MoE + dense) or reference (MoE).
ours() {
  local pt=$1 rep=$2 side=$3
  shift 3
  local workers=$((THREADS < ACCUM ? THREADS : ACCUM))
  local intra=$((THREADS / workers > 0 ? THREADS / workers : 1))
  local sets=() s out v
  for s in "${SETS[@]}" "train.threads=$THREADS" "$@"; do sets+=("$s"); done
  [ "$side" = reference ] && sets+=(model.router.impl=reference --only moe)
  out="$(cd "$HERE" && RAYON_NUM_THREADS=$intra CANDLE_NUM_THREADS=$intra "$BIN" "$CFG" "$STEPS_N" "${sets[@]}" 2>&1)" ||
    { log "$out"; die "bench_step failed"; }
  for m in moe dense; do
    v="$(sed -n "s/^RESULT model=$m .*tok_per_s=\([0-9.]*\).*/\1/p" <<<"$out" | tail -1)"
    [ -n "$v" ] || continue
    record "$pt" "$m" "$side" "$rep" "$v"
    log "   $pt #$rep $side $m: $v tok/s ($workers workers x $intra)"
  done
}

# theirs POINT REP MODEL: one torch_gpt.py measurement (best of two batch forms).
theirs() {
  local pt=$1 rep=$2 model=$3 best="" form out tok
  local args=(--config "$CFG" --device cpu --threads "$THREADS" --steps "$STEPS_N" --warmup "$WARMUP" --lr 1e-4)
  local s
  for s in "${SETS[@]}"; do args+=(--set "$s"); done
  [ "$model" = dense ] && args+=(--dense)
  local forms=("")
  if [ "$ACCUM" -gt 1 ]; then
    local bsz
    bsz="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb")).get("train", {}).get("batch_size", 12))' "$CFG")"
    for s in "${SETS[@]}"; do
      case "$s" in train.batch_size=*) bsz="${s#*=}" ;; esac
    done
    forms+=("--set train.batch_size=$((bsz * ACCUM)) --set train.grad_accum=1")
  fi
  for form in "${forms[@]}"; do
    # shellcheck disable=SC2086
    out="$(OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS "$PY" "$HERE/scripts/torch_gpt.py" "${args[@]}" $form 2>&1)" ||
      { log "$out"; die "torch_gpt.py failed"; }
    tok="$(sed -n 's/^tok_per_s=\([0-9.]*\).*/\1/p' <<<"$out" | tail -1)"
    [ -n "$tok" ] || { log "$out"; die "no tok_per_s from torch_gpt.py"; }
    if [ -z "$best" ] || awk -v a="$tok" -v b="$best" 'BEGIN { exit !(a > b) }'; then best="$tok"; fi
  done
  record "$pt" "$model" torch "$rep" "$best"
  log "   $pt #$rep PyTorch $model: $best tok/s"
}

read -r load1 _ </proc/loadavg 2>/dev/null || load1=0
log "== load average before the run: $load1 on $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
log "== python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)')), threads: $THREADS, repeats: $REPEATS"
for rep in $(seq 1 "$REPEATS"); do
  for pt in $POINTS; do
    point "$pt"
    ours "$pt" "$rep" ours
    ours "$pt" "$rep" reference
    theirs "$pt" "$rep" moe
    theirs "$pt" "$rep" dense
  done
done
[ -n "${RAW:-}" ] && cp "$RESULTS" "$RAW"

python3 - "$RESULTS" "$REPEATS" "$THREADS" "$POINTS" <<'PY'
import statistics
import sys

path, repeats, threads, points = sys.argv[1:]
cells = {}
for line in open(path):
    pt, model, side, _rep, tok = line.rstrip("\n").split("\t")
    cells.setdefault((pt, model, side), []).append(float(tok))

def med(k):
    v = cells.get(k)
    return statistics.median(v) if v else None

def fmt(v):
    return "-" if v is None else f"{v:,.0f}"

def ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}x"

print(f"\nTraining step tok/s on {threads} threads, median of {repeats} repeats:\n")
print("| point | model | gumbel-moe | impl = reference | PyTorch eager | vs PyTorch | vs reference |")
print("|---|---|---:|---:|---:|---:|---:|")
for pt in points.split():
    for model in ["moe", "dense"]:
        o, r, t = med((pt, model, "ours")), med((pt, model, "reference")), med((pt, model, "torch"))
        print(f"| {pt} | {'MoE' if model == 'moe' else 'dense twin'} | {fmt(o)} | {fmt(r)} | {fmt(t)} | "
              f"{ratio(o, t)} | {ratio(o, r)} |")
print("\nRange over the repeats:")
for (pt, model, side), v in sorted(cells.items()):
    print(f"- {pt} {model} {side}: {fmt(min(v))}-{fmt(max(v))}")
PY
