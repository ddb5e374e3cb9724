#!/usr/bin/env bash
# Create (or update) .venv with torch 2.14.1, the six attack libraries and sbpatch itself (non-editable, so the
# SBPATCH start-up hook sbpatch.pth is installed). Idempotent; safe to run before every command.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SBPATCH_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" -U pip >/dev/null
# PyTorch first, pinned, so no library can pull another build.
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
# torchattacks pins an old requests, cleverhans declares tensorflow-probability and nose, deeprobust declares
# gensim/numba/networkx/...: none of them is imported by the torch attacks. Install them without dependencies and
# add what they really import (the extras of setup.cfg).
"${PIP[@]}" --no-deps torchattacks==3.5.1 deeprobust==0.2.11 cleverhans==4.0.0 advertorch==0.2.3
"${PIP[@]}" "adversarial-robustness-toolbox==1.20.1" "foolbox==3.3.4" scipy numpy tqdm texttable tensorboardX pillow \
    requests scikit-learn
"${PIP[@]}" --force-reinstall --no-deps .
"${PIP[@]}" ".[test,bench]"
