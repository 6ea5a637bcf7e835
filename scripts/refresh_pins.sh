#!/usr/bin/env bash
# Refresh constraints.txt: resolve the newest versions pyproject.toml allows in a scratch virtual environment,
# run the whole test suite there (scripts/test.sh, fast and slow tests), and only when it passes write that
# environment's versions into constraints.txt (torch excluded: setup_env.sh installs torch==2.13.0 itself).
# Review `git diff constraints.txt` and commit it with the suite's result.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install --quiet --upgrade pip
"$scratch/venv/bin/python" -m pip install --quiet "torch==2.13.0"
# No constraints: the newest compatible release of every dependency.
VIRTUAL_ENV="$scratch/venv" DIFFLORA_CONSTRAINTS="" bash "$repo_root/scripts/test.sh" "$@"
{
  sed -n '/^#/p' "$repo_root/constraints.txt"
  "$scratch/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^torch=='
} > "$scratch/constraints.txt"
mv "$scratch/constraints.txt" "$repo_root/constraints.txt"
echo "constraints.txt refreshed; the suite passed with these versions (git diff constraints.txt)."
