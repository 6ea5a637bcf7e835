#!/usr/bin/env bash
# Set up (venv + torch + difflora[dev]) and run the whole test suite, slow end-to-end tests included
# (plain `pytest` runs only the fast ones: pyproject's addopts). Extra arguments go to pytest, and a -m
# among them replaces this one, e.g. `bash scripts/test.sh -m "not slow"` for the fast tests only.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/setup_env.sh" dev
cd "$repo_root"
export HF_HUB_OFFLINE=1
"$DIFFLORA_PYTHON" -m pytest -m "slow or not slow" "$@"
