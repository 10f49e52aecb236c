#!/usr/bin/env bash
# The GPU check in one call (docs/benchmarks.md, "A GPU check in one call"). Run from anywhere:
#   benchmarks/gpu/device_check.sh [--out FILE] [device_check.py options]
# Needs python with torch, transformers, torchvision, safetensors and numpy (no verl, Ray or vLLM);
# PYTHON overrides the interpreter. Writes the JSON to --out (default: $OUT/device_check.json when
# $OUT is set, else ./device_check.json) and prints it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-python}"
"$python" - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "torchvision", "safetensors", "numpy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"device_check: missing packages: {', '.join(missing)}")
PY
out_default="${OUT:-.}/device_check.json"
case " $* " in
  *" --out "*|*" --out="*) exec env PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" "$root/benchmarks/gpu/device_check.py" "$@" ;;
  *) exec env PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" "$root/benchmarks/gpu/device_check.py" --out "$out_default" "$@" ;;
esac
