"""python -m fusedopt bench: every suite (or those named) on one device, with a progress bar; a
markdown table per suite on stdout, and under --out: <suite>_<device>.{json,md} per suite and
bench_<device>.png (GB/s vs tensor size, measured-bandwidth roofline drawn in)."""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path

import fusedopt
from fusedopt.cli_types import positive_int
from fusedopt.benchmarks.common import OtherLoad, copy_bandwidth_gbs, env_stamp, write_results
from fusedopt.benchmarks.harness import QUICK_SIZES, ROUNDS, parse_size, render, run_suite, suite_cases
from fusedopt.benchmarks.plot import plot_roofline

SUITES = ("adamw", "lion", "adam8bit", "muon", "gram")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated, from: {', '.join(SUITES)}")
    p.add_argument("--sizes", nargs="+", type=parse_size, help="single-tensor sizes in M=2**20 params")
    p.add_argument("--quick", action="store_true", help="sizes 1M 4M and shorter timing runs")
    p.add_argument("--mix-scale", type=positive_int, default=768, metavar="HIDDEN",
                   help="hidden size of the GPT-2-like tensor mix (768 = full GPT-2 small)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where results are written")


class Progress:
    """tqdm's bar when tqdm is installed (the bench extra), else one line per row on stderr."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, unit="row", file=sys.stderr, dynamic_ncols=True) if tqdm else None
        self.total, self.done = total, 0

    def __call__(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(label[:60])
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> dict:
    names = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    if args.device == "cuda" and not fusedopt.backends()["cuda_usable"]:
        raise SystemExit(f"--device cuda needs a GPU and a CUDA build of fusedopt; backends: {fusedopt.backends()}")
    suites = {n: importlib.import_module(f"fusedopt.benchmarks.{n}") for n in names}
    sizes = {n: args.sizes or (QUICK_SIZES if args.quick else s.SIZES[args.device]) for n, s in suites.items()}
    timing_kw = dict(target_s=0.3) if args.quick else dict(target_s=1.5)
    command = "python -m fusedopt bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    stamp = env_stamp(args.device, command.strip())

    with OtherLoad() as copy_load:
        copy_gbs, copy_t = copy_bandwidth_gbs(args.device)
    print(f"measured bandwidth: {copy_gbs:.1f} GB/s", file=sys.stderr)
    total = sum(len(suite_cases(s, args.device, sizes[n], args.mix_scale)) * sum(len(g) for g in s.GROUPS)
                for n, s in suites.items())
    bandwidth = (
        f"measured bandwidth (better of dst.copy_(src) and in-place x.mul_(1.0), 2 x nbytes each): **{copy_gbs:.1f} GB/s** "
        f"at the start (median of {copy_t.reps}, {copy_t.median_ms:.2f} ms per pass; other load "
        f"{'-' if copy_load.cores is None else f'{copy_load.cores:.2f}'} cores); the probe is sampled again in "
        f"every round of each group's interleaved timing ({ROUNDS} rounds, each stepping every implementation "
        "in turn): each row's % is against the bandwidth measured alongside it (last column)"
    )
    progress = Progress(total)
    results = {}
    try:
        for n, suite in suites.items():
            res = results[n] = run_suite(suite, args.device, sizes[n], args.mix_scale, timing_kw, progress)
            # Written as each suite ends: a run stopped by a time limit (bench/gpu_check.sh) keeps the
            # suites it finished.
            table = render(res["rows"])
            print(f"\n## {n}\n\n{table}")
            body = (
                f"{bandwidth}\n\nfusedopt speedup = peer median / fusedopt median within the same group (>1: fusedopt "
                "faster). GB/s counts the model's bytes/param (bench/README.md), 1 GB = 1e9 B.\n\n" + table
            )
            payload = dict(copy_bandwidth_gbs=copy_gbs, copy_timing=copy_t, copy_other_load_cores=copy_load.cores, **res)
            for path in write_results(args.out, f"{n}_{args.device}", stamp, payload, body):
                print(f"wrote {path}", file=sys.stderr)
    finally:
        progress.close()

    where = stamp.get("gpu") or stamp["cpu_model"]
    title = f"{where}, {stamp['torch_threads']} threads, torch {stamp['torch']}, git {stamp['git_sha']}: {command}"
    png = plot_roofline({n: r["rows"] for n, r in results.items()}, title, args.out / f"bench_{args.device}.png")
    print(f"wrote {png}" if isinstance(png, Path) else png, file=sys.stderr)
    return results
