#!/usr/bin/env bash
# CPU/GPU agreement and GPU speed on a CUDA machine, in one call with a bounded time.
#
#   OUT=<folder> bash benchmarks/gpu_check.sh [seconds for the whole-suite step; 0 (default): skip it]
#
# Runs with the machine's python3 (its torch) and tamis from src/; starfile, mrcfile and gemmi come
# from .whl/ when the machine has no package index. Steps, each under its own timeout, logs in $OUT:
#   1. tests/test_gpu.py: kernels and small Class2D / initial-model runs, CPU against CUDA
#      (measured differences in $OUT/agreement.jsonl)
#   2. benchmarks/class2d.py, hard recipe, EM (5 iterations) and VDAM (30 mini-batches), --device cuda
#   3. benchmarks/initial_model.py, asymmetric structure, 30 iterations, --device cuda
#   3b. benchmarks/motioncorr.py, one simulated 4096² x 40 movie, --device cuda (tifffile and
#      imagecodecs from .whl/ when the machine has no package index)
#   4. (when asked) the whole test suite with CUDA as the "auto" device (pytest-xdist)
set -u
OUT=${OUT:?set OUT to a folder for the logs}
SUITE_S=${1:-0}
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"
step() {  # step NAME SECONDS COMMAND...
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 4 "$OUT/$name.log"
}
TAMIS_GPU_REPORT=$OUT/agreement.jsonl step agreement 150 \
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
cat "$OUT/agreement.jsonl" 2>/dev/null
step em_hard 120 python3 benchmarks/class2d.py --recipe hard --algo em --n 6000 --K 20 --iter 5 \
    --device cuda --j 16 --work /tmp/hard
grep -E '^\[|"(wall_s|iteration_s|particles_per_s|estep_fraction_of_matmul|matmul_gflops|class_purity|junk)' \
    "$OUT/em_hard.log" | head -20
step vdam_hard 60 python3 benchmarks/class2d.py --recipe hard --algo vdam --n 6000 --K 20 \
    --iter 30 --device cuda --j 16 --work /tmp/hard
grep -E '"(wall_s|particles_per_s|estep_fraction_of_matmul)' "$OUT/vdam_hard.log"
step initial_model 120 python3 benchmarks/initial_model.py --structure asym --n 5000 --iter 30 \
    --device cuda --j 16 --work /tmp/im
grep -E '^iteration' "$OUT/initial_model.log" | tail -n 3
step motioncorr 180 python3 benchmarks/motioncorr.py --dir /tmp/mc4k --size 4096 --frames 40 \
    --n 1 --device cuda
grep -E '"(seconds_per_movie|global_median_px|total_rms_last_px)' "$OUT/motioncorr.log" | head -4
[ "$SUITE_S" -gt 0 ] && step suite "$SUITE_S" python3 -m pytest -q -p no:cacheprovider -n 8 -x tests
cat "$OUT/summary.txt"
