#!/usr/bin/env bash
# Refresh requirements.lock: resolve requirements.txt's ranges afresh (today's newest allowed versions) in a
# throwaway virtualenv and pin every installed distribution. `make upgrade-lock` runs this, then the tests; commit
# the new lock only if they pass (CONTRIBUTING.md, "Dependencies").
#   scripts/upgrade_lock.sh [LOCK]          PYTHON=python3 TORCH=torch==2.13.0 by default
set -euo pipefail
cd "$(dirname "$0")/.."
lock=${1:-requirements.lock}
python=${PYTHON:-python3}
torch_spec=${TORCH:-torch==2.13.0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q "$torch_spec" -r requirements.txt
{
  echo "# requirements.lock: every package CI installs on a CPU machine, pinned (constraints for pip -c)."
  echo "# Made by scripts/upgrade_lock.sh ($(date -u +%Y-%m-%d), $("$tmp/venv/bin/python" -V), $(uname -m)) from"
  echo "# requirements.txt with $torch_spec; torch itself is left out (the Makefile's TORCH picks the CPU or CUDA"
  echo "# build). The GPU figures in MOE_TRAINING_GUIDE.md section 8 were measured with torch 2.11, transformers 5.17,"
  echo "# peft 0.21, lightning 2.6.6 (the GPU machine's own install), not with these."
  "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | grep -viE '^(torch|lightning-moe)==' | LC_ALL=C sort -f
} > "$tmp/lock"
mv "$tmp/lock" "$lock"
echo "wrote $lock ($(grep -vc '^#' "$lock") pins)"
