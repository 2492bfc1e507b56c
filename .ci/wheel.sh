#!/usr/bin/env bash
# CI: `pip install .` / a wheel gives a working program. Builds the wheel, installs it into a fresh venv (torch
# first, pinned as in the README, so pip takes the CPU wheel) and starts it from a folder outside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w "$work/dist" .
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0
"$work/venv/bin/pip" install -q "$work"/dist/refusal_lab-*.whl
cd "$work"  # outside the clone: nothing may come from the repository's conf/ or sources
venv/bin/python -c 'import refusal_lab, sys; assert refusal_lab.__file__.startswith(sys.prefix), refusal_lab.__file__'
venv/bin/python -m refusal_lab --help >/dev/null
venv/bin/python -m refusal_lab --cfg job model=mistral_7b layers=all | grep -q 'name: mistralai/Mistral-7B-Instruct-v0.1'
echo "wheel: installed into a fresh venv and started outside the clone"
