import pytest
import torch

import fusedopt


def cuda_usable() -> bool:
    # Never touch CUDA at import time beyond this cheap query (collection must work without a GPU).
    return fusedopt.backends()["cuda_compiled"] and torch.cuda.is_available()


DEVICES = ["cpu"] + (["cuda"] if cuda_usable() else [])
requires_cuda = pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA device and a CUDA build of fusedopt")


CPU_TIERS = ("baseline", "avx2", "avx512")  # the CPU loops' instruction sets (cpu/parallel.h)


@pytest.fixture(params=CPU_TIERS)
def tier(request):
    """Runs the test with the CPU loops capped at one instruction set (each has its own 8-bit
    quantizer: the scalar loop, cpu/quantize_avx2.h, cpu/quantize_avx512.h); skips the tiers this
    CPU lacks."""
    from fusedopt._ext import lib
    lib().set_cpu_isa_limit(request.param)
    try:
        if lib().cpu_isa() != request.param:
            pytest.skip(f"this CPU cannot run the {request.param} tier")
        yield request.param
    finally:
        lib().set_cpu_isa_limit(CPU_TIERS[-1])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
