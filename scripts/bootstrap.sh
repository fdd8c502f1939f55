#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv with torch 2.13.0 (CPU wheel), lowbit and its
# test tools, plus Debian's Fashion-MNIST when it is missing. Safe to run again and again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LOWBIT_VENV:-.venv}
if ! command -v "$PY" >/dev/null; then
  echo "lowbit setup: $PY not found; install Python 3.10+ first" >&2; exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "lowbit setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.lowbit-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "lowbit setup: installing torch==2.13.0 and lowbit (first run takes a minute)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
  # outside-zoo test material (see pyproject.toml): --no-deps keeps its torchvision (and a CUDA torch) out
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps pytorchcv==0.0.74
  touch "$stamp"
fi
if [ -z "${LOWBIT_FASHION_MNIST:-}" ] && [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "lowbit setup: installing Debian's dataset-fashion-mnist" >&2
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "lowbit setup: Fashion-MNIST is missing and apt-get is not available (or not root)." >&2
    echo "  Install Debian's dataset-fashion-mnist, or set LOWBIT_FASHION_MNIST to a folder with" >&2
    echo "  the four *-ubyte.gz files. Tests that need it will be skipped." >&2
  fi
fi
