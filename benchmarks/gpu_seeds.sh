#!/usr/bin/env bash
# The 3D initial-model issue's seeds (benchmarks/initial_model.py, whole 200-iteration jobs of
# 5,000 particles) on a CUDA machine, one after the other within a bounded time.
#
#   OUT=<folder> bash benchmarks/gpu_seeds.sh [SECONDS (default 540)] [JOB ...]
#
# JOB is STRUCTURE:SEED (asym:1 ... c4:5; default: all ten, C4 and asymmetric alternating). Each
# job gets what is left of SECONDS; one that does not finish is reported as such. Per job:
# $OUT/<structure>_s<seed>.log and .json (the benchmark's report: FSC with the truth, the
# true-orientation bar, success, seconds); one line per job in $OUT/summary.txt. Uses the machine's
# python3 (its torch) and tamis from src/, the packages tamis needs from .whl/ when the machine
# has no package index (as benchmarks/gpu_check.sh).
set -u
OUT=${OUT:?set OUT to a folder for the logs}
BUDGET=${1:-540}
shift || true
JOBS=("$@")
if [ ${#JOBS[@]} -eq 0 ]; then
    JOBS=(c4:1 asym:1 c4:2 asym:2 c4:3 asym:3 c4:4 asym:4 c4:5 asym:5)
fi
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
start=$SECONDS
for job in "${JOBS[@]}"; do
    structure=${job%%:*}
    seed=${job##*:}
    left=$((BUDGET - (SECONDS - start)))
    if [ "$left" -lt 30 ]; then
        echo "$job: not started (time)" | tee -a "$OUT/summary.txt"
        continue
    fi
    work=/tmp/im_${structure}_s$seed
    t0=$SECONDS
    timeout "$left" python3 benchmarks/initial_model.py --work "$work" --structure "$structure" \
        --n 5000 --seed "$seed" --device cuda --j 16 >"$OUT/${structure}_s$seed.log" 2>&1
    rc=$?
    cp "$work/report.json" "$OUT/${structure}_s$seed.json" 2>/dev/null
    python3 - "$job" "$rc" "$((SECONDS - t0))" "$work/report.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
job, rc, secs, path = sys.argv[1:]
try:
    r = json.load(open(path))
except OSError:
    r = {}
if "success" not in r:
    print(f"{job}: rc {rc}, {secs} s, no result")
else:
    bar = 1.2 * r["true_orientations_res05"]
    print(f"{job}: rc {rc}, {secs} s, FSC 0.5 {r['tamis_res05']:.2f} A against the bar {bar:.2f} A,"
          f" success {r['success']}, symmetry score {r.get('tamis_symmetry_score')}")
EOF
done
cat "$OUT/summary.txt"
