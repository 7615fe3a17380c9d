"""Muon's native passes on CUDA (csrc/cuda/muon_cuda.cu): agreement with the CPU backend, launches
split over more than 320 tensors, a CUDA lr tensor. Skipped where no GPU or no CUDA build is
present (written without a GPU: not yet run)."""
import pytest
import torch

import fusedopt
from conftest import requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

# 700 same-shape matrices: three multi-tensor launches (320 tensors each), so the per-launch
# offsets into the partial-sum workspace are exercised; one matrix over a 16K-element chunk; a tall one.
SHAPES = [(8, 16)] * 700 + [(160, 130), (130, 40)]


def _run(device, dtype, steps=3, **kw):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in SHAPES] for _ in range(steps)]
    ps = [t.to(device, copy=True).requires_grad_() for t in init]  # .to("cpu") alone would be init itself
    opt = fusedopt.Muon(ps, weight_decay=0.1, **kw)
    for step_grads in grads:
        for p, gr in zip(ps, step_grads):
            p.grad = gr.to(device)
        opt.step()
    return init, ps, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nesterov", [True, False])
def test_cuda_agrees_with_the_cpu_backend(dtype, nesterov):
    """The momentum buffers are the same fmaf lerps on both backends: bitwise equal. The params
    go through bf16 Newton-Schulz on cuBLAS vs the CPU's GEMMs (and a per-matrix norm summed in
    another order), so they agree to the NS rounding: within 2% of the distance travelled."""
    init, cpu, oc = _run("cpu", dtype, lr=0.02, nesterov=nesterov)
    _, gpu, og = _run("cuda", dtype, lr=0.02, nesterov=nesterov)
    torch.cuda.synchronize()
    for pc, pg in zip(cpu, gpu):
        assert torch.equal(oc.state[pc]["momentum_buffer"], og.state[pg]["momentum_buffer"].cpu())
    travelled = sum(((pc.detach().float() - t.float()) ** 2).sum() for pc, t in zip(cpu, init)) ** 0.5
    diff = sum(((pc.detach().float() - pg.detach().cpu().float()) ** 2).sum() for pc, pg in zip(cpu, gpu)) ** 0.5
    assert diff <= 0.02 * travelled


def test_cuda_lr_tensor_is_read_in_the_kernel():
    """A CUDA lr tensor gives the float lr's result, the step makes no host sync (reading the
    tensor back would raise under the sync debug mode), and a change in place reaches the next step."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g).cuda() for s in SHAPES]
    grads = [torch.randn(s, generator=g).cuda() for s in SHAPES]

    def run(lr):
        ps = [t.clone().requires_grad_() for t in init]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        opt = fusedopt.Muon(ps, lr=lr, weight_decay=0.1)
        opt.step()  # state allocation
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return ps, opt

    a, _ = run(0.02)
    b, opt = run(torch.tensor(0.02, device="cuda"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    before = [p.detach().clone() for p in b]
    opt.param_groups[0]["lr"].zero_()  # lr 0: no update and no decay (decay is lr * weight_decay)
    opt.step()
    assert all(torch.equal(x, p) for x, p in zip(before, b))
