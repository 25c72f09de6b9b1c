#!/usr/bin/env bash
# The GPU checks of a session that is lent a CUDA machine, as one prepared command (device time is scarce: ~15 min
# per task, a start included; this script ends inside 10 minutes, one call's limit). Everything it learns lands in $OUT: RESULTS.md with the 70B-shape rows appended,
# the bench JSON, the CUDA test log, nvidia-smi. Each step is time-boxed and a failed step does not stop the next.
#
#   here (needs PyPI):  bash benchmarks/gpu_check.sh fetch      # -> .whl/fast_hadamard_transform-*.tar.gz
#                       echo /.whl/ >> .git/info/exclude
#   there:              device run, carry [".whl"], command: bash benchmarks/gpu_check.sh
#   back here:          copy files_at/RESULTS.md over benchmarks/RESULTS.md, read the logs, commit.
#
# The device image already has torch (CUDA), transformers, safetensors, huggingface-hub, typer, rich and psutil;
# streamquant goes in without dependencies and fast-hadamard-transform is compiled for the local GPU's arch only
# (its setup.py targets eight arches, minutes of nvcc).
set -uo pipefail
cd "$(dirname "$0")/.."
FHT_URL=https://files.pythonhosted.org/packages/81/dc/7afa54b951cac690742247d153e2e992e30677b944d7330bb7280903fb11/fast_hadamard_transform-1.1.0.tar.gz

if [ "${1:-run}" = fetch ]; then
    mkdir -p .whl && curl -sSfL -o .whl/fast_hadamard_transform-1.1.0.tar.gz "$FHT_URL" && ls -la .whl
    exit
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-570}))   # one device call may run 600 s; $OUT must be written by then
within() { local left=$((deadline - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }

step "machine"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name(0), 'transformers', transformers.__version__)"

step "install streamquant (no dependencies)"
python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target /tmp/site . || exit 1
# PYTHONSAFEPATH: the repo root must not shadow the installed package (kernels/ and cli/ install under
# streamquant.), neither here nor in the `python3 -m streamquant.cli.app` processes the tests spawn
export PYTHONPATH=/tmp/site PYTHONSAFEPATH=1

# the acceptance run first (the torch Hadamard fallback serves it), then the kernel and the CUDA tests
step "70B-shape benchmark, 128 x 2048, --gpu-mem 23GiB"
timeout $(within 300) python3 benchmarks/seventy_b.py --scale 1 --blocks 2 --samples 128 --seqlen 2048 --gpu-mem 23GiB \
    > "$OUT/bench.json" 2> "$OUT/bench.log"
echo "exit $?"; tail -3 "$OUT/bench.log"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
step "build fast-hadamard-transform for this GPU only"
if ls .whl/fast_hadamard_transform-*.tar.gz >/dev/null 2>&1; then
    arch=$(python3 -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
    rm -rf /tmp/fht && mkdir -p /tmp/fht && tar xzf .whl/fast_hadamard_transform-*.tar.gz -C /tmp/fht
    src=$(echo /tmp/fht/fast_hadamard_transform-*)
    # one -gencode pair, this GPU's, set after the list of eight is built
    python3 - "$src/setup.py" "$arch" <<'EOF'
import sys
path, arch = sys.argv[1], sys.argv[2]
text = open(path).read()
anchor = "    # HACK: The compiler flag"
assert anchor in text, "fast-hadamard-transform's setup.py changed"
text = text.replace(anchor, f'    cc_flag = ["-gencode", "arch=compute_{arch},code=sm_{arch}"]\n' + anchor, 1)
open(path, "w").write(text)
EOF
    FAST_HADAMARD_TRANSFORM_FORCE_BUILD=TRUE MAX_JOBS=16 timeout $(within 120) \
        python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target /tmp/site "$src" 2>&1 | tail -5
    python3 -c "import fast_hadamard_transform; print('fast_hadamard_transform', fast_hadamard_transform.__file__)"
else
    echo "no .whl/fast_hadamard_transform sdist carried: the torch fallback is used"
fi

step "CUDA tests"
# test_stream: the streaming forward on CUDA against transformers' own (fp32, TF32 off)
timeout $(within 150) python3 -m pytest -q -p no:cacheprovider -rs -m "not slow" tests/test_hadamard.py \
    tests/test_invariance.py tests/test_stream.py \
    2>&1 | tee "$OUT/cuda_tests.log" | tail -15

step "done"
