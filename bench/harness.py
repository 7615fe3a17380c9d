"""What every step-time benchmark here shares: implementations grouped against a fusedopt
reference, validation in a child process before timing, timing with other-process load, GB/s and
% of the bandwidth measured in the same run, the table and the result files.

A bench module defines GROUPS (lists of Impl; the first of a group is the fusedopt reference its
speedups are taken against) and a `check(impl_name, device) -> str | None` run before timing, then
calls `main(...)`.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import multiprocessing as mp
import signal
import sys
from dataclasses import dataclass
from typing import Callable

import torch

import fusedopt
from common import OtherLoad, copy_bandwidth_gbs, env_stamp, markdown_table, time_fn, write_results

M = 1 << 20
SIZES = {"cpu": [1, 4, 16, 32, 64], "cuda": [1, 4, 16, 32, 64, 128, 256]}
QUICK_SIZES = [1, 4]


class Missing(RuntimeError):
    """A peer that is not installed (or cannot run on this device): reported, never dropped."""


@dataclass(frozen=True)
class Impl:
    name: str
    dtype: torch.dtype  # of params and grads
    layout: str  # what each param costs in memory traffic, for the table
    bytes_per_param: int
    make: Callable[[list], torch.optim.Optimizer]  # raises Missing for an absent peer
    is_fusedopt: bool = False


def gpt2_shapes(hidden: int = 768, layers: int = 12, vocab: int = 50257, context: int = 1024) -> list[tuple]:
    """GPT-2-small parameter layout (hidden=768: 148 tensors, 124.4M params); smaller hidden scales it."""
    h = hidden
    shapes = [(vocab, h), (context, h)]
    for _ in range(layers):
        shapes += [(h,), (h,), (h, 3 * h), (3 * h,), (h, h), (h,)]  # ln_1, attn qkv, attn proj
        shapes += [(h,), (h,), (h, 4 * h), (4 * h,), (4 * h, h), (h,)]  # ln_2, mlp fc, mlp proj
    return shapes + [(h,), (h,)]  # ln_f


def peer(module: str, attr: str, pip_name: str) -> Callable:
    """The class `module.attr`, or one that raises Missing naming the pip package."""
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except Exception as e:  # ImportError, or a peer whose import fails on this machine
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:120]

        def missing(*_a, **_k):
            raise Missing(f"missing ({pip_name}: {reason})")

        return missing


# --- validation: a broken kernel is reported, never timed -----------------------------------------
def _validate_child(bench_module: str, impl_name: str, device: str, conn) -> None:
    try:
        conn.send(importlib.import_module(bench_module).check(impl_name, device))
    except Exception as e:  # report any failure as text; the parent decides
        conn.send(f"{type(e).__name__}: {e}")


def validate(bench_module: str, impl_name: str, device: str) -> str | None:
    """Runs bench_module.check in a fresh process: a kernel that corrupts memory then crashes the
    child, not the benchmark."""
    ctx = mp.get_context("spawn")  # fork is unsafe with CUDA and OpenMP state
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_validate_child, args=(bench_module, impl_name, device, send))
    proc.start()
    send.close()
    try:
        err = recv.recv()
    except EOFError:
        err = None
    proc.join()
    if proc.exitcode != 0:
        how = signal.Signals(-proc.exitcode).name if proc.exitcode < 0 else f"exit code {proc.exitcode}"
        return f"validation process died ({how})" + (f" after: {err}" if err else "")
    return err


# --- timing -------------------------------------------------------------------------------------
def time_group(case: str, shapes: list[tuple], group: list[Impl], device: str, failures: dict, timing_kw: dict) -> list[dict]:
    numel = sum(torch.Size(s).numel() for s in shapes)
    params = [torch.randn(s, device=device, dtype=group[0].dtype) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    rows = []
    for impl in group:
        row = dict(case=case, n_tensors=len(shapes), numel=numel, impl=impl.name, layout=impl.layout,
                   bytes_per_param=impl.bytes_per_param, is_fusedopt=impl.is_fusedopt)
        if impl.name in failures:
            rows.append(dict(row, error=failures[impl.name]))
            continue
        try:
            opt = impl.make(params)
            opt.step()  # state allocation (and a peer failing on this device) outside the timing
        except Exception as e:
            rows.append(dict(row, error=str(e) if isinstance(e, Missing) else f"failed: {type(e).__name__}: {e}"[:200]))
            print(f"  {case:>24} | {impl.name:<24} {rows[-1]['error']}", file=sys.stderr, flush=True)
            continue
        nvtx = torch.cuda.nvtx.range(f"{case} | {impl.name}") if device == "cuda" else contextlib.nullcontext()
        with nvtx, OtherLoad() as load:
            row["timing"] = time_fn(opt.step, device, **timing_kw)
        row["other_load_cores"] = load.cores
        del opt  # one optimizer's state alive at a time
        gc.collect()
        rows.append(row)
        print(f"  {case:>24} | {impl.name:<24} {row['timing'].median_ms:9.3f} ms", file=sys.stderr, flush=True)
    return rows


def add_metrics(rows: list[dict], copy_gbs: float) -> None:
    ref_ms = None
    for row in rows:
        t = row.get("timing")
        if row["is_fusedopt"]:
            ref_ms = t.median_ms if t else None
        if t is None:
            continue
        row["gbs"] = row["numel"] * row["bytes_per_param"] / (t.median_ms * 1e-3) / 1e9
        row["pct_copy_bw"] = 100 * row["gbs"] / copy_gbs
        if ref_ms is not None:
            row["fusedopt_speedup"] = t.median_ms / ref_ms


def render(rows: list[dict]) -> str:
    headers = ["case", "params", "implementation", "dtypes", "B/param", "ms/step median [p20, p80]",
               "GB/s", "% measured BW", "fusedopt speedup", "other load (cores)"]
    out = []
    for r in rows:
        head = [r["case"], f"{r['numel'] / 1e6:.1f}M", r["impl"], r["layout"], r["bytes_per_param"]]
        if "error" in r:
            what = r["error"] if r["error"].startswith(("missing", "failed")) else f"FAILED validation, not timed: {r['error']}"
            out.append(head + [what, "-", "-", "-", "-"])
            continue
        t = r["timing"]
        speedup = r.get("fusedopt_speedup")
        out.append(head + [
            f"{t.median_ms:.3f} [{t.p20_ms:.3f}, {t.p80_ms:.3f}]",
            f"{r['gbs']:.1f}",
            f"{r['pct_copy_bw']:.0f}%",
            "-" if speedup is None else ("ref" if r["is_fusedopt"] else f"{speedup:.2f}x"),
            "-" if r["other_load_cores"] is None else f"{r['other_load_cores']:.2f}",
        ])
    return markdown_table(headers, out)


def parse_size(s: str) -> int:
    return int(s.upper().removesuffix("M"))


def main(name: str, doc: str, groups: list[list[Impl]], bench_module: str, sizes: dict | None = None) -> None:
    """Command line, validation, bandwidth probe, timing and results for one benchmark; results go
    to bench/results/<name>_<device>.{json,md}."""
    sizes_by_device = sizes or SIZES
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", nargs="+", type=parse_size, help="single-tensor sizes in M=2**20 params")
    ap.add_argument("--quick", action="store_true", help="sizes 1M 4M and shorter timing runs")
    ap.add_argument("--mix-scale", type=int, default=768, metavar="HIDDEN",
                    help="hidden size of the GPT-2-like tensor mix (768 = full GPT-2 small)")
    args = ap.parse_args()
    if args.device == "cuda" and not fusedopt.backends()["cuda_usable"]:
        sys.exit(f"--device cuda needs a GPU and a CUDA build of fusedopt; backends: {fusedopt.backends()}")
    sizes = args.sizes or (QUICK_SIZES if args.quick else sizes_by_device[args.device])
    timing_kw = dict(target_s=0.3) if args.quick else dict(target_s=1.5)

    stamp = env_stamp(args.device)
    failures = {}
    for impl in (i for g in groups for i in g if i.is_fusedopt):
        if err := validate(bench_module, impl.name, args.device):
            failures[impl.name] = err
            print(f"validation FAILED for {impl.name}: {err}", file=sys.stderr)
    with OtherLoad() as copy_load:
        copy_gbs, copy_t = copy_bandwidth_gbs(args.device)
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s", file=sys.stderr)

    mix_name = "GPT-2 small mix" if args.mix_scale == 768 else f"GPT-2 mix, hidden {args.mix_scale}"
    cases = [(f"1 tensor x {n}M", [(n * M,)]) for n in sizes] + [(mix_name, gpt2_shapes(args.mix_scale))]
    rows = []
    for case, shapes in cases:
        for group in groups:
            group_rows = time_group(case, shapes, group, args.device, failures, timing_kw)
            add_metrics(group_rows, copy_gbs)
            rows += group_rows

    table = render(rows)
    print(table)
    body = (
        f"measured bandwidth (better of dst.copy_(src) and in-place x.mul_(1.0), 2 x nbytes each): **{copy_gbs:.1f} GB/s** "
        f"(median of {copy_t.reps}, {copy_t.median_ms:.2f} ms per pass; other load "
        f"{'-' if copy_load.cores is None else f'{copy_load.cores:.2f}'} cores)\n\n"
        "fusedopt speedup = peer median / fusedopt median within the same group (>1: fusedopt faster). "
        "GB/s counts the model's bytes/param (bench/README.md), 1 GB = 1e9 B.\n\n" + table
    )
    payload = dict(copy_bandwidth_gbs=copy_gbs, copy_timing=copy_t, copy_other_load_cores=copy_load.cores,
                   validation_failures=failures, rows=rows)
    for path in write_results(f"{name}_{args.device}", stamp, payload, body):
        print(f"wrote {path}", file=sys.stderr)
