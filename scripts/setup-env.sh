#!/usr/bin/env bash
# Create (or update) .venv with torch 2.14.1, the six attack libraries and sbpatch itself (non-editable, so the
# SBPATCH start-up hook sbpatch.pth is installed). Idempotent; safe to run before every command.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SBPATCH_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# After an install pip's resolver prints an "ERROR: pip's dependency resolver ..." block listing the dependencies that
# torchattacks, deeprobust and cleverhans declare but never import (installed below with --no-deps on purpose). That
# block is expected: it is replaced by one line. A conflict naming any other package is printed as pip wrote it.
pip_install() {
    local err status=0
    err=$(mktemp)
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>"$err" || status=$?
    awk '
        function flush(i) {
            if (other) { print header; for (i = 1; i <= n; i++) print lines[i] }
            else print "setup-env.sh: (expected) pip notes the dependencies torchattacks, deeprobust and cleverhans " \
                "declare but never import; they are left out on purpose"
            inblock = 0
        }
        /^ERROR: pip.s dependency resolver/ { inblock = 1; header = $0; n = 0; other = 0; next }
        inblock && / (requires|has requirement) / {
            lines[++n] = $0; if ($1 !~ /^(torchattacks|deeprobust|cleverhans)$/) other = 1; next
        }
        inblock { flush() }
        { print }
        END { if (inblock) flush() }
    ' "$err" >&2
    rm -f "$err"
    return "$status"
}
PIP=(pip_install)
"${PIP[@]}" -U pip >/dev/null
# PyTorch first, pinned, so no library can pull another build.
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
# torchattacks pins an old requests, cleverhans declares tensorflow-probability and nose, deeprobust declares
# gensim/numba/networkx/...: none of them is imported by the torch attacks. Install them without dependencies and
# add what they really import (the extras of setup.cfg).
"${PIP[@]}" --no-deps torchattacks==3.5.1 deeprobust==0.2.11 cleverhans==4.0.0 advertorch==0.2.3
"${PIP[@]}" "adversarial-robustness-toolbox==1.20.1" "foolbox==3.3.4" scipy numpy tqdm texttable tensorboardX pillow \
    requests scikit-learn
# The model zoo's architectures (tests/test_zoo.py, benchmarks/zoo.py); neither replaces torch.
"${PIP[@]}" "timm==1.0.31" "transformers==4.57.6"
# The text-attack libraries (tests/test_openattack.py, test_textattack.py, benchmarks/table4.py); they resolve
# without touching torch or numpy. Their data (NLTK, embeddings, models) is never downloaded: the tests build it.
"${PIP[@]}" "transformers<5" OpenAttack==2.1.1 textattack==0.3.11
# Newer attack libraries (tests/test_torchattack.py, test_secmlt.py, test_adv_lib.py, test_nanogcg.py). --no-deps:
# adv-lib declares visdom (does not build here, only used for plots: sbpatch's compat stand-in replaces it when
# missing) and nanogcg pins transformers<=4.47.1; what they really import is installed above.
"${PIP[@]}" --no-deps torchattack==1.7.2 secml-torch==1.5 adv-lib==0.2.8 nanogcg==0.3.0
"${PIP[@]}" --force-reinstall --no-deps .
"${PIP[@]}" ".[test,bench]"
