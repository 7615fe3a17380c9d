#!/usr/bin/env bash
# Nsight Compute on fusedopt's kernels: for each suite, `python -m fusedopt bench` runs on CUDA
# under ncu (one size, quick timing), and the median duration and achieved DRAM throughput (% of
# peak) of every fusedopt kernel variant are appended to bench/results/<suite>_cuda.md (and
# written to .ncu.json). Run the plain timing bench first: its table is the one extended.
#
#   bench/profile.sh [suite ...]        suites: muon gram adamw lion adam8bit (default: all, in that order)
#   SIZE=64 LAUNCHES=20 bench/profile.sh adamw
#
# Kernels profiled: adam_kernel, lion_kernel, blockwise8bit_kernel (AdamW8bit, Lion8bit), muon_*
# (Muon's momentum, cast and apply passes) and symmetric_gram_kernel (Newton-Schulz's X X^T; the muon
# suite's ns_kernel='symmetric' rows and the gram suite). muon and gram have fixed cases: SIZE only
# sizes the others. ncu runs with --clock-control none (the device notes: leave the clocks alone;
# NCU_CLOCK=base for ncu's default). A first short run checks that ncu can read the counters at all
# (on gVisor it cannot) and stops with exit 3 if not, rather than spend the time on every suite.
#
# Needs a GPU, ncu on PATH and fusedopt importable (pip install ., or PYTHONPATH=python); PY picks
# the interpreter (default python3, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
command -v "$PY" > /dev/null || PY=python
size=${SIZE:-64}
launches=${LAUNCHES:-200}
out=${OUT:-bench/results}
clock=${NCU_CLOCK:-none}
# Timings taken under ncu are distorted (it replays kernels): that run writes to a scratch folder,
# and only ncu's table is appended to the real results (from a plain `python -m fusedopt bench`).
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(muon gram adamw lion adam8bit)
command -v ncu > /dev/null || { echo "profile.sh: ncu (Nsight Compute) is not on PATH" >&2; exit 2; }
mkdir -p "$out"
status=0
metrics=dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum,dram__bytes.sum

if [ "${PROBE:-1}" != 0 ]; then
  ncu --csv --clock-control "$clock" --launch-count 1 --metrics "$metrics" \
    "$PY" -c "import torch; x = torch.ones(1 << 20, device='cuda'); x.mul_(2.0); torch.cuda.synchronize()" \
    > "$scratch/probe.csv" 2>&1 || true
  if ! grep -q '"ID"' "$scratch/probe.csv"; then
    echo "profile.sh: ncu read no counters on a one-kernel probe (ncu's output below); not profiling" >&2
    head -20 "$scratch/probe.csv" >&2
    exit 3
  fi
fi

for suite in "${suites[@]}"; do
  csv="$out/${suite}_cuda.ncu.csv"
  results="$out/${suite}_cuda.md"
  [ -f "$results" ] || echo "# ${suite}_cuda (no timing run yet: python -m fusedopt bench --device cuda)" > "$results"
  cmd=("$PY" -m fusedopt bench --device cuda --suites "$suite" --sizes "$size" --quick --out "$scratch")
  # Skip the first matching launches (validation in a child process, warmup), then profile enough
  # of them to reach every implementation of the case (each row times dozens of steps).
  echo "profile.sh: $suite" >&2
  ncu --target-processes all --csv --clock-control "$clock" --launch-skip 10 --launch-count "$launches" \
      --kernel-name regex:'adam_kernel|lion_kernel|blockwise8bit_kernel|muon_|symmetric_gram_kernel' \
      --metrics "$metrics" \
      "${cmd[@]}" > "$csv" || echo "profile.sh: ncu on $suite exited with $?" >&2
  # A suite that fails leaves the others to run; its report is kept as it is (ncu's messages).
  if grep -q '"ID"' "$csv"; then
    "$PY" -m fusedopt.benchmarks.ncu "$csv" "$results" "ncu ... ${cmd[*]}" || status=1
  else
    echo "profile.sh: no ncu CSV for $suite; the end of its output:" >&2
    tail -20 "$csv" >&2
    status=1
  fi
done
exit "$status"
