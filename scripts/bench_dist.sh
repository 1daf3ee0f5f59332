#!/usr/bin/env bash
# Data-parallel throughput on one machine, in one run: the default config trained by
#   one      one process, one thread (train.threads=1, RAYON_NUM_THREADS=CANDLE_NUM_THREADS=1)
#   workers  one process, two workers (train.threads=2: the step's 2 micro-batches side by side)
#   mpi      mpirun -np 2, one thread each (OpenMPI's default binding: one core per rank)
#   ep       the same with train.expert_parallel=2 (each rank holds half of every layer's experts)
# each STEPS steps (no evaluation but the last), REPEATS rounds back to back so that a change of
# load hits all three. tok/s is the median over the log intervals after the first LOG steps, as
# the trainer logs it (tokens of the whole step, all ranks, over wall time); the table gives the
# median over the rounds and the ratios, and for the two-rank runs the MiB rank 0 sent per step
# (the metrics' sent_mib_per_step: gradients, and for ep the rows to the experts and back).
#
#   bash scripts/bench_dist.sh            (installs OpenMPI via scripts/install_mpi.sh if missing)
#
# Environment: STEPS=200  REPEATS=3  NO_BUILD=1 (use the existing binary)  NICE=-10 (priority
# of the measured runs, when root; 0 to leave it)  CONFIG=configs/shakespeare-char-cpu.toml
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CARGO_TARGET_DIR:-$HERE/target}/release/gumbel-moe"
STEPS="${STEPS:-200}"
REPEATS="${REPEATS:-3}"
CONFIG="${CONFIG:-$HERE/configs/shakespeare-char-cpu.toml}"
NICE="${NICE:--10}"
LOG=10
command -v mpirun >/dev/null || bash "$HERE/scripts/install_mpi.sh"
if [ "${NO_BUILD:-0}" != 1 ]; then
  (cd "$HERE" && cargo build --release --features mpi) >&2
fi
[ -x "$BIN" ] || { echo "bench_dist: no $BIN" >&2; exit 1; }
# OpenMPI's defaults otherwise: shared-memory transport with single-copy (CMA) transfers, ranks
# bound to cores, busy-polling while they wait.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PRIO=()
[ "$(id -u)" = 0 ] && [ "$NICE" != 0 ] && PRIO=(nice -n "$NICE")
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
SETS=(--set "train.max_iters=$STEPS" --set "train.lr_decay_iters=$STEPS" --set train.eval_interval=100000
  --set train.ckpt_interval=0 --set train.final_full_eval=false --set "train.log_interval=$LOG" --quiet)

# median tok/s of the log lines after the first LOG steps of run dir $1
rate() {
  python3 - "$1/metrics.jsonl" "$LOG" <<'EOF'
import json, statistics, sys
xs = [json.loads(l) for l in open(sys.argv[1])]
r = [x["tok_per_s"] for x in xs if "train_loss" in x and x["step"] > int(sys.argv[2])]
print(f"{statistics.median(r):.0f}")
EOF
}

run() { # name -> tok/s
  local out="$WORK/$1.$2"
  case "$1" in
  one) RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 "${PRIO[@]}" "$BIN" train --config "$CONFIG" "${SETS[@]}" \
    --set train.threads=1 --out "$out" >/dev/null 2>"$out.err" ;;
  workers) "${PRIO[@]}" "$BIN" train --config "$CONFIG" "${SETS[@]}" --set train.threads=2 --out "$out" \
    >/dev/null 2>"$out.err" ;;
  mpi) "${PRIO[@]}" mpirun -np 2 "$BIN" train --config "$CONFIG" "${SETS[@]}" --set train.threads=1 --out "$out" \
    >/dev/null 2>"$out.err" ;;
  ep) "${PRIO[@]}" mpirun -np 2 "$BIN" train --config "$CONFIG" "${SETS[@]}" --set train.threads=1 \
    --set train.expert_parallel=2 --out "$out" >/dev/null 2>"$out.err" ;;
  esac || { cat "$out.err" >&2; exit 1; }
  rate "$out"
}

# median MiB sent per step by rank 0 (two-rank runs) of run dir $1
sent() {
  python3 - "$1/metrics.jsonl" "$LOG" <<'EOF'
import json, statistics, sys
xs = [json.loads(l) for l in open(sys.argv[1])]
r = [x["sent_mib_per_step"] for x in xs if "sent_mib_per_step" in x and x["step"] > int(sys.argv[2])]
print(f"{statistics.median(r):.1f}" if r else "-")
EOF
}

declare -A R
for i in $(seq 1 "$REPEATS"); do
  for c in one workers mpi ep; do
    v="$(run "$c" "$i")"
    R[$c]="${R[$c]:-} $v"
    echo "round $i: $c $v tok/s" >&2
  done
done
params="$(grep -o 'training [0-9]* parameters' "$WORK/one.1.err" | grep -o '[0-9]*')"
med() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
one="$(echo "${R[one]}" | med)"
workers="$(echo "${R[workers]}" | med)"
mpi="$(echo "${R[mpi]}" | med)"
ep="$(echo "${R[ep]}" | med)"
echo
echo "$(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $STEPS steps, median of $REPEATS"
echo
echo "| run | tok/s | vs one process, one thread | MiB sent per step, rank 0 | rounds |"
echo "|---|---:|---:|---:|---|"
for c in one workers mpi ep; do
  echo "| $c | $(echo "${R[$c]}" | med) | $(python3 -c "print(f'{$(echo "${R[$c]}" | med)/$one:.2f}x')") | $(sent "$WORK/$c.1") |${R[$c]} |"
done
echo
python3 -c "print(f'mpi vs workers: {$mpi/$workers:.2f}x; ep vs mpi: {$ep/$mpi:.2f}x; all gradients: {4*$params/2**20:.1f} MiB ($params parameters)')"
