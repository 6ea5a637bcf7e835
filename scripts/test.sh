#!/usr/bin/env bash
# Set up (venv + torch + difflora[dev]) and run the whole test suite, slow end-to-end tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast tests only.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/setup_env.sh" dev
cd "$repo_root"
export HF_HUB_OFFLINE=1
"$DIFFLORA_PYTHON" -m pytest "$@"
