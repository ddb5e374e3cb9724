#!/usr/bin/env bash
# The GPU figures as one run on a lent device machine: at most 9 minutes on one H200 (each step has a time limit).
#
#   0. `benchmarks/llm.py --device cuda --sizes 1.26B,6.7B --dtypes bfloat16`: a GCG gradient step on random Llama
#      models up to Llama-2-7B's shape, as shipped vs sbpatch, wall time and CUDA allocator peaks (issue 17);
#   0b. `benchmarks/gpu_exactness.py`: the input gradient of six torchvision models as shipped, one-liner and
#      sbpatch, default and deterministic kernels (is each bit-identical on this GPU, and which rules fired);
#   1. `sbpatch bench --device cuda --memory`: the default rows (ResNet18, 32 px, B=8, PGD-10 in the six libraries,
#      torchattacks CW and DeepFool);
#   2. the paper's Table 1 size: ResNet50, 224 px, B=16, PGD-50 in the six libraries (the paper used a T4);
#   3. ViT-B/16, 224 px, B=16, PGD-10 in torchattacks, ART and cleverhans: the kernel-preserving rules on a GPU.
#
# Here, once: `benchmarks/gpu_run.sh prepare` builds the attack libraries as wheels into .whl/ (the device machine
# reaches no package registry; its image already holds torch, torchvision, numpy, scipy, scikit-learn, wrapt, rich,
# tqdm, matplotlib, and transformers 5, which nanoGCG 0.3.0 predates: transformers 4.57 travels with its hub and
# tokenizers) and ignores that folder in git.
# There: the device tool's `run` with carry [".whl"] and timeout_s 590, command `bash benchmarks/gpu_run.sh`.
# Results: benchmarks/results/gpu/ (machine.txt, log.txt, <step>.json and .md); with OUT set (the device tool), the
# same folder as $OUT/gpu.tgz, rewritten after each step so that a run cut off still brings back what it finished
# (the tool brings back at most 8 files). Unpack it into benchmarks/results/. DEVICE=cpu QUICK=1 runs the same steps at toy sizes (a plumbing check).
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
    hub=$("$VPY" -c 'from importlib.metadata import version; print(version("huggingface_hub"))')
    "$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl transformers==4.57.6 tokenizers==0.22.2 "huggingface_hub==$hub" nanogcg==0.3.0
    ls -1 .whl
    du -sh .whl
    exit 0
fi

DEVICE=${DEVICE:-cuda}
STEPS=" ${STEPS:-llm exactness bench_default table1_resnet50_224 vit_b_16_224} "  # a subset: STEPS="exactness ..."
want() { [[ $STEPS == *" $1 "* ]]; }
RESULTS=benchmarks/results/gpu
mkdir -p "$RESULTS"
pack() { if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu.tgz" -C benchmarks/results gpu; fi; }
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
    LLM=(--sizes 20M --dtypes float32 --repeats 1)  # bfloat16 is slow on CPUs without native bf16
    EXACT=(--models resnet18 --image-size 32 --batch-size 2)
    DEFAULT=(--batch-size 2 --steps 1 --repeats 1)
    TABLE1=(--model resnet18 --image-size 32 --batch-size 2 --steps 2 --repeats 1)
    VIT=(--model vit_b_16 --image-size 32 --batch-size 1 --steps 1 --repeats 1)
else
    LLM=(--sizes 1.26B,6.7B --dtypes bfloat16 --repeats 5 --timeout 100)
    EXACT=()
    DEFAULT=()
    TABLE1=(--model resnet50 --image-size 224 --batch-size 16 --steps 50 --repeats 2)
    VIT=(--model vit_b_16 --image-size 224 --batch-size 16 --steps 10 --repeats 3)
fi

step() {  # name, time limit in seconds, sbpatch bench arguments
    local name=$1 limit=$2 status
    shift 2
    want "$name" || return 0
    echo "== $name (limit ${limit}s): sbpatch bench --device $DEVICE $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$PY" -m sbpatch bench --device "$DEVICE" --json "$RESULTS/$name.json" \
        --markdown "$RESULTS/$name.md" "$@" >> "$LOG" 2>&1
    status=$?
    echo "== $name: exit $status" | tee -a "$LOG"
    tail -25 "$LOG"
    pack
}

if want llm; then
    echo "== llm (limit 230s): benchmarks/llm.py --device $DEVICE ${LLM[*]}" | tee -a "$LOG"
    timeout --kill-after=10 230 "$PY" benchmarks/llm.py --device "$DEVICE" --out "$RESULTS" "${LLM[@]}" >> "$LOG" 2>&1
    echo "== llm: exit $?" | tee -a "$LOG"
    pack
fi
if want exactness; then
    echo "== exactness (limit 100s): benchmarks/gpu_exactness.py --device $DEVICE ${EXACT[*]}" | tee -a "$LOG"
    timeout --kill-after=10 100 "$PY" benchmarks/gpu_exactness.py --device "$DEVICE" --out "$RESULTS" "${EXACT[@]}" \
        >> "$LOG" 2>&1
    echo "== exactness: exit $?" | tee -a "$LOG"
    tail -14 "$LOG"
    pack
fi

step bench_default 110 --libraries torchattacks,art,foolbox,advertorch,deeprobust,cleverhans --memory "${DEFAULT[@]}"
step table1_resnet50_224 170 --attacks PGD --libraries torchattacks,art,foolbox,advertorch,deeprobust,cleverhans \
    --memory "${TABLE1[@]}"
step vit_b_16_224 60 --libraries torchattacks,art,cleverhans --attacks PGD "${VIT[@]}"
ls -l "$RESULTS"
pack
