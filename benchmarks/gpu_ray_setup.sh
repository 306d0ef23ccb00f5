#!/usr/bin/env bash
# Ray (and Optuna and the other packages the GPU machine lacks) onto the GPU machine, whose calls carry at most
# 64 MiB each: the wheels travel as a tar in two parts over two back-to-back calls (the machine stays warm ~30 s
# between calls and keeps /tmp). torch, timm, numpy, pandas, pyarrow, scipy, scikit-learn are there already.
#
#   here (with pip and the registry):  bash benchmarks/gpu_ray_setup.sh download [WHEEL_DIR] [PYTHON_VERSION]
#       wheels for the machine's Python (default 3.12, the H200 image's) into WHEEL_DIR (default .gpu-wheels/wheels,
#       ignored by git), then WHEEL_DIR/../part-1 and part-2 (each <= PART_MIB, default 56 MiB)
#   there, call 1 (carry .gpu-wheels/part-1):  bash benchmarks/gpu_ray_setup.sh part1
#   there, call 2 (carry .gpu-wheels/part-2):  bash benchmarks/gpu_ray_setup.sh part2 [gpu_check.py arguments]
#       joins the parts, installs the wheels (--no-deps) into /tmp/site and runs benchmarks/gpu_check.py with
#       PYTHONPATH=<repo>:/tmp/site (Ray workers inherit it)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAGE=/tmp/uhkd-wheels
# name==version: the versions this project's CI resolves (pip freeze of its venv), for Python 3.10-3.13
WHEELS=(ray==2.60.0 optuna==5.0.0 alembic==1.20.1 mako==1.4.3 sqlalchemy==2.1.9 colorlog==6.12.0
        jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
        tensorboardx==2.6.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions mlxtend==0.25.0)

case "${1:-}" in
download)
    dir=${2:-.gpu-wheels/wheels}
    py=${3:-3.12}
    part_mib=${PART_MIB:-56}
    mkdir -p "$dir"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "${WHEELS[@]}"
    parts=$(dirname "$dir")
    rm -rf "$parts"/part-*
    tar -C "$(dirname "$dir")" -cf "$parts/wheels.tar" "$(basename "$dir")"
    split -b "${part_mib}M" -d -a 2 "$parts/wheels.tar" "$parts/wheels.tar."
    rm "$parts/wheels.tar"
    n=0
    for f in "$parts"/wheels.tar.*; do
        n=$((n + 1))
        mkdir -p "$parts/part-$n"
        mv "$f" "$parts/part-$n/"
    done
    du -sh "$dir"/*.whl "$parts"/part-*
    tree=$(git ls-files -z | du -sc --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    echo "working tree (tracked files): $((tree / 1024)) MiB; each call carries it plus one part (limit 64 MiB)"
    if [ "$n" -gt 2 ]; then
        echo "error: $n parts; two calls carry two: lower PART_MIB only if the tree leaves room, else add a call" >&2
        exit 1
    fi
    ;;
part1)
    mkdir -p "$STAGE"
    cp .gpu-wheels/part-1/wheels.tar.* "$STAGE/"
    ls -l "$STAGE"
    python3 -V
    ;;
part2)
    shift
    cp .gpu-wheels/part-2/wheels.tar.* "$STAGE/"
    cat "$STAGE"/wheels.tar.* | tar -x -C "$STAGE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$STAGE"/wheels/*.whl
    export PYTHONPATH="$ROOT:/tmp/site" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
    python3 -c "import ray, optuna, uhkd; print('ray', ray.__version__, 'optuna', optuna.__version__, uhkd.__file__)"
    python3 benchmarks/gpu_check.py "$@"
    ;;
*)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
