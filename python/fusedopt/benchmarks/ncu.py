"""Nsight Compute CSV (`ncu --csv --metrics ...`) -> per-kernel medians, appended to a results file.

    python -m fusedopt.benchmarks.ncu REPORT.csv bench/results/adamw_cuda.md

bench/profile.sh runs ncu and then this. Each kernel (name up to its template arguments) gets the
median over its profiled launches of duration and of achieved DRAM throughput as % of peak.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from pathlib import Path

DRAM_PCT = "dram__throughput.avg.pct_of_peak_sustained_elapsed"
DURATION = "gpu__time_duration.sum"
DRAM_BYTES = "dram__bytes.sum"


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:  # 'n/a' where ncu could not collect a metric
        return None


def _to_ns(value: float, unit: str) -> float:
    return value * {"nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(unit, 1.0)


def _to_bytes(value: float, unit: str) -> float:
    scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    return value * scale.get(unit, 1.0)


def kernel_name(demangled: str) -> str:
    """'void fusedopt::cuda::(anonymous namespace)::adam_kernel<float, bf16_t, ...>(...)' ->
    'adam_kernel<float, bf16_t, ...>': namespaces and arguments dropped, template arguments kept
    (they tell the dtype variants, and Adam8bit's rule from Lion8bit's, apart)."""
    name = demangled.replace("(anonymous namespace)::", "").strip()
    if name.startswith("void "):
        name = name[5:]
    depth, end = 0, len(name)
    for i, ch in enumerate(name):  # the argument list starts at the first '(' outside template brackets
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            end = i
            break
    name = name[:end].strip()
    head, _, args = name.partition("<")
    head = head.rsplit("::", 1)[-1]
    args = args.replace("fusedopt::math::", "").replace("fusedopt::", "")
    return f"{head}<{args}" if args else head


def parse(csv_text: str) -> dict[str, dict]:
    """{kernel: {launches, median_us, median_dram_pct, median_dram_mb}} from ncu's --csv output
    (ncu prints its own lines before the CSV header; they are skipped)."""
    start = csv_text.find('"ID"')
    if start < 0:
        raise ValueError("no ncu CSV header (a line starting with \"ID\") in the input")
    per_launch: dict[tuple[str, str], dict[str, float]] = {}
    for row in csv.DictReader(io.StringIO(csv_text[start:])):
        kernel = kernel_name(row["Kernel Name"])
        launch = per_launch.setdefault((row["ID"], kernel), {})
        metric, unit, value = row["Metric Name"], row.get("Metric Unit", ""), _number(row["Metric Value"])
        if value is None:
            continue
        if metric == DURATION:
            launch["ns"] = _to_ns(value, unit)
        elif metric == DRAM_PCT:
            launch["pct"] = value
        elif metric == DRAM_BYTES:
            launch["bytes"] = _to_bytes(value, unit)
    kernels: dict[str, dict] = {}
    for (_, kernel), m in per_launch.items():
        k = kernels.setdefault(kernel, {"ns": [], "pct": [], "bytes": []})
        for key in ("ns", "pct", "bytes"):
            if key in m:
                k[key].append(m[key])
    return {
        name: dict(
            launches=len(k["ns"]) or len(k["pct"]),
            median_us=statistics.median(k["ns"]) / 1e3 if k["ns"] else None,
            median_dram_pct=statistics.median(k["pct"]) if k["pct"] else None,
            median_dram_mb=statistics.median(k["bytes"]) / 1e6 if k["bytes"] else None,
        )
        for name, k in kernels.items()
    }


def markdown(kernels: dict[str, dict], command: str) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["## Nsight Compute", "", f"- command: `{command}`", "",
             "| kernel | launches | median duration (us) | DRAM throughput (% of peak) | DRAM MB per launch |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {k['launches']} | {fmt(k['median_us'], '.1f')} | {fmt(k['median_dram_pct'], '.1f')} | "
              f"{fmt(k['median_dram_mb'], '.1f')} |" for n, k in sorted(kernels.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m fusedopt.benchmarks.ncu REPORT.csv RESULTS.md [COMMAND]")
    report, results = Path(argv[0]), Path(argv[1])
    command = argv[2] if len(argv) > 2 else "ncu"
    kernels = parse(report.read_text())
    with results.open("a") as f:
        f.write("\n" + markdown(kernels, command))
    results.with_suffix(".ncu.json").write_text(json.dumps({"command": command, "kernels": kernels}, indent=2) + "\n")
    print(markdown(kernels, command))


if __name__ == "__main__":
    main(sys.argv[1:])
