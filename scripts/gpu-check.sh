#!/usr/bin/env bash
# GPU checks: on a CUDA machine, install the CUDA stack (torch, Triton, DeepSpeed, Transformer Engine) into a venv
# and run the gpu-marked tests (tests/gpu/), one summary line per check:
#   TE FP8 training step vs the emulation, the TE backend in the LightningModule, the compiled Triton packed
#   kernel vs its float64 reference, DeepSpeed ZeRO-2 on NCCL with one GPU.
# Usage: bash scripts/gpu-check.sh [VENV_DIR]   (default .venv-gpu; reused when it exists)
#   Offline GPU machine whose python3 already has a CUDA torch: QAT_GPU_WHEELS=DIR bash scripts/gpu-check.sh
#   installs only the wheels in DIR (e.g. deepspeed, jsonargparse, gguf: `pip download`/`pip wheel` them on a
#   connected machine) beside that python's packages; checks whose packages are missing skip, saying which.
# Budget: under 8 minutes when pip finds wheels; TE's PyTorch extension is compiled when no wheel matches.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-gpu}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no NVIDIA GPU here (nvidia-smi missing or failing); on CPU the gpu tests skip with their reason" >&2
    exit 2
fi
echo "gpu-check: $(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | head -1)"

start=$SECONDS
if [ -n "${QAT_GPU_WHEELS:-}" ]; then
    # No index reachable: the system python3 brings torch/triton/lightning/transformers, the wheels the rest.
    SITE="${TMPDIR:-/tmp}/qat-gpu-site"
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$QAT_GPU_WHEELS"/*.whl
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    PY=python3
else
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
    "$PY" -m pip install -q --upgrade pip
    # PyPI's Linux torch wheels are the CUDA builds and pull in a matching triton.
    "$PY" -m pip install -q torch triton
    "$PY" -m pip install -q -e ".[deepspeed,test]"
    # TE needs torch already installed (no build isolation); its core library comes as a CUDA 12 wheel.
    "$PY" -m pip install -q --no-build-isolation "transformer-engine[pytorch]>=2.0" \
        || echo "gpu-check: Transformer Engine did not install; its checks will skip"
fi
"$PY" -c 'import torch; assert torch.cuda.is_available(), "this torch does not see the GPU"; print("gpu-check: torch", torch.__version__, "CUDA", torch.version.cuda)'
echo "gpu-check: install took $((SECONDS - start)) s"

export QAT_CACHE_DIR="${QAT_CACHE_DIR:-$PWD/.cache/qat}" TRITON_INTERPRET=0 OMP_NUM_THREADS=4 DS_ACCELERATOR=cuda
CHECKS=(
    "FP8 emulation vs tensor-core FP8 GEMM|tests/gpu/test_gpu_checks.py::test_fp8_emulation_matches_the_gpus_fp8_gemm"
    "TE FP8 step vs emulation|tests/gpu/test_gpu_checks.py::test_te_fp8_step_matches_emulation"
    "TE backend in the LightningModule|tests/gpu/test_gpu_checks.py::test_te_backend_in_the_module_swaps_only_full_precision_linears"
    "CUDA dp4a GEMV (nvcc) vs reference|tests/gpu/test_gpu_checks.py::test_cuda_gemv_on_gpu_matches_reference"
    "Triton packed kernel vs reference|tests/gpu/test_gpu_checks.py::test_triton_packed_kernel_on_gpu_matches_reference"
    "DeepSpeed ZeRO-2 on NCCL, 1 GPU|tests/gpu/test_gpu_checks.py::test_deepspeed_zero2_on_nccl_one_gpu_with_fp8_layers"
)
failed=0
log_dir="${QAT_GPU_LOG_DIR:-$(mktemp -d)}"; mkdir -p "$log_dir"
for check in "${CHECKS[@]}"; do
    name="${check%%|*}"; test_id="${check#*|}"
    log="$log_dir/$(echo "$name" | tr -c 'A-Za-z0-9' '_').log"
    t0=$SECONDS
    if timeout "${QAT_GPU_CHECK_TIMEOUT:-300}" "$PY" -m pytest -q -rs -s "$test_id" >"$log" 2>&1; then
        if grep -q " skipped" "$log" && ! grep -q " passed" "$log"; then
            status="SKIP ($(grep -m1 '^SKIPPED' "$log" | sed 's/^SKIPPED \[[0-9]*\] [^:]*:[0-9]*: //'))"
        else
            status="PASS"
        fi
    else
        status="FAIL (log: $log)"
        failed=1
        tail -n 30 "$log" | sed 's/^/    /' >&2
    fi
    printf 'gpu-check: %-36s %s  %ds\n' "$name" "$status" "$((SECONDS - t0))"
done
echo "gpu-check: total $((SECONDS - start)) s"
exit $failed
