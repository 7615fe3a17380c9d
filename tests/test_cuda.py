"""CUDA backend: agreement with the CPU backend, graph capture, streams, launch splitting and
misaligned views. Skipped where no GPU or no CUDA build is present (CPU-only CI)."""
import pytest
import torch

import fusedopt
from conftest import requires_cuda
from reference import fp32_ulp_budget, max_abs

pytestmark = [pytest.mark.cuda, requires_cuda]


def _run(device, init, steps, grads, **kw):
    ps = [t.to(device).clone().requires_grad_() for t in init]
    opt = fusedopt.AdamW(ps, **kw)
    for k in range(steps):
        for p, g in zip(ps, grads[k]):
            p.grad = g.to(device=device, dtype=p.dtype)
        opt.step()
    return [p.detach().cpu() for p in ps], opt, ps


@pytest.mark.parametrize(
    "dtype, kw",
    [
        (torch.float32, dict(weight_decay=0.1)),
        (torch.float32, dict(amsgrad=True, maximize=True)),
        (torch.float32, dict(state_dtype=torch.bfloat16)),
        (torch.bfloat16, dict(master_weights=True)),
        (torch.float16, dict(master_weights=True, amsgrad=True)),
        (torch.bfloat16, dict(lr=1e-2)),  # no master: lr 1e-2 moves params well past the bound below
    ],
)
def test_cpu_and_cuda_backends_agree(dtype, kw):
    """Same math header on both sides; nvcc may contract a*b+c into one FMA where g++ rounds twice,
    so agreement is to a few fp32 ulps per step (fp32 params, fp32 master weights), and a param
    stored in bf16/fp16 without a master to a few of its rounding steps: a rounding that went the
    other way once stays as an absolute offset, whatever |p| does next."""
    shapes = [(1,), (3,), (4097,), (300, 7), (65537,)]
    init = [torch.randn(s).to(dtype) for s in shapes]
    steps = 50
    grads = [[torch.randn(s) for s in shapes] for _ in range(steps)]
    kw = {"lr": 1e-3, **kw}
    cpu, oc, pc = _run("cpu", init, steps, grads, **kw)
    gpu, og, pg = _run("cuda", init, steps, grads, **kw)
    if dtype == torch.float32:
        assert max_abs(cpu, gpu) <= fp32_ulp_budget(steps, 4.0)
    elif kw.get("master_weights"):
        masters = [[o.state[p]["master_param"].cpu() for p in ps] for o, ps in ((oc, pc), (og, pg))]
        assert max_abs(*masters) <= fp32_ulp_budget(steps, 4.0)
        for side, ms in zip((cpu, gpu), masters):
            assert all(torch.equal(p, m.to(dtype)) for p, m in zip(side, ms))
    else:
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10) * 4.0
        assert max_abs(cpu, gpu) <= ulp


def test_graph_capture_equals_eager():
    init = [torch.randn(s, device="cuda") for s in [(1000,), (77, 13)]]
    lr = torch.tensor(1e-2, device="cuda")
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]
    oa = fusedopt.AdamW(a, lr=lr, capturable=True, weight_decay=0.1)
    # lr.item(): the float32 value the captured step reads (a Python 1e-2 rounds the step size
    # differently at some steps; so does the CPU backend, which runs the same rule)
    ob = fusedopt.AdamW(b, lr=lr.item(), weight_decay=0.1)
    for p in a + b:
        p.grad = torch.zeros_like(p)
    oa.step()  # warm up: allocates state outside the graph
    ob.step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            oa.step()
    torch.cuda.current_stream().wait_stream(s)
    for k in range(5):
        grads = [torch.randn_like(t) for t in init]
        for x, y, gr in zip(a, b, grads):
            x.grad.copy_(gr)
            y.grad.copy_(gr)
        g.replay()
        ob.step()
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert oa.state[a[0]]["step"].item() == ob.state[b[0]]["step"].item() == 6


def test_non_default_stream_is_used_and_ordered():
    init = [torch.randn(1 << 20, device="cuda")]
    a = [init[0].clone().requires_grad_()]
    b = [init[0].clone().requires_grad_()]
    oa, ob = fusedopt.AdamW(a), fusedopt.AdamW(b)
    side = torch.cuda.Stream()
    for _ in range(3):
        g = torch.randn_like(init[0])
        a[0].grad, b[0].grad = g.clone(), g.clone()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            oa.step()
        ob.step()
        torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(a[0], b[0])


def test_many_tensors_split_across_launches_and_misaligned_views():
    """700 tensors (> 320 per launch) of odd sizes, some starting 4 bytes past an aligned address."""
    base = torch.randn(5000, device="cuda")
    shapes = [(k % 37 + 1,) for k in range(700)]
    init = [torch.randn(s, device="cuda") for s in shapes]
    views = [base[1 : 1 + 4097].detach().clone(), base[1 : 1 + 4097]]  # aligned copy, misaligned view
    a = [t.clone().requires_grad_() for t in init] + [views[1].detach().requires_grad_()]
    b = [t.clone().requires_grad_() for t in init] + [views[0].requires_grad_()]
    assert a[-1].data_ptr() % 16 != 0
    oa = fusedopt.AdamW(a, lr=1e-2)
    ob = torch.optim.AdamW(b, lr=1e-2, foreach=False)
    for _ in range(20):
        for x, y in zip(a, b):
            gr = torch.randn_like(y)
            x.grad, y.grad = gr.clone(), gr.clone()
        oa.step()
        ob.step()
    assert max_abs(a, b) <= fp32_ulp_budget(20, 4.0)


def test_grad_scaler_inf_skips_on_cuda():
    m = torch.nn.Linear(16, 16).cuda()
    opt = fusedopt.AdamW(m.parameters())
    scaler = torch.amp.GradScaler("cuda")
    scaler.scale(m(torch.randn(4, 16, device="cuda")).sum()).backward()
    m.weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in m.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert all(s["step"].item() == 0 for s in opt.state.values())


def test_device_betas_refuse_graph_capture_clearly_and_step_eagerly():
    # Betas reach the kernel as host floats: a CUDA beta is read (synced) at each eager step, and
    # inside a capture that read would abort it with CUDA's "operation not permitted".
    p = torch.randn(100, device="cuda", requires_grad=True)
    p.grad = torch.randn_like(p)
    betas = (torch.tensor(0.9, device="cuda"), torch.tensor(0.999, device="cuda"))
    opt = fusedopt.AdamW([p], lr=torch.tensor(1e-2, device="cuda"), betas=betas, capturable=True)
    opt.step()
    before = p.detach().clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), pytest.raises(RuntimeError, match="beta 0 .* cuda:0 tensor"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(p.detach(), before) and opt.state[p]["step"].item() == 1
