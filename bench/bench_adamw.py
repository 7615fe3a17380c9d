"""AdamW step time: fusedopt.AdamW vs torch.optim.AdamW (for-loop, foreach, fused).

    PYTHONPATH=python python bench/bench_adamw.py [--device cpu|cuda] [--sizes 1M 4M ...] [--quick]

Only optimizer.step() is timed; grads are set once. Sizes are in M = 2**20 params. Results go to
stdout and to bench/results/adamw_<device>.{json,md}; see bench/README.md for the bytes model.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as mp
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusedopt  # noqa: E402
from common import OtherLoad, copy_bandwidth_gbs, env_stamp, markdown_table, time_fn, write_results  # noqa: E402

M = 1 << 20
SIZES = {"cpu": [1, 4, 16, 32, 64], "cuda": [1, 4, 16, 32, 64, 128, 256]}
QUICK_SIZES = [1, 4]
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


@dataclass(frozen=True)
class Impl:
    name: str
    dtype: torch.dtype  # of params and grads
    layout: str  # what each param costs in memory traffic, for the table
    bytes_per_param: int
    make: Callable[[list], torch.optim.Optimizer]
    is_fusedopt: bool = False


# Each group is timed on its own params; its first entry is the reference for "fusedopt speedup".
GROUPS = [
    [
        Impl("fusedopt", torch.float32, "fp32 p,g,m,v", 28, lambda ps: fusedopt.AdamW(ps, **HYPER), True),
        Impl("torch for-loop", torch.float32, "fp32 p,g,m,v", 28, lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=False)),
        Impl("torch foreach", torch.float32, "fp32 p,g,m,v", 28, lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=True)),
        Impl("torch fused", torch.float32, "fp32 p,g,m,v", 28, lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True)),
    ],
    [
        # g2 + master 4 (r+w) + m 4 (r+w) + v 4 (r+w) + p2 written = 28
        Impl("fusedopt master_weights", torch.bfloat16, "bf16 p,g + fp32 master,m,v", 28,
             lambda ps: fusedopt.AdamW(ps, **HYPER, master_weights=True), True),
        # p,g,m,v all bf16: 2 * 7 = 14
        Impl("torch fused bf16", torch.bfloat16, "bf16 p,g,m,v", 14, lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True)),
    ],
]
IMPLS = {impl.name: impl for group in GROUPS for impl in group}


def gpt2_shapes(hidden: int = 768, layers: int = 12, vocab: int = 50257, context: int = 1024) -> list[tuple]:
    """GPT-2-small parameter layout (hidden=768: 148 tensors, 124.4M params); smaller hidden scales it."""
    h = hidden
    shapes = [(vocab, h), (context, h)]
    for _ in range(layers):
        shapes += [(h,), (h,), (h, 3 * h), (3 * h,), (h, h), (h,)]  # ln_1, attn qkv, attn proj
        shapes += [(h,), (h,), (h, 4 * h), (4 * h,), (4 * h, h), (h,)]  # ln_2, mlp fc, mlp proj
    return shapes + [(h,), (h,)]  # ln_f


# --- validation: a broken kernel is reported, never timed -----------------------------------------
def check_against_torch(impl_name: str, device: str) -> str | None:
    """Two steps of `impl` vs torch.optim.AdamW(foreach=False) in fp32 from the same values; None if ok.
    Sizes cross the CPU backend's chunk and OpenMP thresholds."""
    impl = IMPLS[impl_name]
    torch.manual_seed(0)
    shapes = [(3, 70001), (1000,), (7,)]
    params = [torch.randn(s, device=device).to(impl.dtype) for s in shapes]
    refs = [p.float() for p in params]
    for p, r in zip(params, refs):
        p.grad = torch.randn_like(p)
        r.grad = p.grad.float()
    opt, ref_opt = impl.make(params), torch.optim.AdamW(refs, **HYPER, foreach=False)
    for _ in range(2):
        opt.step()
        ref_opt.step()
    try:
        for p, r in zip(params, refs):
            master = opt.state[p].get("master_param")
            torch.testing.assert_close(p.float() if master is None else master, r)
            if master is not None:
                torch.testing.assert_close(p, master.to(p.dtype), rtol=0, atol=0)
    except AssertionError as e:
        return str(e).splitlines()[0]
    return None


def _validate_child(impl_name: str, device: str, conn) -> None:
    try:
        conn.send(check_against_torch(impl_name, device))
    except Exception as e:  # report any failure as text; the parent decides
        conn.send(f"{type(e).__name__}: {e}")


def validate(impl_name: str, device: str) -> str | None:
    """Runs the check in a fresh process: a kernel that corrupts memory then crashes the child,
    not the benchmark."""
    ctx = mp.get_context("spawn")  # fork is unsafe with CUDA and OpenMP state
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_validate_child, args=(impl_name, device, send))
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
                   bytes_per_param=impl.bytes_per_param)
        if impl.name in failures:
            rows.append(dict(row, error=failures[impl.name]))
            continue
        opt = impl.make(params)
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
        if IMPLS[row["impl"]].is_fusedopt:
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
            out.append(head + [f"FAILED validation, not timed: {r['error']}", "-", "-", "-", "-"])
            continue
        t = r["timing"]
        speedup = r.get("fusedopt_speedup")
        out.append(head + [
            f"{t.median_ms:.3f} [{t.p20_ms:.3f}, {t.p80_ms:.3f}]",
            f"{r['gbs']:.1f}",
            f"{r['pct_copy_bw']:.0f}%",
            "-" if speedup is None else ("ref" if IMPLS[r["impl"]].is_fusedopt else f"{speedup:.2f}x"),
            "-" if r["other_load_cores"] is None else f"{r['other_load_cores']:.2f}",
        ])
    return markdown_table(headers, out)


def parse_size(s: str) -> int:
    return int(s.upper().removesuffix("M"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", nargs="+", type=parse_size, help="single-tensor sizes in M=2**20 params")
    ap.add_argument("--quick", action="store_true", help="sizes 1M 4M and shorter timing runs")
    ap.add_argument("--mix-scale", type=int, default=768, metavar="HIDDEN",
                    help="hidden size of the GPT-2-like tensor mix (768 = full GPT-2 small)")
    args = ap.parse_args()
    if args.device == "cuda" and not fusedopt.backends()["cuda_usable"]:
        sys.exit(f"--device cuda needs a GPU and a CUDA build of fusedopt; backends: {fusedopt.backends()}")
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES[args.device])
    timing_kw = dict(target_s=0.3) if args.quick else dict(target_s=1.5)

    stamp = env_stamp(args.device)
    failures = {}
    for impl in IMPLS.values():
        if impl.is_fusedopt and (err := validate(impl.name, args.device)):
            failures[impl.name] = err
            print(f"validation FAILED for {impl.name}: {err}", file=sys.stderr)
    with OtherLoad() as copy_load:
        copy_gbs, copy_t = copy_bandwidth_gbs(args.device)
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s", file=sys.stderr)

    mix_name = "GPT-2 small mix" if args.mix_scale == 768 else f"GPT-2 mix, hidden {args.mix_scale}"
    cases = [(f"1 tensor x {n}M", [(n * M,)]) for n in sizes] + [(mix_name, gpt2_shapes(args.mix_scale))]
    rows = []
    for case, shapes in cases:
        for group in GROUPS:
            group_rows = time_group(case, shapes, group, args.device, failures, timing_kw)
            add_metrics(group_rows, copy_gbs)
            rows += group_rows

    table = render(rows)
    print(table)
    body = (
        f"measured bandwidth (better of dst.copy_(src) and in-place x.mul_(1.0), 2 x nbytes each): **{copy_gbs:.1f} GB/s** "
        f"(median of {copy_t.reps}, {copy_t.median_ms:.2f} ms per pass; other load "
        f"{'-' if copy_load.cores is None else f'{copy_load.cores:.2f}'} cores)\n\n"
        "fusedopt speedup = torch median / fusedopt median within the same dtype group (>1: fusedopt faster). "
        "GB/s counts the model's bytes/param (bench/README.md), 1 GB = 1e9 B.\n\n" + table
    )
    payload = dict(copy_bandwidth_gbs=copy_gbs, copy_timing=copy_t, copy_other_load_cores=copy_load.cores,
                   validation_failures=failures, rows=rows)
    for path in write_results(f"adamw_{args.device}", stamp, payload, body):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
