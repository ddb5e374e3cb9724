#!/usr/bin/env bash
# The GPU figures (issue 11, item 5) as one run on a lent device machine: about 5 minutes on one H200.
#
#   1. `sbpatch bench --device cuda --memory`: the default rows (ResNet18, 32 px, B=8, PGD-10 in the six libraries,
#      torchattacks CW and DeepFool);
#   2. the paper's Table 1 size: ResNet50, 224 px, B=16, PGD-50 in the six libraries (the paper used a T4);
#   3. ViT-B/16, 224 px, B=16, PGD-10 in torchattacks, ART and cleverhans: the kernel-preserving rules on a GPU.
#
# Here, once: `benchmarks/gpu_run.sh prepare` builds the attack libraries as wheels into .whl/ (the device machine
# reaches no package registry; its image already holds torch, torchvision, numpy, scipy, scikit-learn, wrapt, rich,
# tqdm, matplotlib) and ignores that folder in git.
# There: the device tool's `run` with carry [".whl"] and timeout_s 590, command `bash benchmarks/gpu_run.sh`.
# Results: $OUT/gpu/ (machine.txt, log.txt, <step>.json and .md; 8 files), or benchmarks/results/gpu/ when OUT is
# unset. Copy them to benchmarks/results/gpu/. DEVICE=cpu QUICK=1 runs the same steps at toy sizes (a plumbing check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

if [ "${1:-}" = prepare ]; then
    set -e
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    VPY=${VENV_PYTHON:-.venv/bin/python}  # pin the helpers to the versions tested here
    pins=$("$VPY" - <<'EOF'
from importlib.metadata import version
names = ["eagerpy", "GitPython", "gitdb", "smmap", "texttable", "tensorboardX"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
)
    # Pure-Python packages: a py3 wheel (downloaded or built from the sdist) installs on the device's Python 3.12.
    # shellcheck disable=SC2086
    "$VPY" -m pip wheel -q --no-deps --wheel-dir .whl torchattacks==3.5.1 deeprobust==0.2.11 cleverhans==4.0.0 \
        advertorch==0.2.3 adversarial-robustness-toolbox==1.20.1 foolbox==3.3.4 $pins
    ls -1 .whl
    du -sh .whl
    exit 0
fi

DEVICE=${DEVICE:-cuda}
RESULTS=${OUT:-benchmarks/results}/gpu
mkdir -p "$RESULTS"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 GIT_PYTHON_REFRESH=quiet
LOG=$RESULTS/log.txt
: > "$LOG"

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")
print("cudnn.deterministic", torch.backends.cudnn.deterministic, "cudnn.benchmark", torch.backends.cudnn.benchmark)
EOF
    "$PY" -m sbpatch status --libraries torchattacks,art,foolbox,advertorch,deeprobust,cleverhans 2>&1 | head -20
} > "$RESULTS/machine.txt" 2>&1
cat "$RESULTS/machine.txt"

if [ "${QUICK:-0}" = 1 ]; then  # toy sizes
    DEFAULT=(--batch-size 2 --steps 1 --repeats 1)
    TABLE1=(--model resnet18 --image-size 32 --batch-size 2 --steps 2 --repeats 1)
    VIT=(--model vit_b_16 --image-size 32 --batch-size 1 --steps 1 --repeats 1)
else
    DEFAULT=()
    TABLE1=(--model resnet50 --image-size 224 --batch-size 16 --steps 50 --repeats 3)
    VIT=(--model vit_b_16 --image-size 224 --batch-size 16 --steps 10 --repeats 3)
fi

step() {  # name, time limit in seconds, sbpatch bench arguments
    local name=$1 limit=$2 status
    shift 2
    echo "== $name (limit ${limit}s): sbpatch bench --device $DEVICE $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$PY" -m sbpatch bench --device "$DEVICE" --json "$RESULTS/$name.json" \
        --markdown "$RESULTS/$name.md" "$@" >> "$LOG" 2>&1
    status=$?
    echo "== $name: exit $status" | tee -a "$LOG"
    tail -25 "$LOG"
}

step bench_default 170 --memory "${DEFAULT[@]}"
step table1_resnet50_224 330 --attacks PGD --memory "${TABLE1[@]}"
step vit_b_16_224 120 --libraries torchattacks,art,cleverhans --attacks PGD "${VIT[@]}"
ls -l "$RESULTS"
