#!/usr/bin/env bash
# The GPU check (issue 20), in one go, on a fresh machine with an NVIDIA GPU and only this
# repository:
#
#     bash bench/gpu_check.sh                 # results under bench/results/
#     RESULTS_DIR=/some/dir bash bench/gpu_check.sh
#
# 1. environment: the virtual environment python3 runs in, if it runs in one (as on GPU images
#    whose python3 holds their CUDA torch), else a new one over the system's site-packages (a CUDA
#    build of torch and numba-cuda there are used as they are); the engine put on its path; only what
#    is still missing installed from PyPI, or from the wheels in $WHEELS when the machine is offline
#    (WHEELS=/path/to/wheels: pip --no-index --find-links);
# 2. every GPU-only test: the cuda backend's test files run on the GPU (not the simulator), and no
#    test may be skipped for want of a GPU;
# 3. the benchmark: bench/gpu_vs_torch.py --check (forward, backward and decode against torch on
#    the same GPU, float32/float16/bfloat16);
# 4. results: gpu-<device>-<date>.json (the benchmark), .log (this script's whole output, each
#    step's time) and -tests.xml (JUnit) under $RESULTS_DIR.
#
# DRY_RUN=1 checks the script's plumbing on a machine without a GPU: no GPU required, the tests
# only collected, the benchmark's --smoke cases on the cpu backend.
#
# Budget: 8 minutes on an H100/H200, each step under its own timeout (docs/cuda.md, "The GPU
# check", says how the steps were sized). Exit status: 0 when every step passed, else the number
# of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS_DIR=${RESULTS_DIR:-bench/results}
mkdir -p "$RESULTS_DIR"
device=$( (command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//') )
stem="$RESULTS_DIR/gpu-${device:-unknown}-$(date +%F)"
exec > >(tee "$stem.log") 2>&1
failed=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, time, and count a failure
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" bash -c '"$@"' _ "$@"  # a binary, or one of the exported functions below
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || failed=$((failed + 1))
    return "$rc"
}

echo "gpu_check: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
# the environment: $VENV if set; else the virtual environment python3 itself runs in (a GPU image's
# python3 is often one, holding its CUDA torch: a new venv "over the system's site-packages" would
# see the base interpreter's packages, not that one's); else a new .venv-gpu
if [ -z "${VENV:-}" ]; then
    VENV=$("$PY" -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "")')
    if [ -n "$VENV" ]; then echo "using the virtual environment $PY runs in: $VENV"; else VENV=.venv-gpu; fi
fi
export PY stem VENV

# 1. environment
setup() {
    [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" || return 1
    local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
    [ -n "${WHEELS:-}" ] && pip+=(--no-index --find-links "$WHEELS")
    # the engine is pure Python: a .pth file puts this checkout on the path (nothing to build, no
    # build backend to fetch on an offline machine)
    "$VENV/bin/python" -c "import site, os; open(os.path.join(site.getsitepackages()[0], 'attention_engine_checkout.pth'), 'w').write(os.getcwd() + '\\n')" || return 1
    # what the engine and the GPU tests import, by distribution name; install only what is missing
    local missing
    missing=$("$VENV/bin/python" - <<'EOF'
import importlib.util
need = {"numpy": "numpy", "scipy": "scipy", "numba": "numba", "numba_cuda": "numba-cuda[cu13]",
        "pluggy": "pluggy", "array_api_compat": "array-api-compat", "ml_dtypes": "ml-dtypes",
        "torch": "torch", "pytest": "pytest", "xdist": "pytest-xdist", "hypothesis": "hypothesis",
        "threadpoolctl": "threadpoolctl"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
EOF
    )
    if [ -n "$missing" ]; then
        echo "installing: $missing"
        "${pip[@]}" $missing || return 1
    fi
    "$VENV/bin/python" -c "
import numba, numba_cuda, torch, engine
from numba import cuda
print('numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'torch', torch.__version__)
print('torch sees', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')
print('cuda backend:', engine.get_backend('cuda').unavailable_reason() or 'available')
import os
if os.environ.get('DRY_RUN') != '1':
    assert torch.cuda.is_available() and engine.get_backend('cuda').unavailable_reason() is None, 'no usable GPU'
    # one real launch: NVVM/NVRTC present and the driver takes the PTX, before minutes are spent
    x = torch.randn(1, 1, 8, 16, device='cuda')
    out = engine.scaled_dot_product_attention(x, x, x, backend='cuda')
    ref = torch.nn.functional.scaled_dot_product_attention(x, x, x)
    assert float((out - ref).abs().max()) < 1e-5, 'the first kernel launch gave a wrong result'
    print('first kernel launch: ok')
"
}
export -f setup
step "environment" 90 setup || { echo "gpu_check: no usable environment, stopping"; exit 1; }

# 2. the GPU-only tests: what the simulator run checks (the tests marked "simulator": the
# capability specifications for cuda, and tests/cuda's own), on the GPU, against the reference
# backend only. The simulator launcher and the PTX files (compile_ptx only) are CPU tests that CI
# runs; they are left out here.
gpu_tests() {
    ATTENTION_ENGINE_TEST_BACKENDS=cuda,reference "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider \
        -n 8 --dist loadgroup -m simulator --ignore-glob="*_ptx.py" --ignore=tests/cuda/test_simulator.py \
        ${DRY_RUN:+--collect-only} --junitxml="$stem-tests.xml" tests/forward tests/decode tests/cuda \
        | tee /tmp/gpu_check_tests.out
    local rc=${PIPESTATUS[0]}
    # on a GPU nothing may be skipped for want of one
    [ "${DRY_RUN:-}" = 1 ] && return "$rc"
    if grep -E "^SKIPPED.*(needs a real CUDA GPU|no CUDA target)" /tmp/gpu_check_tests.out; then
        echo "GPU-only tests were skipped on a GPU machine"
        return 1
    fi
    return "$rc"
}
export -f gpu_tests
step "GPU-only tests" 240 gpu_tests

# 3. the benchmark
bench=(--check)
[ "${DRY_RUN:-}" = 1 ] && bench=(--smoke --device cpu)
step "benchmark" 150 "$VENV/bin/python" bench/gpu_vs_torch.py "${bench[@]}" --json "$stem.json"

echo "gpu_check: $failed failed step(s); results: $stem.{json,log} and $stem-tests.xml"
exit "$failed"
