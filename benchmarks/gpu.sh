#!/usr/bin/env bash
# The GPU checks in one call: the `cuda` tests, then the GPU benchmarks, then a summary.
#
#   bash benchmarks/gpu.sh            # on any machine with a CUDA GPU and repsim's dependencies
#
# A machine without a package index: put wheels of what is missing (pydantic, pydantic-core,
# annotated-types, typing-inspection, ...) in .whl/ at the repository root; they are installed
# into /tmp/site first. The project itself is used from this checkout (PYTHONPATH), so nothing
# needs building there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
LOG=${OUT:-/tmp}/gpu
mkdir -p "$LOG"

$PY - <<'PYEOF' || exit 1
import torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA device"
for i in range(torch.cuda.device_count()):
    print(f"GPU {i}: {torch.cuda.get_device_name(i)}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF

status=0
tests=$(grep -l "pytest.mark.cuda" tests/*.py plugins/*/tests/*.py 2>/dev/null | tr '\n' ' ')
echo "== cuda tests: $tests"
$PY -m pytest -q -p no:cacheprovider -m cuda -s $tests 2>&1 | tee "$LOG/tests.txt" || status=1

echo "== bench_pass: 4 x ViT-B/16, bf16, forward batch 256"
$PY benchmarks/bench_pass.py --device cuda --precision bf16 --arch vit_base_patch16_224 \
  --models 4 --examples 2048 --batch-size 256 --repeats 3 --engine-examples 8192 \
  --skip-threads 2>&1 | tee "$LOG/bench_pass_bf16.txt" || status=1
echo "== bench_pass: 4 x ViT-B/16, fp32"
$PY benchmarks/bench_pass.py --device cuda --precision fp32 --arch vit_base_patch16_224 \
  --models 4 --examples 1024 --batch-size 256 --repeats 2 --cases cls --skip-threads \
  2>&1 | tee "$LOG/bench_pass_fp32.txt" || status=1

echo "== bench_finetune: ViT-B/16, bf16, batch 256"
$PY benchmarks/bench_finetune.py --device cuda --precision bf16 --arch vit_base_patch16_224 \
  --batch-size 256 --device-batch 256 --num-workers 8 --steps 10 2>&1 \
  | tee "$LOG/bench_finetune.txt" || status=1

gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 1 ]; then
  echo "== bench_distributed: 1 .. $gpus GPUs"
  $PY benchmarks/bench_distributed.py --device cuda --examples 4096 --nproc 1 "$gpus" \
    2>&1 | tee "$LOG/bench_distributed.txt" || status=1
fi

echo
echo "== summary"
grep -E "passed|failed|error" "$LOG/tests.txt" | tail -1
grep -hE "^\| (cls|types|flatten) |engine/floor|^\| [0-9]+ models|^\| +[0-9]+ \|" "$LOG"/bench_*.txt
echo "targets: pass >= 90 % of plain-forward img/s in bf16 (overhead <= +11 %); engine <= 1.5x its Gram floor"
exit $status
