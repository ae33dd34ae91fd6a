#!/bin/bash
# What ran on the H200 the device tool lent (one call, from the repository root, $OUT the folder that comes back):
#   1. training SPS of lv_happo_vmas.py --cuda at the study's setting, N = 3, 8 and 12, one run at a time;
#      Then (a second call that day) the same at 4,096 environments, and the script's defaults (1,024 environments,
#      2 epochs) at N = 3 and 12, where the GPU pays off;
#   2. every other script once with --cuda (short runs; SMAX with the machine's CUDA jax), beside
#   3. the study's N = 12 runs (3 variants x 3 seeds) at once on the GPU until a deadline, then SIGTERM: each run
#      writes its checkpoint, for benchmark/run.py to go on from on the CPU (`--resume`). On 2026-11-30
#      (`bash benchmark/results/scaling/gpu.sh 2000000 480`) the nine shared the GPU at ~250 SPS each, 2,300 together,
#      what one run alone gets: they reached 57,600 steps and were dropped (README.md beside this file).
# The machine has torch, jax (CUDA) and matplotlib but not the environments. .site/site312.tar.xz (ignored, carried)
# holds them for its Python 3.12: the wheels of tyro docstring-parser typeguard gymnasium farama-notifications
# pettingzoo mpe2 pygame-ce gym gym-notices vmas gymnasium-robotics mujoco mujoco-core mujoco-studio glfw jaxmarl
# (versions of requirements-test.txt's install here; gym and vmas built with `pip wheel`), put in /tmp/site312 by
# `pip install --no-deps --target /tmp/site312 --only-binary=:all: --python-version 3.12 --platform ...`, without
# gymnasium_robotics/envs/assets, mujoco/studio, mujoco/doc and pygame's docs, examples and tests (under 64 MiB).
# usage: bash benchmark/results/scaling/gpu.sh BUDGET DEADLINE_SECONDS
set -u
BUDGET=${1:-2000000}
DEADLINE=${2:-420}
OUT=${OUT:-/tmp/out}
ROOT=$(pwd)
START=$(date +%s)
mkdir -p "$OUT" /tmp/w
[ -f .site/site312.tar.xz ] && tar -C /tmp -xJf .site/site312.tar.xz && export PYTHONPATH=/tmp/site312
export PYTHONUNBUFFERED=1 MUJOCO_GL=egl
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import sys, torch, jax, vmas, mujoco, tyro; print(sys.version.split()[0], 'torch', torch.__version__,
'jax', jax.__version__, jax.default_backend(), 'vmas', vmas.__version__, 'mujoco', mujoco.__version__)" 2>&1 | tail -1
    nproc
} > "$OUT/env.txt" 2>&1

# 1. SPS, one run at a time, no evaluation (the study's flags of benchmark/run.py, 40 iterations of 256 x 25)
SCALING="--num-envs 256 --num-steps 25 --update-epochs 5 --num-minibatches 4 --gamma 0.95"  # run.py's
for n in 3 8 12; do
    (cd /tmp/w && timeout 150 python3 "$ROOT/lv_happo_vmas.py" --cuda --num-agents "$n" $SCALING \
        --total-timesteps "${SPS_STEPS:-256000}" --seed 1 > "sps-n$n.log" 2>&1)
    echo "N=$n $(grep -o 'SPS=[0-9]*' "/tmp/w/sps-n$n.log" | tail -1)" >> "$OUT/sps.txt"
done
for n in 3 8 12; do
    (cd /tmp/w && timeout 60 python3 "$ROOT/lv_happo_vmas.py" --cuda --num-agents "$n" ${SCALING/256/4096} \
        --total-timesteps 614400 --seed 1 > "big-n$n.log" 2>&1)
    echo "4096 envs N=$n $(grep -o 'SPS=[0-9]*' "/tmp/w/big-n$n.log" | tail -1)" >> "$OUT/sps.txt"
done
for n in 3 12; do
    (cd /tmp/w && timeout 45 python3 "$ROOT/lv_happo_vmas.py" --cuda --num-agents "$n" --total-timesteps 256000 \
        --seed 1 > "defaults-n$n.log" 2>&1)
    echo "defaults N=$n $(grep -o 'SPS=[0-9]*' "/tmp/w/defaults-n$n.log" | tail -1)" >> "$OUT/sps.txt"
done

# 3. the study's N = 12 runs on the GPU, in their own process group
setsid python3 benchmark/run.py --settings scaling-vmas-spread-n12 --variants lv happo mappo --seeds 1 2 3 \
    --total-timesteps "$BUDGET" --workers 9 --out /tmp/grid -- --cuda > "$OUT/grid.txt" 2>&1 &
GRID=$!

# 2. the other scripts, short runs with --cuda, two at a time beside the grid
smoke() {
    name=$1
    shift
    mkdir -p "/tmp/w/$name" && (cd "/tmp/w/$name" && timeout 240 python3 "$ROOT/$@" --cuda > log.txt 2>&1
        echo "exit $?" >> log.txt)
}
(
    smoke mpe lv_happo_mpe.py --total-timesteps 20000 --eval-every 10 --eval-episodes 5 --save-model
    smoke hatrpo lv_hatrpo_mpe.py --total-timesteps 20000 --eval-every 10 --eval-episodes 5
) &
SMOKE1=$!
(
    smoke mamujoco lv_happo_mamujoco.py --agent-conf 2x3 --total-timesteps 10000 --eval-every 5 --eval-episodes 2
    smoke smax lv_happo_smac.py --env-id 3s5z --total-timesteps 32000 --eval-every 5 --eval-episodes 8 --save-model
) &
SMOKE2=$!
sleep 30
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv > "$OUT/smoke.txt" 2>&1
wait $SMOKE1 $SMOKE2
for name in mpe hatrpo mamujoco smax; do
    { echo "== $name"; grep -v "^global_step" "/tmp/w/$name/log.txt" | tail -n 12; } >> "$OUT/smoke.txt"
done

# the grid until the deadline, then a checkpoint from each run (SIGTERM), and the folders back as archives
while [ $(($(date +%s) - START)) -lt "$DEADLINE" ] && kill -0 $GRID 2> /dev/null; do sleep 5; done
pkill -TERM -f lv_happo_vmas.py
sleep 15
for log in /tmp/grid/*/*/*/log.txt; do echo "$log: $(grep -o 'global_step=[0-9]*' "$log" | tail -1)"; done >> "$OUT/grid.txt"
for variant in lv happo mappo; do  # one archive per variant: three checkpoints of 4.8 MB each, under 16 MiB
    tar -C /tmp -czf "$OUT/grid-$variant.tar.gz" "grid/scaling-vmas-spread-n12/$variant"
done
tar -C /tmp -czf "$OUT/logs.tar.gz" w/sps-n3.log w/sps-n8.log w/sps-n12.log $(cd /tmp && ls w/*/log.txt)
echo "total $(($(date +%s) - START)) s" >> "$OUT/env.txt"
