#!/bin/bash
# The paper-pairs grid: each (task, seed) pair of LV-HAPPO and HAPPO side by side, one core each; launched again, it
# skips finished runs and resumes cut ones from their checkpoints. Usage: bash benchmark/results/pairs/run.sh [GRID]
set -u
cd "$(dirname "$0")/../../.."
G=${1:-~/lv-grids/paper-pairs}
run() { python benchmark/run.py --settings "$1" --variants lv happo --seeds "$2" --total-timesteps "$3" --workers 2 --out "$G"; }
run paper-mamujoco-humanoid-17x1 1 2000000
for seed in 1 2 3 4 5; do
  run paper-mamujoco-halfcheetah-6x1 "$seed" 5000000
  run paper-mamujoco-ant-8x1 "$seed" 5000000
  if [ "$seed" -ge 2 ] && [ "$seed" -le 3 ]; then run paper-mamujoco-humanoid-17x1 "$seed" 2000000; fi
done
run paper-mamujoco-walker2d-6x1 1 5000000  # HAPPO's settings for both variants
python benchmark/report.py --grid "$G" --out benchmark/results/pairs
