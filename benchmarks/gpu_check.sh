#!/usr/bin/env bash
# One call on a GPU machine, at most 5 minutes: the CUDA tests, then each stage's speed at
# the paper's shape (DINOv3 ViT-L/16, 448 px, random weights: nothing is downloaded).
#   bash benchmarks/gpu_check.sh                      # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --device cpu --tiny  # the same path at tiny shapes on CPU (tests/test_gpu_check.py)
# Arguments go to benchmarks/gpu_check.py. Exit status: the tests' if they fail, else the benchmark's.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TQDM_DISABLE=1
tests=0
case " $* " in
  *" --tiny "*) ;;  # the CPU smoke path runs the benchmark only
  *)
    echo "== pytest -m cuda"
    timeout 170 python -m pytest -q -m cuda tests/test_cuda.py || tests=$?
    ;;
esac
echo "== benchmark"
timeout 120 python benchmarks/gpu_check.py "$@"
bench=$?
[ "$tests" -ne 0 ] && exit "$tests"
exit "$bench"
