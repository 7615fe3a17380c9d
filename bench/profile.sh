#!/usr/bin/env bash
# Nsight Compute on fusedopt's step kernels: for each suite, `python -m fusedopt bench` runs on CUDA
# under ncu (one size, quick timing), and the median duration and achieved DRAM throughput (% of
# peak) of every fusedopt kernel are appended to bench/results/<suite>_cuda.md (and .ncu.json).
#
#   bench/profile.sh [suite ...]        suites: adamw lion adam8bit (default: all)
#   SIZE=64 LAUNCHES=20 bench/profile.sh adamw
#
# Needs a GPU, ncu on PATH and fusedopt importable (pip install ., or PYTHONPATH=python).
set -euo pipefail
cd "$(dirname "$0")/.."
size=${SIZE:-64}
launches=${LAUNCHES:-20}
out=${OUT:-bench/results}
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(adamw lion adam8bit)
command -v ncu >/dev/null || { echo "profile.sh: ncu (Nsight Compute) is not on PATH" >&2; exit 2; }
mkdir -p "$out"
for suite in "${suites[@]}"; do
  csv="$out/${suite}_cuda.ncu.csv"
  # The timing run itself writes ${suite}_cuda.md; ncu's table is appended to it afterwards.
  cmd=(python -m fusedopt bench --device cuda --suites "$suite" --sizes "$size" --quick --out "$out")
  # Skip the first launches (validation in a child process, warmup), then profile a fixed count.
  ncu --target-processes all --csv --launch-skip 10 --launch-count "$launches" \
      --kernel-name regex:'adam_kernel|lion_kernel|blockwise8bit_kernel' \
      --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum,dram__bytes.sum \
      "${cmd[@]}" > "$csv"
  python -m fusedopt.benchmarks.ncu "$csv" "$out/${suite}_cuda.md" "ncu ... ${cmd[*]}"
done
