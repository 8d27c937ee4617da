#!/usr/bin/env bash
# The whole GPU check in one run (device tool, about 6 minutes on an H200): the CUDA tests (exact mode on the GPU
# against the CPU, run to run and batch to batch; the MATLAB resize on the GPU), --fast's agreement with exact on
# the carried references, then benchmarks/gpu_bench.py (forward timing, 500 images end to end, stage split).
# Prepare with benchmarks/gpu_prepare.sh. Everything it prints and writes under $OUT goes into BENCHMARKS.md.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
pip install --no-build-isolation --no-deps -q -e . >/dev/null 2>&1 || echo "pip install -e . failed"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
export CAFFE2TORCH_REFERENCE=$PWD/gpu-ref
timeout 150 python -m pytest -q -p no:cacheprovider -rs tests/test_predict.py tests/test_imresize.py -k "test_exact_on_the_gpu or test_gpu_path_matches_numpy" \
    2>&1 | tail -5
timeout 120 python benchmarks/fast_agreement.py --device cuda --reference gpu-ref --json "$OUT/fast_agreement.json"
timeout 300 python benchmarks/gpu_bench.py --device cuda --images 500 --iterations 50 --workers 10 --out "$OUT"
