#!/usr/bin/env bash
# CI: `pip install .` / a wheel gives a working program. Builds the wheel, installs it into a fresh venv (torch
# first, pinned as in the README, so pip takes the CPU wheel) and starts it, and a two-job local sweep, from a folder
# outside the clone.
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
# A two-job local sweep: Hydra must find hydra/launcher=local in the installed hydra_plugins namespace (issue 18).
HF_HUB_OFFLINE=1 venv/bin/python -m refusal_lab -m hydra/launcher=local hydra.sweep.dir="$work/sweep" \
    artifacts_dir="$work/artifacts" 'stages=[collect]' tracking=disabled data.limit=4 'inference.max_new_tokens=2,4'
n=$(find "$work/sweep" -name summary.json | wc -l)
[[ $n -eq 2 ]] || { echo "wheel: the local sweep wrote $n summaries, not 2" >&2; exit 1; }
echo "wheel: installed into a fresh venv, started and swept (local launcher) outside the clone"
