#!/usr/bin/env bash
# Everything a session with a lent GPU runs, as one device call (device time is scarce): build the
# extension there, every CUDA test, the CUDA bench, Nsight Compute on the step kernels.
#
#   OUT=$OUT bench/gpu_check.sh                   # on the device machine
#   OUT=/tmp/gpu bench/gpu_check.sh               # anywhere else with a GPU
#
# What comes back: the device tool returns at most 8 files from $OUT, so every log and result is
# written to a scratch folder (WORK, default a mktemp -d under /tmp) and, after EACH stage, packed
# into $OUT/gpu_results.tgz, with $OUT/summary.txt beside it (stages and their exit codes, the
# toolchain and device, the tests' summary lines, the bench and ncu table rows) readable without
# unpacking. A stage cut off by its time limit still leaves the earlier stages' results packed.
# To keep them: tar -xzf gpu_results.tgz -C bench/results (gpu_*.log, gpu_env.txt, <suite>_cuda.{json,md},
# bench_cuda.png, <suite>_cuda.ncu.{csv,json}) and commit them with the device and versions they
# record (gpu_env.txt and each table's stamp).
#
# The extension is always built there: the .so built on the CPU machines is for their Python (3.11),
# the GPU image's python3 is another (3.12), and its system libraries may differ too. BUILD=0 skips
# the build only when python/fusedopt/_C<this interpreter's EXT_SUFFIX> is already there and reports
# a CUDA build (a rerun on a still-warm machine, which keeps ignored build outputs); otherwise it
# builds anyway. A rebuild on a warm machine is incremental (build/ is kept too).
#
# Environment: PY (default python3, else python), ARCHS (CUDA archs, default 90a), SUITES (bench,
# default muon,gram,adamw,lion,adam8bit: the never-measured and cheaper suites first, each suite's
# tables are written as it ends), BENCH_ARGS (extra bench arguments, e.g. "--quick" or "--sizes 1 16 256"),
# NCU_SUITES (profile.sh's suites, default its own list). Stage limits (seconds): BUILD_S, TEST_S,
# BENCH_S, NCU_S; TOTAL_S (default 560) caps them all together, so the script fits one device call
# (600 s at most) and a later stage gets what the earlier ones left, never more than its own limit.
#
# Bench sizes: the full CUDA set (1M..256M single tensors and the GPT-2 mix; Muon on the GPT-2 matrices
# and 8 x 4096^2; gram on three batches) runs by default. Its time on a GPU is not measured yet;
# BENCH_S bounds it, and each suite's tables are written as that suite ends.
set -uo pipefail
deadline=$((SECONDS + ${TOTAL_S:-560}))
# left LIMIT: the smaller of LIMIT and the seconds to the deadline (at least 1)
left() { local r=$((deadline - SECONDS)); [ "$r" -lt "$1" ] || r=$1; [ "$r" -gt 0 ] || r=1; echo "$r"; }
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python3}
command -v "$PY" > /dev/null || PY=python
out=${OUT:-bench/results}
mkdir -p "$out"
work=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_work.XXXXXX")}
mkdir -p "$work"
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
# The interpreter's own bin folder (a venv's cmake, ninja) and CUDA's, as fallbacks after PATH.
pybin=$(dirname "$("$PY" -c 'import sys; print(sys.executable)' 2> /dev/null || command -v "$PY")")
PATH=$PATH:$pybin
command -v nvcc > /dev/null || [ ! -x /usr/local/cuda/bin/nvcc ] || PATH=$PATH:/usr/local/cuda/bin
if ! command -v ncu > /dev/null; then
  for d in /usr/local/cuda/bin /opt/nvidia/nsight-compute/*; do
    [ -x "$d/ncu" ] && { PATH=$PATH:$d; break; }
  done
fi
export PATH

: > "$work/gpu_stages.txt"
# pytest's lines worth reading without the log: -rA's non-passing outcomes, timeouts, interruption,
# and the closing counts line (with -q it has no '=' padding).
test_lines='^(FAILED|ERROR|SKIPPED|XPASS|XFAIL) |Timeout|KeyboardInterrupt|^!+ |no tests ran|^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)\b.* in [0-9.]+s'
stage() { echo "$*" | tee -a "$work/gpu_stages.txt"; }  # stage NAME rc=N (seconds)

summary() {
  {
    echo "gpu_check summary: $(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS}s of ${TOTAL_S:-560}s used; everything else is in gpu_results.tgz"
    echo; echo "## stages"; cat "$work/gpu_stages.txt"
    echo; echo "## toolchain and device"
    [ -f "$work/env_short.txt" ] && cat "$work/env_short.txt"
    if [ -f "$work/gpu_build.log" ] && ! grep -q '^build rc=0' "$work/gpu_stages.txt"; then
      echo; echo "## build log (last 30 lines)"; tail -30 "$work/gpu_build.log"
    fi
    if [ -f "$work/gpu_tests.log" ]; then
      echo; echo "## tests (pytest -m cuda: failures, errors and the closing line)"
      grep -E "$test_lines" "$work/gpu_tests.log" | cut -c1-300 | head -80
    fi
    for md in "$work"/*_cuda.md; do
      [ -f "$md" ] || continue
      echo; echo "## $(basename "$md")"; grep -E '^\| ' "$md" | cut -c1-240
    done
    if [ -f "$work/gpu_ncu.log" ]; then
      echo; echo "## ncu (profile.sh, last 8 lines)"; tail -8 "$work/gpu_ncu.log" | cut -c1-300
    fi
  } > "$out/summary.txt.tmp" 2>&1
  mv -f "$out/summary.txt.tmp" "$out/summary.txt"
}

# pack: summary.txt and gpu_results.tgz (the whole scratch folder) in $OUT, each replaced whole.
pack() {
  summary
  cp -f "$out/summary.txt" "$work/summary.txt"
  local tmp=$out/gpu_results.tgz.tmp
  if tar -czf "$tmp" -C "$work" . 2> "$work/tar.err"; then
    # One file comes back only if it is under 16 MiB: past 15, leave out the bulky raw data.
    if [ "$(stat -c %s "$tmp")" -gt $((15 << 20)) ]; then
      tar -czf "$tmp" -C "$work" --exclude='*.ncu.csv' --exclude='*.json' . 2> "$work/tar.err"
      echo "gpu_results.tgz: over 15 MiB whole, packed without *.ncu.csv and *.json" >> "$out/summary.txt"
    fi
    mv -f "$tmp" "$out/gpu_results.tgz"
  else
    echo "packing failed: $(cat "$work/tar.err")" | tee -a "$out/summary.txt"
    rm -f "$tmp"
  fi
}
trap pack EXIT  # an extra: every stage packs by itself
trap 'exit 130' INT TERM
echo "scratch: $work; results: $out/gpu_results.tgz, $out/summary.txt"

# --- toolchain, before the build: enough to tell from one call why a build failed ----------------
{
  echo "== toolchain (before the build)"
  echo "PY=$PY -> $(command -v "$PY")"
  "$PY" - << 'EOF' || echo "python: $PY failed to run"
import os, sys, sysconfig
inc = sysconfig.get_paths()["include"]
h = os.path.join(inc, "Python.h")
print("python", sys.version.split()[0], sys.executable)
print("EXT_SUFFIX", sysconfig.get_config_var("EXT_SUFFIX"))
print("Python.h", h, "present" if os.path.exists(h) else "MISSING (no Python headers: the build cannot work)")
for mod in ("pybind11", "setuptools", "torch"):
    try:
        m = __import__(mod)
        extra = f" cmake dir {m.get_cmake_dir()}" if mod == "pybind11" else ""
        print(mod, getattr(m, "__version__", "?") + extra)
    except Exception as e:
        print(mod, "MISSING:", type(e).__name__, e)
EOF
  for tool in cmake ninja nvcc ncu; do
    if p=$(command -v "$tool"); then
      case $tool in
        nvcc) v=$("$tool" --version 2>&1 | grep -i release) ;;
        ncu) v=$("$tool" --version 2>&1 | grep -i version | tail -1) ;;
        *) v=$("$tool" --version 2>&1 | head -1) ;;
      esac
      echo "$tool $p: $v"
    else
      echo "$tool: MISSING (not on PATH)"
    fi
  done
} 2>&1 | tee "$work/gpu_env.txt" > "$work/env_short.txt"
cat "$work/env_short.txt"
pack

# --- build ---------------------------------------------------------------------------------------
suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2> /dev/null)
so=python/fusedopt/_C${suffix:-.so}
if [ "${BUILD:-1}" = 0 ] && [ -f "$so" ] \
    && "$PY" -c "import fusedopt, sys; sys.exit(0 if fusedopt.backends()['cuda_compiled'] else 1)" 2> /dev/null; then
  stage "build skipped (BUILD=0: $so is there and has CUDA)"
else
  [ "${BUILD:-1}" = 0 ] && echo "BUILD=0, but no CUDA-built $so for this interpreter: building"
  t0=$SECONDS
  FUSEDOPT_CUDA=on FUSEDOPT_CUDA_ARCHS=${ARCHS:-90a} timeout -k 10 "$(left "${BUILD_S:-300}")" \
    "$PY" setup.py build_ext --inplace > "$work/gpu_build.log" 2>&1
  rc=$?
  stage "build rc=$rc ($((SECONDS - t0)) s)"
  if [ "$rc" != 0 ]; then
    echo "build failed:"; tail -30 "$work/gpu_build.log"
    pack; exit 1
  fi
fi

# --- device and versions, after the build (before it, backends() has no CUDA) -------------------
{
  echo; echo "== device and versions (after the build)"
  timeout 60 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader \
    || echo "nvidia-smi --query-gpu failed"
  nvcc --version 2>&1 | grep -i release || echo "nvcc: none"
  timeout 120 "$PY" -c "import sys, torch, fusedopt; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda); print('backends', fusedopt.backends())" \
    || echo "torch/fusedopt import failed"
} > "$work/env_device.txt" 2>&1
tee -a "$work/env_short.txt" < "$work/env_device.txt"
{
  cat "$work/env_device.txt"
  echo; echo "== nvidia-smi"; timeout 60 nvidia-smi
  echo; echo "== nvcc --version"; nvcc --version
} >> "$work/gpu_env.txt" 2>&1
rm -f "$work/env_device.txt"
timeout 120 "$PY" -c "import fusedopt, sys; b = fusedopt.backends(); sys.exit(0 if b['cuda_usable'] else 1)"
rc=$?
stage "cuda_usable rc=$rc"
if [ "$rc" != 0 ]; then
  echo "fusedopt cannot use the GPU here"
  pack; exit 1
fi
pack

# --- CUDA tests ----------------------------------------------------------------------------------
targs=(-q -rA -m cuda -p no:cacheprovider)
if "$PY" -c "import pytest_timeout" 2> /dev/null; then
  targs+=(--timeout=90 -o faulthandler_timeout=60)
fi
t0=$SECONDS
# SIGINT first, so pytest stops like on Ctrl-C and still prints its summary; killed 10 s later.
timeout -s INT -k 10 "$(left "${TEST_S:-200}")" "$PY" -m pytest tests "${targs[@]}" > "$work/gpu_tests.log" 2>&1
stage "tests rc=$? ($((SECONDS - t0)) s; ${targs[*]})"
grep -E "$test_lines" "$work/gpu_tests.log" | cut -c1-200 | tail -30
pack

# --- CUDA bench ----------------------------------------------------------------------------------
read -ra bench_args <<< "${BENCH_ARGS:-}"
t0=$SECONDS
timeout -s INT -k 10 "$(left "${BENCH_S:-300}")" "$PY" -m fusedopt bench --device cuda \
  --suites "${SUITES:-muon,gram,adamw,lion,adam8bit}" --out "$work" "${bench_args[@]}" > "$work/gpu_bench.log" 2>&1
stage "bench rc=$? ($((SECONDS - t0)) s; suites ${SUITES:-muon,gram,adamw,lion,adam8bit}${BENCH_ARGS:+ $BENCH_ARGS})"
for md in "$work"/*_cuda.md; do
  [ -f "$md" ] && echo "$(basename "$md"): $(grep -c -E '^\| ' "$md") table lines"
done
grep -h -E '^\| ' "$work"/*_cuda.md 2> /dev/null | grep -E 'ref \||FAILED' | cut -c1-200 | head -40
pack

# --- Nsight Compute ------------------------------------------------------------------------------
if command -v ncu > /dev/null; then
  read -ra ncu_suites <<< "${NCU_SUITES:-}"
  t0=$SECONDS
  OUT=$work PY=$PY SIZE=64 LAUNCHES=20 timeout -s INT -k 10 "$(left "${NCU_S:-120}")" \
    bench/profile.sh "${ncu_suites[@]}" > "$work/gpu_ncu.log" 2>&1
  stage "ncu rc=$? ($((SECONDS - t0)) s)"
  tail -5 "$work/gpu_ncu.log"
else
  stage "ncu skipped: not on PATH"
fi
trap - EXIT
pack
echo; cat "$work/gpu_stages.txt"
