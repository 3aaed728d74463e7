#!/usr/bin/env bash
# Installs CUDA 13.0's compiler (nvcc, NVVM, CRT headers, CCCL) from PyPI into .venv-cuda/
# under the project root, so that build.rs can compile kernels/*.cu on a machine without CUDA.
# Idempotent: a second run only checks and prints the nvcc path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-cuda"
py="${PYTHON:-python3}"
# nvidia-cuda-nvrtc too: the NVRTC fallback (a build without nvcc) is tested by compiling every
# kernel module with it, which needs the library but no GPU.
pkgs=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-cuda-crt==13.0.88
      nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88)

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv" >&2
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
nvcc="$site/nvidia/cu13/bin/nvcc"
if [ ! -x "$nvcc" ] || ! "$venv/bin/python" -m pip show -q "${pkgs[@]%%==*}" >/dev/null 2>&1; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pkgs[@]}" >&2
fi
# The wheels lay nvcc, its host tools and the NVVM library out as one CUDA tree under nvidia/cu13.
[ -x "$nvcc" ] || { echo "install-cuda-compiler: nvcc not found at $nvcc after install" >&2; exit 1; }
"$nvcc" --version >&2
echo "$nvcc"
