#!/usr/bin/env bash
# Nsight Compute on fusedopt's step kernels: for each suite, `python -m fusedopt bench` runs on CUDA
# under ncu (one size, quick timing), and the median duration and achieved DRAM throughput (% of
# peak) of every fusedopt kernel variant are appended to bench/results/<suite>_cuda.md (and
# written to .ncu.json). Run the plain timing bench first: its table is the one extended.
#
#   bench/profile.sh [suite ...]        suites: adamw lion adam8bit (default: all)
#   SIZE=64 LAUNCHES=20 bench/profile.sh adamw
#
# Needs a GPU, ncu on PATH and fusedopt importable (pip install ., or PYTHONPATH=python).
set -euo pipefail
cd "$(dirname "$0")/.."
size=${SIZE:-64}
launches=${LAUNCHES:-200}
out=${OUT:-bench/results}
# Timings taken under ncu are distorted (it replays kernels): that run writes to a scratch folder,
# and only ncu's table is appended to the real results (from a plain `python -m fusedopt bench`).
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(adamw lion adam8bit)
command -v ncu >/dev/null || { echo "profile.sh: ncu (Nsight Compute) is not on PATH" >&2; exit 2; }
mkdir -p "$out"
for suite in "${suites[@]}"; do
  csv="$out/${suite}_cuda.ncu.csv"
  results="$out/${suite}_cuda.md"
  [ -f "$results" ] || echo "# ${suite}_cuda (no timing run yet: python -m fusedopt bench --device cuda)" > "$results"
  cmd=(python -m fusedopt bench --device cuda --suites "$suite" --sizes "$size" --quick --out "$scratch")
  # Skip the first matching launches (validation in a child process, warmup), then profile enough
  # of them to reach every implementation of the case (each row times dozens of steps).
  ncu --target-processes all --csv --launch-skip 10 --launch-count "$launches" \
      --kernel-name regex:'adam_kernel|lion_kernel|blockwise8bit_kernel|muon_' \
      --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum,dram__bytes.sum \
      "${cmd[@]}" > "$csv"
  python -m fusedopt.benchmarks.ncu "$csv" "$results" "ncu ... ${cmd[*]}"
done
