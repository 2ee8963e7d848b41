#!/usr/bin/env bash
# Create the project's virtual environment and install Strongroom with its fleet and test extras.
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}
if ! command -v "$python" >/dev/null 2>&1; then
  echo "strongroom: $python not found; install Python 3.11 or newer (e.g. apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "strongroom: Python 3.11 or newer is needed; $("$python" --version) found. Run make with PYTHON=python3.11" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "creating virtual environment in $venv"
  "$python" -m venv "$venv" || {
    echo "strongroom: could not create a virtual environment; install the venv module (e.g. apt-get install python3-venv)" >&2
    exit 1
  }
fi
echo "installing strongroom and its dependencies into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[fleet,onnx,test]'
