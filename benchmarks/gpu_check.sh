#!/usr/bin/env bash
# One GPU session's check: every GPU number the README needs (python -m sdtm_kernels gpu-check).
# Run from the repository root on the GPU machine, e.g. through the device tool:
#   bash benchmarks/gpu_check.sh            (results in $OUT/gpu_check, else ./gpu_check_out)
# Optional carried folders (ignored by git, named in the run's carry list):
#   .whl/           wheels of missing packages (diffusers; the GPU image has none), installed here
#   .triton_cache/  triton_cache.tar.gz from an earlier GPU session (--save-triton-cache): a warm JIT
# Extra arguments go to gpu-check (e.g. --budget-s 300 --only correctness kernel_timings).
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-./gpu_check_out}/gpu_check"
mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1
python=python3

if ls .whl/*.whl >/dev/null 2>&1; then
    # --no-deps: the image already has diffusers' needs (huggingface-hub, safetensors, regex, Pillow, ...)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the package runs from this checkout (no install needed: it is pure Python)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

cache_args=(--save-triton-cache "$out_dir/triton_cache.tar.gz")
if [ -f .triton_cache/triton_cache.tar.gz ]; then
    cache_args+=(--triton-cache .triton_cache/triton_cache.tar.gz)
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$out_dir/nvidia_smi.csv" 2>&1
"$python" -m sdtm_kernels gpu-check --out "$out_dir" "${cache_args[@]}" "$@" 2>&1 | tee "$out_dir/log.txt"
exit "${PIPESTATUS[0]}"
