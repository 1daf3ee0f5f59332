#!/usr/bin/env bash
# Runs on the GPU machine, from the repo root, over the pack that scripts/gpu_check.sh built:
#   bash target/gpu/gpu_run.sh target/gpu
# 1. gpu_check: CUDA vs CPU for every custom op (forward, backward) and op timings (RESULT line);
#    SKIP_CHECK=1 skips it.
# 2. a training run of configs/shakespeare-char-gpu.toml on the GPU: TRAIN_STEPS steps (default 150;
#    0 skips it), at most TRAIN_S seconds (default 240), evaluating every EVAL_INTERVAL steps (default
#    50, 20 batches) and over the whole validation split at the end; its metrics.jsonl goes to $OUT
#    and tok/s and losses are printed. Extra `--set k=v` for it in TRAIN_SET (the config sets
#    train.tf32 = true; TRAIN_SET="--set train.tf32=false" gives the full-f32 matmuls to compare).
# 3. generation on the GPU from the run's final checkpoint.
set -uo pipefail
P="${1:-target/gpu}"
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
for f in "$P"/*.xz; do xz -dkf "$f"; done
chmod +x "$P/gpu_check" "$P/gumbel-moe"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ "${SKIP_CHECK:-0}" != 1 ]; then
  echo "== gpu_check"
  bash "$P/run_on_gpu.sh" "$P/gpu_check" > "$OUT/gpu_check.txt" 2>&1
  echo "gpu_check exit code $?"
  sed -n '/== run/,$p' "$OUT/gpu_check.txt"
fi
TRAIN_S="${TRAIN_S:-240}"
TRAIN_STEPS="${TRAIN_STEPS:-150}"
if [ "$TRAIN_STEPS" -gt 0 ]; then
  echo "== train configs/shakespeare-char-gpu.toml: $TRAIN_STEPS steps, at most ${TRAIN_S}s"
  rm -rf /tmp/gpu-train
  # shellcheck disable=SC2086
  timeout "$TRAIN_S" bash "$P/run_on_gpu.sh" "$P/gumbel-moe" train --config configs/shakespeare-char-gpu.toml \
    --set "data.source=$P/input.txt" --set "train.max_iters=$TRAIN_STEPS" --set "train.lr_decay_iters=$TRAIN_STEPS" \
    --set "train.eval_interval=${EVAL_INTERVAL:-50}" --set train.eval_iters=20 --set train.ckpt_interval=0 \
    ${TRAIN_SET:-} --out /tmp/gpu-train --quiet > "$OUT/train.log" 2>&1
  echo "train exit code $? (124 = stopped by the time limit)"
  grep -v "^== ldd\|=> \|linux-vdso" "$OUT/train.log" | tail -5
  cp /tmp/gpu-train/metrics.jsonl "$OUT/metrics.jsonl" 2>/dev/null
  python3 - "$OUT/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [r for r in rows if "train_loss" in r]
evals = [r for r in rows if "val_loss" in r and "step" in r]
if steps:
    last = steps[-1]
    tps = sorted(r["tok_per_s"] for r in steps[len(steps) // 4:])
    print(f"steps {last['step']}, last train_loss {last['train_loss']:.4f}, "
          f"tok/s median {tps[len(tps) // 2]:,.0f} (last {last['tok_per_s']:,.0f})")
for r in evals:
    print(f"eval step {r['step']}: val_loss {r['val_loss']:.4f}")
for r in rows:
    if r.get("event") == "done":
        print(f"done: step {r['step']}, full-split val_loss {r['val_loss']:.4f}, wall {r['wall_s']:.1f}s, "
              f"tok/s {r['tok_per_s']:,.0f} (evals included)")
PY
  CK="$(ls -d /tmp/gpu-train/ckpt-* 2>/dev/null | tail -1)"
  if [ -n "$CK" ]; then
    echo "== generate on the GPU from $CK"
    timeout 60 bash "$P/run_on_gpu.sh" "$P/gumbel-moe" generate --checkpoint "$CK" --prompt "ROMEO:" \
      --max-new-tokens 200 --device cuda 2>&1 | sed -n '/== run/,$p'
  fi
fi
