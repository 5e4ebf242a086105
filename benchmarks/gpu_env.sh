# Sourced by the GPU scripts (benchmarks/gpu_check.sh, benchmarks/gpu_seeds.sh): the machine's
# python3 (its torch) with tamis from src/, and the packages tamis needs from .whl/ when the
# machine has no package index.
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
