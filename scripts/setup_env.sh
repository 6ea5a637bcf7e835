#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install difflora into it. Sourced by demo.sh and test.sh.
#
# - An already active virtual environment ($VIRTUAL_ENV) is used as it is; otherwise ./.venv is created.
# - torch is installed first, and only where none is importable: torch==2.13.0, the CPU build on a
#   machine without CUDA, so a plain dependency resolution never pulls a multi-GB CUDA build by accident.
#   A torch that is already there (for example your CUDA build) is respected.
# - Then difflora itself, editable, with the extras given as arguments (e.g. "dev"), every dependency at the
#   version pinned in constraints.txt: the versions the test suite passes with, so an upstream release cannot
#   break a fresh install. DIFFLORA_CONSTRAINTS names another constraints file, or none when set empty
#   (scripts/refresh_pins.sh resolves the newest versions that way).
# - With the "dev" extra (the test suite's set-up), Debian's chromium for the web UI's browser tests
#   (scripts/install_chromium.sh: apt-get when missing, nothing when present).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"

if [ -n "${VIRTUAL_ENV:-}" ]; then
  venv="$VIRTUAL_ENV"
else
  venv="$repo_root/.venv"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
fi
python="$venv/bin/python"
"$python" -m pip install --quiet --upgrade pip

if ! "$python" -c "import torch" >/dev/null 2>&1; then
  echo "Installing torch==2.13.0 (no torch found in $venv)"
  "$python" -m pip install --quiet "torch==2.13.0"
fi

target="$repo_root"
[ -n "$extras" ] && target="$repo_root[$extras]"
constraints="${DIFFLORA_CONSTRAINTS-$repo_root/constraints.txt}"
"$python" -m pip install --quiet ${constraints:+--constraint "$constraints"} -e "$target"
case ",$extras," in
  *,dev,*) bash "$repo_root/scripts/install_chromium.sh" ;;
esac
export PATH="$venv/bin:$PATH"
export DIFFLORA_PYTHON="$python"
