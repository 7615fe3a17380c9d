"""Small training problems shared by the optimizer tests: an MLP regression with a teacher, and a
tiny model with random batches. Deterministic: same seed, same init, same batches."""
import torch


def mlp(seed):
    torch.manual_seed(seed)
    # Linear(32, 128) and Linear(128, 64) weights are >= 4096 elements (8-bit states); the rest are smaller
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 1))


def train_mlp(cls, seed, steps=300, **kw):
    """(final full-batch loss, model, optimizer) after `steps` minibatch steps of cls(**kw)."""
    g = torch.Generator().manual_seed(seed)
    x, teacher = torch.randn(4096, 32, generator=g), torch.randn(32, 8, generator=g)
    y = torch.tanh(x @ teacher).sum(1, keepdim=True) + 0.3 * torch.randn(4096, 1, generator=g)
    model = mlp(100 + seed)
    opt = cls(model.parameters(), **kw)
    batches = torch.Generator().manual_seed(7)
    for _ in range(steps):
        idx = torch.randint(0, 4096, (256,), generator=batches)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item(), model, opt


def small_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.LayerNorm(96), torch.nn.Linear(96, 3))


def train_small(m, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 64, generator=g), torch.randn(32, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()


def check_grad_scaler_skip(make):
    """GradScaler on the CPU with make(params) -> optimizer, against an unscaled twin stepped only
    on the steps the scaler keeps: step 3 gets an inf grad and must leave params and state exactly
    as they were; the rest must agree bitwise (grads scaled by powers of two unscale exactly).
    Returns (model, optimizer) of the scaled run for further checks."""
    import copy

    torch.manual_seed(0)
    ma = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))
    mb = copy.deepcopy(ma)
    oa, ob = make(ma.parameters()), make(mb.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(32, 64), torch.randn(32, 1)
    for step in range(6):
        oa.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(ma(x), y)).backward()
        if step == 3:
            ma[0].weight.grad[0, 0] = float("inf")
            snap = [p.detach().clone() for p in ma.parameters()], copy.deepcopy(oa.state_dict())
        scaler.step(oa)
        scaler.update()
        if step == 3:
            assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), snap[0]))
            for k, st in oa.state_dict()["state"].items():
                assert all(torch.equal(v, snap[1]["state"][k][key]) for key, v in st.items())
            continue
        ob.zero_grad()
        torch.nn.functional.mse_loss(mb(x), y).backward()
        ob.step()
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))
    return ma, oa


def cpu_cuda_lockstep(make, shapes, dtype, steps=30):
    """Yields (cpu params, cuda params, cpu optimizer, cuda optimizer) after each of `steps`
    steps that both backends start from the same params and state (the CUDA side adopts the CPU
    side's before every step), with the same grads spread over 4 decades of scale."""
    cpu = [torch.randn(s).to(dtype).requires_grad_() for s in shapes]
    gpu = [p.detach().cuda().requires_grad_() for p in cpu]
    oc, og = make(cpu), make(gpu)
    for _ in range(steps):
        for pc, pg in zip(cpu, gpu):
            pg.data.copy_(pc.data)
            if pc in oc.state:
                for k, v in oc.state[pc].items():
                    og.state[pg][k].copy_(v)
            g = (torch.randn(pc.shape) * torch.logspace(-3, 1, pc.numel()).view(pc.shape)).to(dtype)
            pc.grad, pg.grad = g, g.cuda()
        oc.step()
        og.step()
        torch.cuda.synchronize()
        yield cpu, gpu, oc, og
