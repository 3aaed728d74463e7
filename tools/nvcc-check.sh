#!/usr/bin/env bash
# Compiles one kernel file the way build.rs does (fatbin, sm_90) and prints ptxas' resource
# report: registers, shared memory, spills. Use before adding a .cu to kernels/.
# Usage: tools/nvcc-check.sh kernels/foo.cu [extra nvcc flags]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${NVCC:-$(ls "$root"/.venv-cuda/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -1)}"
[ -x "$nvcc" ] || nvcc="$("$root/tools/install-cuda-compiler.sh" 2>/dev/null)"
top="$(dirname "$(dirname "$nvcc")")"
src="$1"; shift
arch="${AM3_CUDA_ARCH:-90}"
"$nvcc" -fatbin "-gencode=arch=compute_${arch},code=[sm_${arch},compute_${arch}]" -O3 -std=c++17 -lineinfo \
  --expt-relaxed-constexpr -Xptxas=-v -I "$root/kernels" -I "$top/include" -I "$top/include/cccl" \
  "$src" -o /tmp/nvcc-check.$$.fatbin "$@" 2>&1 | grep -E "error|warning|Compiling entry|registers|spill" | grep -v "0 bytes spill stores, 0 bytes spill loads" || true
rm -f /tmp/nvcc-check.$$.fatbin
