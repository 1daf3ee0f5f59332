#!/usr/bin/env bash
# Training-step throughput, gumbel-moe vs the same model in PyTorch eager, in one run:
#   bash scripts/bench_vs_pytorch.sh
#
# Ours: target/release/examples/bench_step (examples/bench_step.rs), which times the config and
# its dense twin (model.moe_every=0) and prints a markdown table with tok/s. Theirs:
# scripts/torch_gpt.py, the same network, init and optimizer in plain PyTorch eager (no
# torch.compile), run on the same config file and the same text. For each repeat and each thread
# count the two run back to back (ours 1T, torch 1T, ours 2T, torch 2T, ...), so a change of load
# on the machine hits both; the table gives the median over the repeats.
#
# The timed step is the same on both sides: forward + loss and backward of each micro-batch
# (train.grad_accum), gradient clipping, AdamW step, after 3 warm-up steps. Clipping follows
# bench_step: its current version times Trainer::train_step, which clips; the older one timed its
# own step without clipping, and torch_gpt.py then runs with --no-clip (TORCH_CLIP=1|0 forces).
#
# Threads: N per run in all. With train.threads (below) our run has min(N, grad_accum) workers,
# micro-batches side by side, with N / workers intra-op threads each (RAYON_NUM_THREADS =
# CANDLE_NUM_THREADS); PyTorch uses torch.set_num_threads(N) and is timed both with the config's
# micro-batches in turn and with all of a step's sequences in one batch; the faster counts.
#
# Python: a venv in .venv-bench/ (git-ignored) with torch from PyPI, made on first use. PyPI's
# Linux torch wheel is the CUDA build; it is installed with its CUDA libraries (torch does not
# import without them) but without triton (~1 GB, only torch.compile needs it): ~4.4 GB, ~2 min.
# TORCH_INDEX_URL=<a CPU wheel index> installs the CPU-only wheel instead where that index is
# reachable; PYTHON=/path/to/python uses an existing interpreter that has torch.
#
# Environment:
#   STEPS=20          timed steps per measurement       REPEATS=3    measurements per cell
#   THREADS="1 2"     CPU thread counts                 CONFIG=...   default configs/shakespeare-char-cpu.toml
#   NO_BUILD=1        do not run cargo (the binary must exist); otherwise cargo builds the example
#                     when a source is newer than the binary
#   CRATE_DIR=...     the crate whose bench_step runs (default: the parent of CARGO_TARGET_DIR when
#                     that holds a Cargo.toml, else this repo); CARGO_TARGET_DIR is honoured
#   BENCH_THREADS_KEY=1|0  pass / never pass `--set train.threads=N` to bench_step (default: when
#                     TrainConfig in CRATE_DIR/src/config/mod.rs has a `threads` field)
#   TORCH_CLIP=1|0    clip in the PyTorch step or not (default: as bench_step, see above)
#   DATA=path         the training text (default: ../shared/data/tinyshakespeare/input.txt if there)
#   TORCH_ARGS="..."  extra torch_gpt.py arguments, e.g. "--attn manual" or "--adamw foreach"
#   DEVICE=cuda       also (or, with THREADS="", only) the GPU pass: configs/shakespeare-char-gpu.toml
#                     with --set train.device=cuda vs torch --device cuda. Automatic when nvidia-smi
#                     runs and a CUDA build of bench_step exists (CUDA_BIN, default
#                     target-cuda/release/examples/bench_step: CARGO_TARGET_DIR=target-cuda cargo
#                     build --release --features cuda --example bench_step; toolchain as in
#                     scripts/gpu_check.sh). DEVICE=cpu skips it.
#   RAW=file          also write every measurement there (TSV)
#   OMP_WAIT_POLICY, KMP_*, ...: inherited by the PyTorch runs (e.g. PASSIVE on a shared machine)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${CRATE_DIR:-}" ]; then
  if [ -n "${CARGO_TARGET_DIR:-}" ] && [ -f "$(dirname "$CARGO_TARGET_DIR")/Cargo.toml" ]; then
    CRATE_DIR="$(cd "$(dirname "$CARGO_TARGET_DIR")" && pwd)"
  else
    CRATE_DIR="$HERE"
  fi
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$CRATE_DIR/target}"
BIN="$TARGET_DIR/release/examples/bench_step"
CUDA_BIN="${CUDA_BIN:-$CRATE_DIR/target-cuda/release/examples/bench_step}"
STEPS="${STEPS:-20}"
REPEATS="${REPEATS:-3}"
THREADS="${THREADS-1 2}"
WARMUP=3 # bench_step's fixed warm-up (examples/bench_step.rs: time_steps(cfg, 3, steps))
CONFIG="${CONFIG:-$CRATE_DIR/configs/shakespeare-char-cpu.toml}"
GPU_CONFIG="${GPU_CONFIG:-$CRATE_DIR/configs/shakespeare-char-gpu.toml}"
VENV="${VENV:-$HERE/.venv-bench}"
log() { echo "$*" >&2; }
die() {
  log "bench_vs_pytorch: $*"
  exit 1
}

# ---------------------------------------------------------------- Python with torch
# shellcheck source=scripts/torch_venv.sh
source "$HERE/scripts/torch_venv.sh"

# ---------------------------------------------------------------- our binary
build() {
  if [ "${NO_BUILD:-0}" = 1 ]; then
    [ -x "$BIN" ] || die "NO_BUILD=1 but $BIN does not exist"
    return
  fi
  local newer=""
  if [ -x "$BIN" ]; then
    newer="$(cd "$CRATE_DIR" && find src examples kernels Cargo.toml Cargo.lock build.rs -newer "$BIN" -print -quit 2>/dev/null || true)"
  fi
  if [ -x "$BIN" ] && [ -z "$newer" ]; then
    log "== $BIN is newer than the sources: no build"
    return
  fi
  log "== cargo build --release --example bench_step in $CRATE_DIR (target $TARGET_DIR)"
  (cd "$CRATE_DIR" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --example bench_step) >&2
}

threads_key() {
  case "${BENCH_THREADS_KEY:-auto}" in
  1) return 0 ;;
  0) return 1 ;;
  esac
  # The config module is src/config/mod.rs (src/config.rs in older checkouts).
  { cat "$CRATE_DIR/src/config/mod.rs" "$CRATE_DIR/src/config.rs" 2>/dev/null || true; } \
    | sed -n '/pub struct TrainConfig/,/^}/p' | grep -q 'pub threads:'
}

# ---------------------------------------------------------------- data
if [ -z "${DATA:-}" ]; then
  for c in "$CRATE_DIR/../shared/data/tinyshakespeare/input.txt" "$HERE/../shared/data/tinyshakespeare/input.txt" \
    "$CRATE_DIR/data/tinyshakespeare.txt"; do
    if [ -f "$c" ]; then
      DATA="$(cd "$(dirname "$c")" && pwd)/$(basename "$c")"
      break
    fi
  done
fi
OUR_DATA=()
TORCH_DATA=()
if [ -n "${DATA:-}" ]; then
  OUR_DATA=(--set "data.source=$DATA")
  TORCH_DATA=(--data "$DATA")
elif [ -z "${HF_HOME:-}" ] && [ -d "$CRATE_DIR/../shared/data/hf-cache/hub" ]; then
  export HF_HOME="$CRATE_DIR/../shared/data/hf-cache" # the crate's hf:// source, offline
fi

# ---------------------------------------------------------------- one measurement each
RESULTS="$(mktemp)"
trap 'rm -f "$RESULTS"' EXIT
record() { # device model threads side rep tok/s
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"
}

# bench_step's tok/s of MODEL (moe | dense) from its output: the `RESULT model=.. tok_per_s=..`
# lines of newer versions, else the markdown table's tok/s column (found by its header).
parse_ours() {
  local out=$1 key=$2 row v
  v="$(sed -n "s/^RESULT model=$key .*tok_per_s=\([0-9.]*\).*/\1/p" <<<"$out" | tail -1)"
  if [ -z "$v" ]; then
    [ "$key" = moe ] && row="moe" || row="dense twin"
    v="$(awk -F'|' -v row="$row" '
      /^\| model/ { for (i = 2; i < NF; i++) { h = $i; gsub(/ /, "", h); if (h == "tok/s") col = i } }
      col && $2 ~ "^ *" row { x = $col; gsub(/ /, "", x); print x }' <<<"$out" | tail -1)"
  fi
  echo "$v"
}

# ours DEVICE THREADS REP BIN CONFIG SET...: one bench_step run (config + dense twin).
# INTRA (RAYON_NUM_THREADS = CANDLE_NUM_THREADS, Candle's intra-op threads) and WORKERS
# (the data-parallel workers the run is expected to have) are set by the caller.
ours() {
  local dev=$1 n=$2 rep=$3 bin=$4 cfg=$5
  shift 5
  local env=() out
  if [ "$n" != "-" ]; then
    env=(RAYON_NUM_THREADS="$INTRA" CANDLE_NUM_THREADS="$INTRA")
  fi
  if ! out="$(cd "$CRATE_DIR" && env "${env[@]}" "$bin" "$cfg" "$STEPS" "$@" 2>&1)"; then
    log "$out"
    die "bench_step failed"
  fi
  local moe dense workers
  moe="$(parse_ours "$out" moe)"
  dense="$(parse_ours "$out" dense)"
  [ -n "$moe" ] && [ -n "$dense" ] || {
    log "$out"
    die "could not read tok/s from bench_step's output"
  }
  workers="$(sed -n 's/^RESULT model=moe workers=\([0-9]*\).*/\1/p' <<<"$out" | tail -1)"
  record "$dev" moe "$n" ours "$rep" "$moe"
  record "$dev" dense "$n" ours "$rep" "$dense"
  log "   gumbel-moe  $dev ${n}T #$rep: moe $moe, dense $dense tok/s${workers:+ ($workers workers x $INTRA intra-op threads)}"
}

# theirs DEVICE MODEL THREADS REP ARG...: one torch_gpt.py run.
theirs() {
  local dev=$1 model=$2 n=$3 rep=$4
  shift 4
  local env=() args=() out
  if [ "$n" != "-" ]; then
    env=(OMP_NUM_THREADS="$n" MKL_NUM_THREADS="$n")
    args=(--threads "$n")
  fi
  [ "$model" = dense ] && args+=(--dense)
  [ "$TORCH_CLIP" = 1 ] || args+=(--no-clip)
  # PyTorch at its best for the same tokens per step: the config's micro-batches in turn, and
  # (when grad_accum > 1) all sequences in one batch; the faster of the two counts.
  local forms=("") line tok best="" form
  [ "${ONE_BATCH_SETS:-}" ] && forms+=("$ONE_BATCH_SETS")
  for form in "${forms[@]}"; do
    # shellcheck disable=SC2086
    if ! out="$(env "${env[@]}" "$PY" "$HERE/scripts/torch_gpt.py" --steps "$STEPS" --warmup "$WARMUP" --lr 1e-4 \
      "${args[@]}" "$@" $form ${TORCH_ARGS:-} 2>&1)"; then
      log "$out"
      die "torch_gpt.py failed"
    fi
    line="$(grep '^tok_per_s=' <<<"$out" | tail -1)"
    tok="${line#tok_per_s=}"
    tok="${tok%% *}"
    [ -n "$tok" ] || {
      log "$out"
      die "no tok_per_s line from torch_gpt.py"
    }
    log "   PyTorch     $dev ${n}T #$rep: $model $tok tok/s${form:+ ($form)}"
    if [ -z "$best" ] || awk -v a="$tok" -v b="$best" 'BEGIN { exit !(a > b) }'; then best="$tok"; fi
  done
  tok="$best"
  record "$dev" "$model" "$n" torch "$rep" "$tok"
  log "   PyTorch     $dev ${n}T #$rep: $model $tok tok/s ($(grep -o 'params=[0-9]*' <<<"$line"), $(grep -o 'loss_first=.*' <<<"$line"))"
  [ "$rep" = 1 ] && grep '^# ' <<<"$out" | sed 's/^/   /' >&2
  return 0
}

# ---------------------------------------------------------------- run
setup_python
# A busy machine spoils both sides, PyTorch's most: its OpenMP threads spin at each barrier, and
# with a core taken by another process its 2-thread steps measured 10-15x slower than 1-thread
# ones (OMP_WAIT_POLICY=PASSIVE, passed through, softens that).
read -r load1 _ </proc/loadavg 2>/dev/null || load1=0
if awk -v l="$load1" 'BEGIN { exit !(l >= 1.0) }'; then
  log "note: load average $load1 on $(nproc) cores before the run: other processes compete for the cores and the"
  log "      numbers, PyTorch's multi-threaded ones most (OpenMP threads spin), mean little; rerun on a quiet machine"
fi
log "== python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"

run_cuda=0
case "${DEVICE:-auto}" in
cuda) run_cuda=1 ;;
cpu) run_cuda=0 ;;
*) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ -x "$CUDA_BIN" ]; then run_cuda=1; fi ;;
esac

# Clipping: the crate's Trainer::train_step clips (train.grad_clip); the older bench_step timed
# its own step (examples/common/step_timer.rs) without clipping. The PyTorch step does the same.
if [ -z "${TORCH_CLIP:-}" ]; then
  if grep -q 'train_step' "$CRATE_DIR/examples/bench_step.rs" 2>/dev/null; then TORCH_CLIP=1; else TORCH_CLIP=0; fi
fi

if [ -n "$THREADS" ]; then
  build
  OUR_SETS=("${OUR_DATA[@]}")
  use_key=0
  if threads_key; then use_key=1; fi
  # With train.threads = N the crate runs min(N, grad_accum) micro-batches side by side; each
  # worker gets N / workers intra-op threads, so every run uses N threads in all.
  accum="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb")).get("train", {}).get("grad_accum", 1))' "$CONFIG")"
  bsz="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb")).get("train", {}).get("batch_size", 12))' "$CONFIG")"
  ONE_BATCH_SETS=""
  [ "$accum" -gt 1 ] && ONE_BATCH_SETS="--set train.batch_size=$((bsz * accum)) --set train.grad_accum=1"
  log "== CPU: $(basename "$CONFIG") and its dense twin, threads: $THREADS; $STEPS steps after $WARMUP warm-up, $REPEATS repeats"
  log "   ours: $BIN$([ "$use_key" = 1 ] && echo " with --set train.threads=N (grad_accum $accum)")"
  log "   PyTorch: torch_gpt.py --threads N, gradient clipping $([ "$TORCH_CLIP" = 1 ] && echo on || echo off) (as bench_step)"
  log "   data: ${DATA:-data.source of the config}"
  for rep in $(seq 1 "$REPEATS"); do
    for n in $THREADS; do
      extra=()
      WORKERS=1
      if [ "$use_key" = 1 ]; then
        extra=(--set "train.threads=$n")
        WORKERS=$((n < accum ? n : accum))
      fi
      INTRA=$((n / WORKERS > 0 ? n / WORKERS : 1))
      ours cpu "$n" "$rep" "$BIN" "$CONFIG" "${OUR_SETS[@]}" "${extra[@]}"
      theirs cpu moe "$n" "$rep" --config "$CONFIG" --device cpu "${TORCH_DATA[@]}"
      theirs cpu dense "$n" "$rep" --config "$CONFIG" --device cpu "${TORCH_DATA[@]}"
    done
  done
fi

if [ "$run_cuda" = 1 ]; then
  [ -x "$CUDA_BIN" ] || die "DEVICE=cuda: no CUDA build of bench_step at $CUDA_BIN (see the header)"
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || die "DEVICE=cuda: torch sees no GPU"
  log "== CUDA: $(basename "$GPU_CONFIG") and its dense twin; $STEPS steps after $WARMUP warm-up, $REPEATS repeats"
  INTRA=-
  for rep in $(seq 1 "$REPEATS"); do
    ours cuda - "$rep" "$CUDA_BIN" "$GPU_CONFIG" "${OUR_DATA[@]}" --set train.device=cuda
    theirs cuda moe - "$rep" --config "$GPU_CONFIG" --device cuda "${TORCH_DATA[@]}"
    theirs cuda dense - "$rep" --config "$GPU_CONFIG" --device cuda "${TORCH_DATA[@]}"
  done
fi

[ -n "${RAW:-}" ] && cp "$RESULTS" "$RAW"

# ---------------------------------------------------------------- table
python3 - "$RESULTS" "$REPEATS" "$STEPS" "$(basename "$CONFIG")" "$(basename "$GPU_CONFIG")" "$TORCH_CLIP" <<'PY'
import statistics
import sys

path, repeats, steps, cpu_cfg, gpu_cfg, clip = sys.argv[1:]
cells = {}
for line in open(path):
    dev, model, threads, side, _rep, tok = line.rstrip("\n").split("\t")
    cells.setdefault((dev, model, threads), {}).setdefault(side, []).append(float(tok))

def name(dev, model):
    cfg = cpu_cfg if dev == "cpu" else gpu_cfg
    return (f"MoE ({cfg})" if model == "moe" else "dense twin") + (" on CUDA" if dev == "cuda" else "")

def fmt(v):
    return f"{v:,.0f}"

what = "forward, backward, clipping, AdamW" if clip == "1" else "forward, backward, AdamW; no clipping"
print(f"\nTraining step ({what}), tok/s, median of {repeats} runs of {steps} steps:\n")
print("| model | threads | gumbel-moe tok/s | PyTorch eager tok/s | ratio |")
print("|---|---:|---:|---:|---:|")
order = sorted(cells, key=lambda k: (k[0] != "cpu", k[1] != "moe", k[2]))
spread = []
for dev, model, threads in order:
    c = cells[(dev, model, threads)]
    ours, theirs = c.get("ours", []), c.get("torch", [])
    if not ours or not theirs:
        continue
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print(f"| {name(dev, model)} | {threads if threads != '-' else 'GPU'} | {fmt(mo)} | {fmt(mt)} | {mo / mt:.2f}x |")
    spread.append(f"{name(dev, model)}, {threads}T: gumbel-moe {fmt(min(ours))}-{fmt(max(ours))}, "
                  f"PyTorch {fmt(min(theirs))}-{fmt(max(theirs))}")
print("\nratio = gumbel-moe / PyTorch (above 1: ours is faster). PyTorch: the faster of the config's")
print("micro-batches in turn and all of a step's sequences in one batch. Range over the repeats:")
for s in spread:
    print(f"- {s}")
PY
