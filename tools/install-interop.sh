#!/usr/bin/env bash
# Installs the Python side of the interop check (torch CPU, transformers, peft) from PyPI into
# .venv-interop/ under the project root. Idempotent: a second run only checks and prints the
# venv's python path. Large (torch pulls its CUDA wheels from PyPI), so CI runs it only when
# AM3_INTEROP=1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-interop"
py="${PYTHON:-python3}"
pkgs=(torch==2.15.0 torchvision==0.29.2 transformers==5.24.0 peft==0.21.2 safetensors numpy pillow jinja2)

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv" >&2
fi
if ! "$venv/bin/python" -c 'import torch, torchvision, transformers, peft, safetensors, numpy' >/dev/null 2>&1; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pkgs[@]}" >&2
fi
"$venv/bin/python" -c 'import torch, transformers, peft; print("interop: torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' >&2
echo "$venv/bin/python"
