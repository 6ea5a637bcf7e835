#!/usr/bin/env bash
# Set up (venv + torch + difflora), then the main job on the embedded model: train the two sample adapters
# and generate images composing them with different weights. Runs on a CPU in a few minutes.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/setup_env.sh"
cd "$repo_root"
export HF_HUB_OFFLINE=1

difflora train sample_data/style
difflora train sample_data/subject
difflora generate "a red crossglyph on a white background, zebrastripes style" \
  --adapters style:1,subject:0.8 --num-images 4 --out outputs/composed
difflora generate "a blue crossglyph on a white background, zebrastripes style" \
  --sweep style:0,0.5,1 --sweep subject:0,0.5,1 --out outputs/sweep
echo "Done: adapters in ./adapters, images in ./outputs/composed and ./outputs/sweep"
