"""AdamW8bit on CUDA (and Lion8bit, where it shares cuda/blockwise8bit.cuh's machinery): agreement
with the CPU backend, graph capture, streams, launch splitting, misaligned views and GradScaler.
Skipped where no GPU or no CUDA build is present."""
import pytest
import torch

import fusedopt
from conftest import requires_cuda
from problems import cpu_cuda_lockstep

pytestmark = [pytest.mark.cuda, requires_cuda]

SHAPES = [(1,), (255,), (257,), (4097,), (300, 7), (70001,)]


def _opt(params, **kw):
    return fusedopt.AdamW8bit(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, min_8bit_size=0, **kw)


@pytest.mark.parametrize("dtype, kw", [(torch.float32, {}), (torch.bfloat16, dict(master_weights=True)),
                                       (torch.float16, dict(master_weights=True))])
def test_each_step_agrees_with_the_cpu_backend(dtype, kw):
    """Both backends start every step from the same params and state. They share math/adam8bit.h
    and math/quant8.h; nvcc may contract a*b+c into one FMA where g++ rounds twice, so m and v can
    differ by an ulp, which moves a code (by one) only for a moment within an ulp of a rounding
    boundary: rare. Params agree to a few fp32 ulps (or one 16-bit rounding)."""
    flips = total = 0
    for cpu, gpu, oc, og in cpu_cuda_lockstep(lambda ps: _opt(ps, **kw), SHAPES, dtype):
        for pc, pg in zip(cpu, gpu):
            sc, sg = oc.state[pc], {k: v.cpu() for k, v in og.state[pg].items()}
            assert sc["step"].item() == sg["step"].item()
            if dtype == torch.float32:
                torch.testing.assert_close(pg.detach().cpu(), pc.detach(), rtol=1e-6, atol=1e-6)
            else:
                torch.testing.assert_close(sg["master_param"], sc["master_param"], rtol=1e-6, atol=1e-6)
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                torch.testing.assert_close(sg[key], sc[key], rtol=1e-6, atol=0)
            for key in ("exp_avg", "exp_avg_sq"):
                diff = (sg[key].long() - sc[key].long()).abs()
                assert diff.max().item() <= 1
                flips += int((diff != 0).sum())
                total += diff.numel()
    assert flips <= 1e-3 * total


def test_free_running_trajectories_stay_close():
    """50 steps without resynchronizing: code flips then feed back, so the bound is the 8-bit
    rounding error itself (5% of the distance travelled, as against fp32 AdamW)."""
    init = [torch.randn(s) for s in SHAPES]
    cpu = [t.clone().requires_grad_() for t in init]
    gpu = [t.cuda().requires_grad_() for t in init]
    oc, og = _opt(cpu), _opt(gpu)
    for _ in range(50):
        for pc, pg in zip(cpu, gpu):
            g = torch.randn(pc.shape)
            pc.grad, pg.grad = g, g.cuda()
        oc.step()
        og.step()
    travelled = sum(((p.detach() - t) ** 2).sum() for p, t in zip(cpu, init)) ** 0.5
    diff = sum(((pc.detach() - pg.detach().cpu()) ** 2).sum() for pc, pg in zip(cpu, gpu)) ** 0.5
    assert diff <= 0.05 * travelled


@pytest.mark.parametrize("cls", [fusedopt.AdamW8bit, fusedopt.Lion8bit], ids=["AdamW8bit", "Lion8bit"])
def test_graph_capture_equals_eager(cls):
    """Both run cuda/blockwise8bit.cuh: a captured step replays as the eager one, bit for bit."""
    init = [torch.randn(s, device="cuda") for s in [(5000,), (77, 130)]]
    lr = torch.tensor(1e-2, device="cuda")
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]
    oa = cls(a, lr=lr, capturable=True, weight_decay=0.1)
    # lr.item(): the float32 value the captured step reads (a Python 1e-2 rounds the step size
    # differently at some steps; so does the CPU backend, which runs the same rule)
    ob = cls(b, lr=lr.item(), weight_decay=0.1)
    for p in a + b:
        p.grad = torch.zeros_like(p)
    oa.step()  # warm up: allocates state (and copies the quantization maps) outside the graph
    ob.step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            oa.step()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(5):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad.copy_(g)
            y.grad.copy_(g)
        graph.replay()
        ob.step()
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(oa.state[x]["exp_avg"], ob.state[y]["exp_avg"]) for x, y in zip(a, b))
    if cls is fusedopt.AdamW8bit:
        assert oa.state[a[0]]["step"].item() == ob.state[b[0]]["step"].item() == 6


def test_capturing_the_first_step_says_to_warm_up(monkeypatch):
    """The first 8-bit step on a device copies the maps there (quant.maps_on): refused under capture
    with an error that says what to do, not CUDA's 'operation not permitted when stream is capturing'."""
    import functools
    from fusedopt import quant
    monkeypatch.setattr(quant, "_maps_cached", functools.cache(quant._maps_cached.__wrapped__))  # as in a new process
    p = torch.randn(5000, device="cuda", requires_grad=True)
    p.grad = torch.randn_like(p)
    opt = fusedopt.AdamW8bit([p], lr=torch.tensor(1e-2, device="cuda"), capturable=True)
    before = p.detach().clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with pytest.raises(RuntimeError, match="run one step before capturing"):
        with torch.cuda.stream(s):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                opt.step()
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(p.detach(), before)


def test_non_default_stream_is_used_and_ordered():
    init = torch.randn(1 << 20, device="cuda")
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    oa, ob = fusedopt.AdamW8bit([a]), fusedopt.AdamW8bit([b])
    side = torch.cuda.Stream()
    for _ in range(3):
        g = torch.randn_like(init)
        a.grad, b.grad = g.clone(), g.clone()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            oa.step()
        ob.step()
        torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(a, b)


def test_many_tensors_and_misaligned_views_match_cpu():
    """700 tensors (> 320 per launch) of odd sizes, one a view starting 4 bytes past alignment."""
    shapes = [((k * 37) % 600 + 1,) for k in range(700)]
    init = [torch.randn(s) for s in shapes]
    base = torch.randn(5000, device="cuda")
    view = base[1: 1 + 4097]
    view.copy_(torch.randn(4097))
    assert view.data_ptr() % 16 != 0
    gpu = [t.cuda().requires_grad_() for t in init] + [view.detach().requires_grad_()]
    cpu = [t.clone().requires_grad_() for t in init] + [view.detach().cpu().requires_grad_()]
    oc, og = _opt(cpu), _opt(gpu)
    for _ in range(3):
        for pc, pg in zip(cpu, gpu):
            g = torch.randn(pc.shape)
            pc.grad, pg.grad = g, g.cuda()
        oc.step()
        og.step()
    # equal up to ulps, except where an ulp moved a code (then by a fraction of one lr step)
    diffs = torch.cat([(pc.detach() - pg.detach().cpu()).abs().view(-1) for pc, pg in zip(cpu, gpu)])
    assert diffs.max().item() <= 0.5 * 1e-2
    assert (diffs > 1e-5).float().mean().item() <= 1e-3
    assert all(og.state[pg]["step"].item() == 3 for pg in gpu)


def test_grad_scaler_inf_skips_on_cuda_and_checkpoint_moves_to_cpu():
    m = torch.nn.Linear(128, 64).cuda()
    opt = fusedopt.AdamW8bit(m.parameters())
    scaler = torch.amp.GradScaler("cuda")
    scaler.scale(m(torch.randn(4, 128, device="cuda")).sum()).backward()
    m.weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in m.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert all(s["step"].item() == 0 for s in opt.state.values())
    # a CUDA checkpoint loads into a CPU optimizer unchanged
    opt.zero_grad()
    m(torch.randn(4, 128, device="cuda")).sum().backward()
    opt.step()
    m_cpu = torch.nn.Linear(128, 64)
    m_cpu.load_state_dict({k: v.cpu() for k, v in m.state_dict().items()})
    o_cpu = fusedopt.AdamW8bit(m_cpu.parameters())
    o_cpu.load_state_dict(opt.state_dict())
    for p, q in zip(m.parameters(), m_cpu.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(o_cpu.state[q][k], v.cpu()) and o_cpu.state[q][k].device.type == "cpu"
