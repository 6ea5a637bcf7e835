#!/usr/bin/env bash
# Set up (venv + torch + difflora[dev]) and run the whole test suite, slow end-to-end tests included
# (plain `pytest` runs only the fast ones: pyproject's addopts). Extra arguments go to one pytest run of
# both, and a -m among them replaces its -m, e.g. `bash scripts/test.sh -m "not slow"` for the fast tests only.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/setup_env.sh" dev
cd "$repo_root"
export HF_HUB_OFFLINE=1
if [ "$#" -gt 0 ]; then
  "$DIFFLORA_PYTHON" -m pytest -n 0 -m "slow or not slow" "$@"  # a -n among the arguments replaces this one
else
  # Fast and slow tests on one pytest-xdist worker per core; a full-size test (the SDXL checkpoint alone
  # takes ~20 GB) has the machine to itself while it runs (tests/support/scheduling.py). The 25 costliest
  # tests are listed at the end: where the suite's time goes, for whoever makes it faster.
  "$DIFFLORA_PYTHON" -m pytest -m "slow or not slow" --durations=25
fi
