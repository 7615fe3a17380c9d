#!/usr/bin/env bash
# Everything a session with a lent GPU runs, as one device call (device time is scarce): the
# extension (built here unless BUILD=0), every CUDA test, the CUDA bench, Nsight Compute on the step
# kernels. Logs and results go to $OUT; copy them into bench/results/ and commit them with the
# device and versions they record (gpu_env.txt and each table's stamp).
#
#   OUT=/tmp/gpu bench/gpu_check.sh
#   BUILD=0 OUT=$OUT bench/gpu_check.sh   # reuse python/fusedopt/_C*.so built on a CPU machine
#
# BUILD=0 works because the extension links neither libtorch nor a shared CUDA runtime: a .so built
# with nvcc on a machine without a GPU (FUSEDOPT_CUDA=on, archs including the GPU's) runs on the GPU
# machine as long as the Python version matches. Stage limits (seconds): BUILD_S, TEST_S, BENCH_S, NCU_S;
# TOTAL_S (default 560) caps them all together, so the script fits one device call (600 s at most)
# and a later stage gets what the earlier ones left, never more than its own limit.
set -uo pipefail
deadline=$((SECONDS + ${TOTAL_S:-560}))
# left LIMIT: the smaller of LIMIT and the seconds to the deadline (at least 1)
left() { local r=$((deadline - SECONDS)); [ "$r" -lt "$1" ] || r=$1; [ "$r" -gt 0 ] || r=1; echo "$r"; }
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH=$PWD/python
{
  nvidia-smi
  nvcc --version || true
  python -c "import torch, fusedopt; print('torch', torch.__version__, 'cuda', torch.version.cuda); print(fusedopt.backends())"
} > "$out/gpu_env.txt" 2>&1

if [ "${BUILD:-1}" != 0 ]; then
  FUSEDOPT_CUDA=on FUSEDOPT_CUDA_ARCHS=${ARCHS:-90a} timeout "$(left "${BUILD_S:-300}")" python setup.py build_ext --inplace \
    > "$out/gpu_build.log" 2>&1 || { echo "build failed:"; tail -30 "$out/gpu_build.log"; exit 1; }
fi
python -c "import fusedopt, sys; b = fusedopt.backends(); print(b); sys.exit(0 if b['cuda_usable'] else 1)" \
  || { echo "fusedopt cannot use the GPU here"; exit 1; }

timeout "$(left "${TEST_S:-200}")" python -m pytest tests -q -m cuda -p no:cacheprovider > "$out/gpu_tests.log" 2>&1
echo "cuda tests rc=$?"; tail -15 "$out/gpu_tests.log"

timeout "$(left "${BENCH_S:-300}")" python -m fusedopt bench --device cuda --suites "${SUITES:-adamw,adam8bit,lion,muon,gram}" \
  --out "$out" > "$out/gpu_bench.log" 2>&1
echo "bench rc=$?"; grep -E '^\| ' "$out"/*_cuda.md | cut -c1-220 | head -80

if command -v ncu > /dev/null; then
  OUT=$out SIZE=64 LAUNCHES=20 timeout "$(left "${NCU_S:-120}")" bench/profile.sh > "$out/gpu_ncu.log" 2>&1
  echo "ncu rc=$?"; tail -5 "$out/gpu_ncu.log"
fi
