"""The Python the Hugging Face scripts run under: the repo's .venv-bench (scripts/bench_vs_pytorch.sh
makes it, with torch) when it exists, plus transformers installed there on first use. PYTHON=... or an
interpreter that already has torch and transformers is used as it is."""
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure():
    have = lambda m: importlib.util.find_spec(m) is not None
    venv_python = os.path.join(ROOT, ".venv-bench", "bin", "python")
    if not (have("torch") and have("transformers")) and os.path.exists(venv_python) \
            and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv-bench")):
        os.execv(venv_python, [venv_python] + sys.argv)
    if not have("torch"):
        sys.exit("torch is missing: run scripts/bench_vs_pytorch.sh once (it makes .venv-bench with torch), "
                 "or run this script with a Python that has torch")
    if not have("transformers"):
        print("installing transformers into", sys.prefix, file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "transformers"])
