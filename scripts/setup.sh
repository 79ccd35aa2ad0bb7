#!/usr/bin/env bash
# Set up everything napari-lesionseg needs on a fresh Debian/Ubuntu machine (idempotent):
# system libraries for a headless Qt/OpenGL display (Xvfb), a virtual environment in .venv,
# torch (the CPU build where there is no NVIDIA GPU), and the project with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1 libdbus-1-3 libglib2.0-0"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=""
  for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "setup: installing system packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi

# pip on some machines warns about missing local index folders; hide only that noise.
quiet_pip() { .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lesionseg-setup
want="$(sha1sum pyproject.toml | cut -c1-40)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      quiet_pip torch
    else
      # A bare `torch` would pull a multi-GB CUDA build onto a CPU-only machine.
      quiet_pip "torch==2.13.0"
    fi
  fi
  quiet_pip -e ".[gui,pyqt6,testing]"
  .venv/bin/python -c "import torch, napari, training_backend, napari_lesionseg" 
  echo "$want" > "$stamp"
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
