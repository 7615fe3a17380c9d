import pytest
import torch

import fusedopt


def cuda_usable() -> bool:
    # Never touch CUDA at import time beyond this cheap query (collection must work without a GPU).
    return fusedopt.backends()["cuda_compiled"] and torch.cuda.is_available()


# The cuda entry carries the cuda mark, so `pytest -m cuda` selects these tests' CUDA cases (and
# only those); where CUDA is unusable it is left out, as before (no skipped cuda cases).
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if cuda_usable() else [])
requires_cuda = pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA device and a CUDA build of fusedopt")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (pytestmark = pytest.mark.usefixtures("one_thread")): small
    matmuls with two OpenMP threads stall at barriers whenever another process holds a core (100x
    slower on a busy 2-core machine). For modules whose checks do not depend on the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def cpu_flags():
    """The flags and vendor of /proc/cpuinfo's first CPU (an independent view of what the native
    dispatch should find); skips the test where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        pytest.skip("no /proc/cpuinfo to tell what this CPU has")
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return set(fields.get("flags", "").split()), fields.get("vendor_id", "")


# The CPU's 8-bit quantizers, by the names lib().cpu_quantizer gives them: one per tier, and on an
# AVX-512 CPU with VBMI two (cpu/parallel.h's use_byte_permute_quantizer picks one by vendor).
QUANTIZERS = ("scalar", "avx2", "avx512 gather", "avx512 byte permutes")


def _use_quantizer(name):
    from fusedopt._ext import lib
    tier = {"scalar": "baseline", "avx2": "avx2"}.get(name, "avx512")
    lib().set_cpu_isa_limit(tier)
    lib().set_cpu_quantizer("byte_permutes" if name == "avx512 byte permutes" else "gather")
    try:
        if lib().cpu_isa() != tier:
            pytest.skip(f"this CPU cannot run the {tier} tier")
        if name == "avx512 byte permutes" and "avx512vbmi" not in cpu_flags()[0]:
            pytest.skip("the byte-permute quantizer needs AVX-512 VBMI")
        yield name
    finally:
        lib().set_cpu_isa_limit(CPU_TIERS[-1])
        lib().set_cpu_quantizer("auto")


@pytest.fixture(params=QUANTIZERS)
def quantizer(request):
    """Runs the test on one 8-bit quantizer (the tier's, and on AVX-512 the one set_cpu_quantizer
    forces), skipping those this CPU lacks; yields the name cpu_quantizer gives a map with the
    coarse table (one without it falls back to the gather)."""
    yield from _use_quantizer(request.param)


@pytest.fixture(params=QUANTIZERS[2:])
def avx512_quantizer(request):
    """As quantizer, for the tests too long to run on the slower tiers."""
    yield from _use_quantizer(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
