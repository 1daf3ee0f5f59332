#!/usr/bin/env bash
# Benchmarks of `gumbel-moe prepare` and of training on prepared data (docs/data.md has the results):
#   1. prepare of a synthesized ~1 GB corpus (scripts/make_corpus.py: made-up Zipf words, not a
#      repeated text) with a byte-level BPE of 8,192 tokens, MB/s beside Hugging Face `tokenizers`'
#      Python encode_batch_fast on the same tokenizer.json and text (scripts/bench_hf_tokenizers.py);
#   2. peak RSS of prepare on 100 MB against 1 GB (/usr/bin/time -v);
#   3. training start-up on the 1 GB prepared corpus against a 1 MB one (one step, one eval batch);
#   4. training tok/s on prepared Tiny Shakespeare against the in-memory text (configs/shakespeare-bpe-cpu.toml).
# usage: scripts/bench_prepare.sh [WORK_DIR]   (default /tmp/gumbel-moe-bench; ~5 GB of disk)
# Needs target/release/gumbel-moe (cargo build --release) or BIN=...; a Python venv with numpy and
# tokenizers is made in WORK_DIR/venv unless PY=... names a python that has them.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/gumbel-moe-bench}
BIN=${BIN:-$PWD/target/release/gumbel-moe}
mkdir -p "$W"
PY=${PY:-$W/venv/bin/python}
if ! "$PY" -c "import numpy, tokenizers" 2>/dev/null; then
  python3 -m venv "$W/venv" && "$W/venv/bin/pip" install -q numpy tokenizers
  PY=$W/venv/bin/python
fi
echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load: $(uptime | sed 's/.*load average: //')"
"$PY" -c "import tokenizers; print('python tokenizers', tokenizers.__version__)"
for mb in 1 100 1000; do
  [ -f "$W/c$mb.txt" ] || "$PY" scripts/make_corpus.py "$mb" "$W/c$mb.txt" "$mb"
done
# Rows of /usr/bin/time -v: wall clock and peak RSS.
timed() { grep -E "Elapsed \(wall|Maximum resident" "$1" | sed 's/^\s*/  /'; }

echo "== tokenizer: byte-level BPE 8192 trained on the default 64 MiB sample of the 100 MB corpus"
rm -rf "$W/tok"
/usr/bin/time -v "$BIN" prepare --source "$W/c100.txt" --tokenizer bpe:8192 --out "$W/tok" --quiet 2> "$W/tok.time" >/dev/null
timed "$W/tok.time"
TOK=$W/tok/tokenizer.json

echo "== 1, 2: prepare with that tokenizer.json (no training), then HF tokenizers on the same file"
for mb in 1 100 1000; do
  rm -rf "$W/p$mb"
  /usr/bin/time -v "$BIN" prepare --source "$W/c$mb.txt" --tokenizer "$TOK" --out "$W/p$mb" --quiet \
    > "$W/p$mb.json" 2> "$W/p$mb.time"
  echo "prepare $mb MB: $(cat "$W/p$mb.json")"
  timed "$W/p$mb.time"
done
echo "hf tokenizers 1000 MB: $("$PY" scripts/bench_hf_tokenizers.py "$TOK" "$W/c1000.txt")"

echo "== 3: training start-up: process wall (1 step, 1 eval batch, 1 save) minus the training loop's own wall_s"
for mb in 1 1000 1 1000 1 1000; do
  rm -rf "$W/run$mb"
  /usr/bin/time -f "%e %M" -o "$W/run$mb.time" "$BIN" train --config configs/tinystories-bpe-cpu.toml \
    --set "data.source=\"$W/p$mb\"" --set train.max_iters=1 --set train.eval_iters=1 --set train.ckpt_interval=0 \
    --out "$W/run$mb" --quiet 2>/dev/null | tail -1 > "$W/run$mb.out"
  "$PY" - "$W/run$mb.time" "$W/run$mb.out" "$mb" <<'PYEOF'
import json, sys
wall, rss = open(sys.argv[1]).read().split()
fit = json.loads(open(sys.argv[2]).read())["wall_s"]
print(f"start-up {sys.argv[3]} MB: process {float(wall):.2f} s, loop {fit:.2f} s, start-up {float(wall) - fit:.2f} s, peak RSS {int(rss) // 1024} MB")
PYEOF
done

echo "== 4: training tok/s, Tiny Shakespeare prepared (BPE 1024) vs in memory, 300 steps each"
head -c 1003854 data/tinyshakespeare.txt > "$W/shk-train.txt"
tail -c +1003855 data/tinyshakespeare.txt > "$W/shk-val.txt"
rm -rf "$W/pshk"
"$BIN" prepare --source "$W/shk-train.txt" --val-source "$W/shk-val.txt" --separator "" --tokenizer bpe:1024 \
  --out "$W/pshk" --quiet > /dev/null
for src in mem prep mem prep; do
  rm -rf "$W/tr-$src"
  set -- --set train.max_iters=300 --set train.eval_interval=1000 --set train.final_full_eval=false \
    --set train.ckpt_interval=0 --set train.lr_decay_iters=300
  [ "$src" = prep ] && set -- "$@" --set "data.source=\"$W/pshk\""
  "$BIN" train --config configs/shakespeare-bpe-cpu.toml "$@" --out "$W/tr-$src" --quiet > /dev/null 2>&1
  "$PY" - "$W/tr-$src/metrics.jsonl" "$src" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tps = [r["tok_per_s"] for r in rows if "tok_per_s" in r and r.get("step", 0) > 20 and "event" not in r]
print(f"train {sys.argv[2]}: median tok/s over steps 21..300 = {statistics.median(tps):.0f} ({len(tps)} log lines)")
PYEOF
done
echo "== done $(date -u '+%H:%M UTC'), load: $(uptime | sed 's/.*load average: //')"
