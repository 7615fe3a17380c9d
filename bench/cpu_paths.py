"""The CPU code paths the optimizer benchmarks cannot separate, timed alone:

- the 8-bit quantizer and dequantizer of each instruction-set tier (one thread, a 64K-element
  buffer: L2-resident), through the raw blockwise entry points (the quantize row includes the
  block absmax); in the AVX-512 tier of a CPU with VBMI, both of its quantizers (byte permutes
  over the coarse table, and the gather), marking the one set_cpu_quantizer('auto') picks;
- torch's bmm in fp32, bf16 and fp16 (8 x 512^3), and Newton-Schulz on 8 bf16 512x512 matrices
  through each of newton_schulz.iterate's CPU paths (native 16-bit GEMMs, or fp32 GEMMs rounded
  to bf16 per product; newton_schulz.cpu_has_16bit_matmul picks one);
- Muon's native prepare pass (momentum, norm, bf16 cast) on one 4096x4096 fp32 matrix.

    PYTHONPATH=python python bench/cpu_paths.py [--out bench/results/<machine>]

Writes cpu_paths.{md,json} (environment stamp on top) to --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fusedopt
from fusedopt import newton_schulz as ns
from fusedopt import quant
from fusedopt._ext import lib
from fusedopt._ops import muon_prepare_
from fusedopt.benchmarks.common import env_stamp, markdown_table, time_cpu, write_results


def quantizer_rows() -> list[list]:
    torch.set_num_threads(1)
    n = 1 << 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4
    codes, absmax, out = torch.empty(n, dtype=torch.uint8), torch.empty(n // 256), torch.empty(n)
    rows = []
    try:
        for tier in ("baseline", "avx2", "avx512"):
            lib().set_cpu_isa_limit(tier)
            if lib().cpu_isa() != tier:
                continue
            for signed in (True, False):
                xs, qm = (x if signed else x.abs()), quant.quant_map(signed)
                lib().set_cpu_quantizer("auto")
                chosen = lib().cpu_quantizer(qm.data_ptr())
                # In the AVX-512 tier with VBMI, set_cpu_quantizer picks between two quantizers
                # (byte permutes over math/quant8_coarse.h's table, or the gather).
                paths = {}
                for choice in ("byte_permutes", "gather"):
                    lib().set_cpu_quantizer(choice)
                    paths.setdefault(lib().cpu_quantizer(qm.data_ptr()), choice)
                for path, choice in paths.items():
                    lib().set_cpu_quantizer(choice)
                    q = time_cpu(lambda: lib().quantize_blockwise(xs.data_ptr(), n, qm.data_ptr(), codes.data_ptr(),
                                                                  absmax.data_ptr(), 1))
                    d = time_cpu(lambda: lib().dequantize_blockwise(codes.data_ptr(), absmax.data_ptr(), n,
                                                                    qm.data_ptr(), out.data_ptr(), 1))
                    rows.append([tier, "signed" if signed else "unsigned", path, "yes" if path == chosen else "-",
                                 f"{q.median_ms * 1e6 / n:.3f}", f"{d.median_ms * 1e6 / n:.3f}"])
    finally:
        lib().set_cpu_isa_limit("avx512")
        lib().set_cpu_quantizer("auto")
    return rows


def matmul_rows(threads: int) -> list[list]:
    torch.set_num_threads(threads)
    x = torch.randn(8, 512, 512, generator=torch.Generator().manual_seed(0))
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = x.to(dtype)
        t = time_cpu(lambda: torch.bmm(a, a.mT), target_s=0.5, max_reps=50)
        rows.append([f"bmm 8 x 512^3, {dtype}", f"{t.median_ms:.2f}", "native" if ns.cpu_has_16bit_matmul(dtype) else "-"])
    chosen = ns.cpu_has_16bit_matmul
    try:
        for native in (True, False):
            ns.cpu_has_16bit_matmul = lambda d, native=native: native
            t = time_cpu(lambda: ns.zeropower(x), target_s=0.5, min_reps=3, max_reps=20)
            path = "native bf16 GEMMs" if native else "fp32 GEMMs rounded to bf16"
            rows.append([f"Newton-Schulz 8 x 512x512, 5 steps, {path}", f"{t.median_ms:.2f}",
                         "chosen here" if chosen(torch.bfloat16) == native else "-"])
    finally:
        ns.cpu_has_16bit_matmul = chosen
    return rows


def prepare_rows(threads: int) -> list[list]:
    torch.set_num_threads(threads)
    n = 4096 * 4096
    g, b, o = [torch.randn(n)], [torch.randn(n)], [torch.empty(n, dtype=torch.bfloat16)]
    rows = []
    for nesterov in (True, False):
        t = time_cpu(lambda: muon_prepare_(g, b, o, momentum=0.95, nesterov=nesterov, eps=1e-7, safety=1.0),
                     target_s=0.5, max_reps=50)
        # reads g and the buffer twice, writes the buffer and the bf16 output: 22 bytes per element
        rows.append([f"muon prepare, 4096x4096 fp32, nesterov={nesterov}", f"{t.median_ms:.2f}",
                     f"{22 * n / t.median_ms / 1e6:.1f}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    stamp = env_stamp("cpu", "python bench/cpu_paths.py " + " ".join(sys.argv[1:]))
    quant_rows = quantizer_rows()
    mm_rows = matmul_rows(args.threads)
    prep_rows = prepare_rows(args.threads)
    body = "\n\n".join([
        "## 8-bit quantizer per tier (1 thread, 64K elements, ns per element; quantize includes the block absmax)",
        markdown_table(["tier", "map", "quantizer", "auto picks it", "quantize", "dequantize"], quant_rows),
        f"## 16-bit GEMMs and Newton-Schulz ({args.threads} threads, ms)",
        markdown_table(["what", "ms", "path"], mm_rows),
        f"## Muon prepare ({args.threads} threads)",
        markdown_table(["what", "ms", "GB/s"], prep_rows),
    ])
    payload = {"quantizer": quant_rows, "matmul": mm_rows, "prepare": prep_rows, "fusedopt": fusedopt.__version__}
    for path in write_results(args.out, "cpu_paths", stamp, payload, body):
        print(f"wrote {path}")
    print(body)


if __name__ == "__main__":
    main()
