"""What every step-time suite shares: implementations grouped against a fusedopt reference,
validation in a child process before timing, timing with other-process load, GB/s and % of the
bandwidth measured in the same run, and the table.

A suite module (adamw.py, lion.py, adam8bit.py, muon.py beside this file) defines NAME, GROUPS
(lists of Impl, each opened by a fusedopt one; a peer's speedup is taken against the nearest
fusedopt Impl above it),
SIZES (per device, in M = 2**20 params) and `check(impl_name, device) -> str | None`, run before
timing. It may define `cases(device, sizes, mix_scale)` (default: one tensor per size and the
GPT-2 mix) and `flops(shapes)` (then rows report TFLOP/s).
"""
from __future__ import annotations

import argparse

import contextlib
import gc
import importlib
import multiprocessing as mp
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fusedopt.benchmarks.common import BandwidthProbe, OtherLoad, markdown_table, sample_ms, summarize

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
    bytes_per_param: int | None  # None: not a bandwidth-bound step (Muon), no GB/s
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
def _validate_child(suite_module: str, impl_name: str, device: str, conn) -> None:
    try:
        conn.send(importlib.import_module(suite_module).check(impl_name, device))
    except Exception as e:  # report any failure as text; the parent decides
        conn.send(f"{type(e).__name__}: {e}")


def validate(suite_module: str, impl_name: str, device: str) -> str | None:
    """Runs suite_module.check in a fresh process: a kernel that corrupts memory then crashes the
    child, not the benchmark."""
    ctx = mp.get_context("spawn")  # fork is unsafe with CUDA and OpenMP state
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_validate_child, args=(suite_module, impl_name, device, send))
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
ROUNDS = 5


def time_group(case: str, shapes: list[tuple], group: list[Impl], device: str, failures: dict, timing_kw: dict,
               progress: Callable[[str], None], flops: float | None = None,
               probe: BandwidthProbe | None = None) -> list[dict]:
    """Times a group's implementations interleaved: ROUNDS rounds, each stepping every
    implementation for a share of its time budget (and sampling the bandwidth probe), so that a
    shared machine's drifting bandwidth (measured here: between 51 and 129 GB/s within minutes)
    reaches every implementation alike instead of whichever happened to run then."""
    numel = sum(torch.Size(s).numel() for s in shapes)
    params = [torch.randn(s, device=device, dtype=group[0].dtype) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    rows, live = [], []
    for impl in group:
        row = dict(case=case, n_tensors=len(shapes), numel=numel, impl=impl.name, layout=impl.layout,
                   bytes_per_param=impl.bytes_per_param, is_fusedopt=impl.is_fusedopt, flops=flops)
        rows.append(row)
        if impl.name in failures:
            row["error"] = failures[impl.name]
            continue
        try:
            opt = impl.make(params)
            for _ in range(3):  # state allocation, compilation, warmup: outside the timing
                opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            one_ms = (time.perf_counter() - t0) * 1e3
        except Exception as e:
            row["error"] = str(e) if isinstance(e, Missing) else f"failed: {type(e).__name__}: {e}"[:200]
            continue
        target_s = timing_kw.get("target_s", 1.5)
        per_round = max(1, min(40, int(target_s * 1e3 / ROUNDS / max(one_ms, 1e-3))))
        live.append((row, impl, opt, per_round, []))
    with OtherLoad() as load:
        for _ in range(ROUNDS):
            for entry in list(live):
                row, impl, opt, reps, samples = entry
                nvtx = torch.cuda.nvtx.range(f"{case} | {impl.name}") if device == "cuda" else contextlib.nullcontext()
                try:
                    with nvtx:
                        samples += sample_ms(opt.step, device, reps)
                except Exception as e:  # e.g. out of memory with every implementation's state alive
                    row["error"] = f"failed: {type(e).__name__}: {e}"[:200]
                    live.remove(entry)
            if probe is not None:
                probe.sample()
    for row, impl, opt, reps, samples in live:
        row["timing"] = summarize(samples)
        row["other_load_cores"] = load.cores  # over the whole interleaved block
    for impl in group:
        progress(f"{case} | {impl.name}")
    del live
    gc.collect()
    return rows


def add_metrics(rows: list[dict], copy_gbs: float) -> None:
    ref_ms = None
    for row in rows:
        row["bandwidth_gbs"] = copy_gbs
        t = row.get("timing")
        if row["is_fusedopt"]:
            ref_ms = t.median_ms if t else None
        if t is None:
            continue
        if row["bytes_per_param"] is not None:
            row["gbs"] = row["numel"] * row["bytes_per_param"] / (t.median_ms * 1e-3) / 1e9
            row["pct_copy_bw"] = 100 * row["gbs"] / copy_gbs
        if row.get("flops"):
            row["tflops"] = row["flops"] / (t.median_ms * 1e-3) / 1e12
        if ref_ms is not None:
            row["fusedopt_speedup"] = t.median_ms / ref_ms


def render(rows: list[dict]) -> str:
    flops = any(r.get("flops") for r in rows)
    headers = ["case", "params", "implementation", "dtypes", "B/param", "ms/step median [p20, p80]",
               "TFLOP/s" if flops else "GB/s", "% measured BW", "fusedopt speedup", "other load (cores)",
               "measured BW (GB/s)"]
    out = []
    for r in rows:
        head = [r["case"], f"{r['numel'] / 1e6:.1f}M", r["impl"], r["layout"],
                "-" if r["bytes_per_param"] is None else r["bytes_per_param"]]
        if "error" in r:
            what = r["error"] if r["error"].startswith(("missing", "failed")) else f"FAILED validation, not timed: {r['error']}"
            out.append(head + [what, "-", "-", "-", "-", "-"])
            continue
        t = r["timing"]
        speedup = r.get("fusedopt_speedup")
        out.append(head + [
            f"{t.median_ms:.3f} [{t.p20_ms:.3f}, {t.p80_ms:.3f}]",
            f"{r['tflops']:.3f}" if flops else f"{r['gbs']:.1f}",
            "-" if "pct_copy_bw" not in r else f"{r['pct_copy_bw']:.0f}%",
            "-" if speedup is None else ("ref" if r["is_fusedopt"] else f"{speedup:.2f}x"),
            "-" if r["other_load_cores"] is None else f"{r['other_load_cores']:.2f}",
            f"{r['bandwidth_gbs']:.1f}",
        ])
    return markdown_table(headers, out)


def parse_size(s: str) -> int:
    """A --sizes value: a whole number of M = 2**20 params ("64" or "64M")."""
    try:
        n = int(s.upper().removesuffix("M"))
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"sizes are whole numbers of M = 2**20 params (1, 64, 256M), got {s!r}")
    return n


def cases(sizes: list[int], mix_scale: int) -> list[tuple[str, list[tuple]]]:
    mix_name = "GPT-2 small mix" if mix_scale == 768 else f"GPT-2 mix, hidden {mix_scale}"
    return [(f"1 tensor x {n}M", [(n * M,)]) for n in sizes] + [(mix_name, gpt2_shapes(mix_scale))]


def suite_cases(suite, device: str, sizes: list[int], mix_scale: int) -> list[tuple[str, list[tuple]]]:
    return suite.cases(device, sizes, mix_scale) if hasattr(suite, "cases") else cases(sizes, mix_scale)


def run_suite(suite, device: str, sizes: list[int], mix_scale: int, timing_kw: dict,
              progress: Callable[[str], None]) -> dict:
    """Validate the suite's fusedopt implementations, then time every group on every case. The
    bandwidth probe runs inside each group's rounds (see time_group), so a row's % is against the
    bandwidth the machine had while that row was timed."""
    failures = {}
    for impl in (i for g in suite.GROUPS for i in g if i.is_fusedopt):
        if err := validate(suite.__name__, impl.name, device):
            failures[impl.name] = err
            print(f"validation FAILED for {impl.name}: {err}", file=sys.stderr)
    rows = []
    probe = BandwidthProbe(device)
    for case, shapes in suite_cases(suite, device, sizes, mix_scale):
        flops = suite.flops(shapes) if hasattr(suite, "flops") else None
        for group in suite.GROUPS:
            probe.copy_ms, probe.inplace_ms = [], []  # this group's rounds only
            group_rows = time_group(case, shapes, group, device, failures, timing_kw, progress, flops, probe)
            add_metrics(group_rows, probe.gbs())
            rows += group_rows
    return dict(validation_failures=failures, rows=rows)
