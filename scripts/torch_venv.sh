# Sourced by the benchmark scripts: `setup_python` sets PY to a Python with torch: $PYTHON when
# set, else the venv $VENV (made on first use from PyPI). The caller defines `log` and `die`.
#
# PyPI's Linux torch wheel is the CUDA build; it is installed with its CUDA libraries (torch does
# not import without them) but without triton (~1 GB, only torch.compile needs it): ~4.4 GB,
# ~2 min. TORCH_INDEX_URL=<a CPU wheel index> installs the CPU-only wheel instead where that index
# is reachable.
setup_python() {
  if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
    "$PY" -c 'import torch' || die "PYTHON=$PYTHON cannot import torch"
    return
  fi
  PY="$VENV/bin/python"
  if [ -x "$PY" ] && "$PY" -c 'import torch' 2>/dev/null; then
    return
  fi
  command -v python3 >/dev/null || die "python3 not found"
  python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null ||
    die "python3 >= 3.11 is needed (tomllib)"
  local free_kb
  free_kb="$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 {print $4}')"
  if [ -z "${TORCH_INDEX_URL:-}" ] && [ "${free_kb:-0}" -lt $((7 * 1024 * 1024)) ]; then
    die "torch from PyPI takes ~4.4 GB (+ ~1 GB of downloads); $(dirname "$VENV") has $((free_kb / 1024)) MB free"
  fi
  log "== creating $VENV with torch (first use only)"
  local t0=$SECONDS
  python3 -m venv "$VENV"
  local pip=("$PY" -m pip install --disable-pip-version-check --progress-bar off)
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" "torch${TORCH_VERSION:+==$TORCH_VERSION}" >&2
  else
    # The wheel alone, then its requirements without triton (torch.compile's compiler, not
    # needed in eager mode); pip evaluates the markers.
    "${pip[@]}" --no-deps "torch${TORCH_VERSION:+==$TORCH_VERSION}" >&2
    local req="$VENV/torch-requirements.txt"
    "$PY" - >"$req" <<'PY'
import importlib.metadata as md
import re
for r in md.requires("torch") or []:
    name = re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0].lower()
    if name == "triton" or "extra ==" in r:
        continue
    print(r)
PY
    "${pip[@]}" -r "$req" >&2
  fi
  "${pip[@]}" numpy >&2 # torch warns at import without it
  "$PY" -c 'import torch; print("torch", torch.__version__)' >&2 || die "torch does not import in $VENV"
  log "== venv ready in $((SECONDS - t0)) s, $(du -sh "$VENV" | cut -f1)"
}

