#!/usr/bin/env bash
# Create .venv/ in the repo root and install verl-grto with what its tests need, on CPU.
#
# torch/torchvision are pinned by a constraints file for CPU machines (the package itself only
# asks for ranges): on x86_64 these builds install from the CI machines' local disk; a bare
# `pip install torch` would download multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

arch=$(uname -m)
constraints="constraints/cpu-${arch}.txt"
if [[ ! -f "$constraints" ]]; then
  echo "install.sh: no tested CPU constraints for $arch (have: $(ls constraints))" >&2
  exit 2
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c "$constraints" -e ".[dev]"
# Meta's SAM2 code (parity tests, official checkpoint conversion). Its wheel metadata would pull
# a CUDA toolchain build; the Python code is all we need.
# iopath (what sam2's Hiera imports) is installed with its own dependencies (portalocker).
.venv/bin/python -m pip install -q -c "$constraints" iopath
SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q -c "$constraints" --no-deps --no-build-isolation "sam2==1.1.0"
# megatron-core for the Megatron recipe's test only (tests/test_megatron_with_core.py hands this folder
# to a child pytest): kept off the venv's path, where it would change the engines verl registers.
.venv/bin/python -m pip install -q --no-deps --target .venv/megatron-core "megatron-core==0.16.1"
.venv/bin/verl-grto doctor
