"""fusedopt.ZeroShardedOptimizer on 2 and 3 CPU processes (gloo): bitwise the unsharded optimizer's
trajectory, 1/world of its state per rank, checkpoints that move between world sizes and into
torch.optim.AdamW.

Each case runs in worker processes that build the same model and data (the grads are then
identical on every rank, as after DDP's all-reduce), train a sharded and an unsharded optimizer
side by side, and save what the parent asserts on."""
import contextlib
import copy
import datetime
import multiprocessing as mp
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

import fusedopt

STEPS = 6


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    # 8-bit sized weights (>= 4096 elements) split across ranks, small biases/norms that are not
    m = torch.nn.Sequential(torch.nn.Linear(40, 130), torch.nn.LayerNorm(130), torch.nn.Tanh(), torch.nn.Linear(130, 70),
                            torch.nn.Linear(70, 3))
    return m.to(dtype)


def _groups(m):
    return [{"params": [p for p in m.parameters() if p.dim() == 2], "weight_decay": 0.1},
            {"params": [p for p in m.parameters() if p.dim() != 2], "weight_decay": 0.0, "lr": 3e-3}]


CASES = {
    "adamw": (fusedopt.AdamW, dict(lr=1e-2, betas=(0.9, 0.95)), torch.float32),
    "adamw_amsgrad": (fusedopt.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True), torch.float32),
    "adamw_bf16_master": (fusedopt.AdamW, dict(lr=1e-2, master_weights=True), torch.bfloat16),
    "adamw8bit": (fusedopt.AdamW8bit, dict(lr=1e-2), torch.float32),
    "lion": (fusedopt.Lion, dict(lr=1e-3), torch.float32),
    "lion8bit": (fusedopt.Lion8bit, dict(lr=1e-3), torch.float32),
}


def _train(m, opt, steps, seed, scaler=None, inf_at=None):
    g = torch.Generator().manual_seed(seed)
    dtype = next(m.parameters()).dtype
    for step in range(steps):
        x, y = torch.randn(16, 40, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x).float(), y.float())
        (scaler.scale(loss) if scaler else loss).backward()
        if step == inf_at:
            m[0].weight.grad[0, 0] = float("inf")
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


def _worker(rank, world, port, out_dir, jobs):
    # A bounded timeout: a rank whose job raised never reaches the barrier below, and its peers
    # must not wait there for gloo's default 30 minutes.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        results = {}
        for job in jobs:
            results[job] = globals()[f"_job_{job.split(':')[0]}"](rank, world, out_dir, *job.split(":")[1:])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank finishes before any tears gloo down: a rank that did so early once aborted a
        # peer still in its last collective ("terminate called without an active exception",
        # exit -6, after all ranks had saved their results; seen once in .ci/run).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _job_case(rank, world, out_dir, name):
    """Sharded vs unsharded from one init: params after every step, state, memory, hooks."""
    cls, kw, dtype = CASES[name]
    m_ref, m = _model(dtype), _model(dtype)
    ref = cls(_groups(m_ref), **kw)
    opt = fusedopt.ZeroShardedOptimizer(_groups(m), cls, **kw)
    hooks, global_hooks = [], []
    opt.register_step_post_hook(lambda *_: hooks.append(1))
    handle = register_optimizer_step_post_hook(lambda o, *_: global_hooks.append(type(o).__name__))
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    equal_each_step = True
    for step in range(STEPS):
        _train(m_ref, ref, 1, seed=step)
        _train(m, opt, 1, seed=step)
        sched_ref.step()
        sched.step()
        equal_each_step &= all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m.parameters()))
    handle.remove()
    opt.consolidate_state_dict(to=0)
    report = fusedopt.memory_report(opt)
    return dict(
        equal_each_step=equal_each_step, hooks=len(hooks), global_hooks=sorted(global_hooks),
        lr=[g["lr"] for g in opt.param_groups],
        inner_groups=len(opt.inner.param_groups),
        ref_lr=[g["lr"] for g in ref.param_groups],
        consolidated=opt.state_dict() if rank == 0 else None, reference=ref.state_dict(),
        measured=report.total.measured, consistent=report.consistent, sharding=report.sharding,
        ref_measured=fusedopt.memory_report(ref).total.measured, table=str(report),
    )


def _job_scaler(rank, world, out_dir):
    """GradScaler with an inf grad at step 3: that step is skipped on every rank, the rest as AdamW."""
    m_ref, m = _model(), _model()
    ref = fusedopt.AdamW(_groups(m_ref), lr=1e-2)
    opt = fusedopt.ZeroShardedOptimizer(_groups(m), fusedopt.AdamW, lr=1e-2)
    _train(m_ref, ref, STEPS, seed=1, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8), inf_at=3)
    _train(m, opt, STEPS, seed=1, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8), inf_at=3)
    return dict(equal=all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m.parameters())),
                steps=[s["step"].item() for s in opt.inner.state.values()])


def _job_save(rank, world, out_dir, name):
    """First half of a run: save this rank's local state dict and the model."""
    cls, kw, dtype = CASES[name]
    m = _model(dtype)
    opt = fusedopt.ZeroShardedOptimizer(_groups(m), cls, **kw)
    _train(m, opt, STEPS // 2, seed=5)
    torch.save(opt.local_state_dict(), os.path.join(out_dir, f"{name}_local{rank}.pt"))
    torch.save(m.state_dict(), os.path.join(out_dir, f"{name}_model.pt"))
    return None


def _job_resume(rank, world, out_dir, name, saved_world):
    """Second half at this world size from the other world size's local state dicts; compared with
    an unsharded run of both halves."""
    cls, kw, dtype = CASES[name]
    local = [torch.load(os.path.join(out_dir, f"{name}_local{r}.pt"), weights_only=True) for r in range(int(saved_world))]
    m = _model(dtype)
    m.load_state_dict(torch.load(os.path.join(out_dir, f"{name}_model.pt"), weights_only=True))
    opt = fusedopt.ZeroShardedOptimizer(_groups(m), cls, **kw)
    opt.load_state_dict(fusedopt.merge_local_state_dicts(local))
    _train(m, opt, STEPS - STEPS // 2, seed=6)
    m_ref = _model(dtype)
    ref = cls(_groups(m_ref), **kw)
    _train(m_ref, ref, STEPS // 2, seed=5)
    _train(m_ref, ref, STEPS - STEPS // 2, seed=6)
    return dict(equal=all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m.parameters())))


def _odd_params():
    """A channels_last conv weight (8-bit, blocks in memory order), an empty param and a bias in
    one fp32 group; bf16 params whose grads are fp32 (master weights) in another."""
    torch.manual_seed(1)
    conv = torch.randn(64, 16, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    empty = torch.zeros(0, 5, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    w = torch.randn(64, 70).to(torch.bfloat16).requires_grad_()
    v = torch.randn(5000).to(torch.bfloat16).requires_grad_()
    for t in (w, v):
        t.grad_dtype = torch.float32
    return [{"params": [conv, empty, bias]}, {"params": [w, v], "weight_decay": 0.0}]


def _odd_grads(groups, step):
    g = torch.Generator().manual_seed(100 + step)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=g).to(memory_format=torch.contiguous_format)
            if p.dim() == 4:
                p.grad = p.grad.to(memory_format=torch.channels_last)


def _job_odd(rank, world, out_dir):
    ref_groups, groups = _odd_params(), _odd_params()
    kw = dict(lr=1e-2, weight_decay=0.1, master_weights=True)
    ref, opt = fusedopt.AdamW8bit(ref_groups, **kw), fusedopt.ZeroShardedOptimizer(groups, fusedopt.AdamW8bit, **kw)
    for step in range(4):
        _odd_grads(ref_groups, step)
        _odd_grads(groups, step)
        ref.step()
        opt.step()
    opt.consolidate_state_dict()
    flat = lambda gs: [p for g in gs for p in g["params"]]  # noqa: E731
    return dict(equal=all(torch.equal(a, b) for a, b in zip(flat(ref_groups), flat(groups))),
                consolidated=opt.state_dict() if rank == 0 else None, reference=ref.state_dict())


def _job_load(rank, world, out_dir):
    """An unsharded torch.optim.AdamW checkpoint loads into the sharded optimizer (which then goes
    on as fusedopt.AdamW loading it does); one of the wrong shape is refused on every rank."""
    m0 = _model()
    torch_opt = torch.optim.AdamW(_groups(m0), lr=1e-2)
    _train(m0, torch_opt, 3, seed=2)
    sd = torch_opt.state_dict()
    m_ref, m = _model(), _model()
    m_ref.load_state_dict(m0.state_dict())
    m.load_state_dict(m0.state_dict())
    ref = fusedopt.AdamW(_groups(m_ref), lr=1.0)
    ref.load_state_dict(copy.deepcopy(sd))
    opt = fusedopt.ZeroShardedOptimizer(_groups(m), fusedopt.AdamW, lr=1.0)
    opt.load_state_dict(copy.deepcopy(sd))
    _train(m_ref, ref, 3, seed=3)
    _train(m, opt, 3, seed=3)
    try:
        p = next(m.parameters())
        fusedopt.ZeroShardedOptimizer([p, p], fusedopt.AdamW)
        duplicate = None
    except ValueError as e:
        duplicate = str(e)
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg"] = torch.zeros(7, 7)
    try:
        opt.load_state_dict(bad)
        refused = None
    except ValueError as e:
        refused = str(e)
    return dict(equal=all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m.parameters())),
                lr=opt.param_groups[0]["lr"], refused=refused, duplicate=duplicate)


def _job_bad(rank, world, out_dir):
    """Bad input in the last param of group 0 (owned by the last rank only): a sparse grad at
    step(), a checkpoint lacking its exp_avg_sq at load. Every rank raises the same error, nothing
    moves, and training goes on; plus the state_dict hooks."""
    m_ref, m = _model(), _model()
    ref = fusedopt.AdamW(_groups(m_ref), lr=1e-2)
    opt = fusedopt.ZeroShardedOptimizer(_groups(m), fusedopt.AdamW, lr=1e-2)
    _train(m_ref, ref, 2, seed=4)
    _train(m, opt, 2, seed=4)
    owners = [r for r, pieces in enumerate(opt._layouts[0]) if any(pc.param == 2 for pc in pieces)]
    before = [p.detach().clone() for p in m.parameters()]
    m.zero_grad()
    torch.nn.functional.mse_loss(m(torch.randn(4, 40)), torch.randn(4, 3)).backward()
    m[4].weight.grad = m[4].weight.grad.to_sparse()
    try:
        opt.step()
        step_error = None
    except RuntimeError as e:
        step_error = str(e)
    unmoved = all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    hooks = []
    opt.register_state_dict_pre_hook(lambda o: hooks.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: hooks.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: hooks.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: hooks.append("load_post"))
    opt.consolidate_state_dict(to=0)
    full = opt.state_dict() if rank == 0 else None
    full = [full]
    dist.broadcast_object_list(full, src=0)
    bad = copy.deepcopy(full[0])
    del bad["state"][2]["exp_avg_sq"]
    inner_before = copy.deepcopy(opt.inner.state_dict())
    try:
        opt.load_state_dict(bad)
        load_error = None
    except ValueError as e:
        load_error = str(e)
    inner_after = opt.inner.state_dict()
    state_kept = all(torch.equal(inner_after["state"][i][k], v) for i, st in inner_before["state"].items()
                     for k, v in st.items())
    opt.load_state_dict(full[0])
    _train(m_ref, ref, 2, seed=5)
    _train(m, opt, 2, seed=5)
    hooks_seen = list(hooks)
    leak_free = True
    if rank == 0:  # a post hook edits the dict it is given; the next state_dict() is not affected
        handle = opt.register_state_dict_post_hook(lambda o, sd: (sd["param_groups"][0].update(lr=123.0),
                                                                   sd["state"].clear()))
        opt.state_dict()
        handle.remove()
        again = opt.state_dict()
        leak_free = again["param_groups"][0]["lr"] != 123.0 and len(again["state"]) > 0
    return dict(owners=owners, step_error=step_error, unmoved=unmoved, load_error=load_error, state_kept=state_kept,
                hooks=hooks_seen, leak_free=leak_free, equal=all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m.parameters())))


def _job_moved(rank, world, out_dir):
    """Params over shared memory, refused on whole params (a rank's pieces alone would decide
    differently per rank, and the one that accepted would wait in all_gather); and a param moved
    after sharding (its pieces would go on updating the old memory): every rank raises alike."""
    base = torch.randn(300, 1024)
    a, b = torch.nn.Parameter(base), torch.nn.Parameter(base[200:300])
    try:
        fusedopt.ZeroShardedOptimizer([a, b], fusedopt.AdamW, lr=1e-2)
        overlap_error = None
    except ValueError as e:
        overlap_error = str(e)
    m = _model()
    opt = fusedopt.ZeroShardedOptimizer(_groups(m), fusedopt.AdamW, lr=1e-2)
    _train(m, opt, 1, seed=6)
    m[0].weight.data = m[0].weight.data.clone()  # what model.to(...) does to each param
    try:
        _train(m, opt, 1, seed=7)
        moved_error = None
    except RuntimeError as e:
        moved_error = str(e)
    return dict(overlap_error=overlap_error, moved_error=moved_error)


def _job_subgroups(rank, world, out_dir):
    """Two independent ZeRO groups of 2 ranks each inside a world of 4."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pg = groups[rank // 2]
    m_ref, m = _model(), _model()
    ref = fusedopt.AdamW(_groups(m_ref), lr=1e-2)
    opt = fusedopt.ZeroShardedOptimizer(_groups(m), fusedopt.AdamW, lr=1e-2, process_group=pg)
    _train(m_ref, ref, 3, seed=rank // 2)
    _train(m, opt, 3, seed=rank // 2)
    opt.consolidate_state_dict(to=1)
    full = opt.state_dict() if rank % 2 == 1 else None
    same_state = full is None or all(torch.equal(full["state"][i][k], v) for i, st in ref.state_dict()["state"].items()
                                     for k, v in st.items())
    return dict(equal=all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m.parameters())),
                world=opt.world_size, rank=opt.rank, same_state=same_state, has_full=full is not None)


def _free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world, jobs, out_dir):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(out_dir), jobs)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), f"worker exit codes {[p.exitcode for p in procs]}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def runs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"zero{request.param}")
    jobs = [f"case:{name}" for name in CASES] + ["scaler", "odd", "load", "bad", "moved"]
    return request.param, _run(request.param, jobs, out)


@pytest.mark.parametrize("name", CASES)
def test_trajectory_is_bitwise_the_unsharded_one(runs, name):
    world, results = runs
    for r in results:
        res = r[f"case:{name}"]
        assert res["equal_each_step"]
        assert res["hooks"] == STEPS  # the step post-hook fires once per step
        # global hooks too: once for the reference, once for the sharded one (not for its inner optimizer)
        assert res["global_hooks"] == sorted([CASES[name][0].__name__, "ZeroShardedOptimizer"] * STEPS)
        assert res["lr"] == res["ref_lr"]  # StepLR drives the sharded optimizer as the unsharded one
        assert res["inner_groups"] == 2


@pytest.mark.parametrize("name", CASES)
def test_each_rank_holds_its_share_of_the_state(runs, name):
    world, results = runs
    ref = results[0][f"case:{name}"]["ref_measured"]
    per_rank = [r[f"case:{name}"]["measured"] for r in results]
    # moments, 8-bit block scales and master weights add up to the unsharded optimizer's exactly
    # (pieces are block-aligned); step counters are one per piece, so there are a few more
    for kind in ("moments", "absmax", "master"):
        assert sum(getattr(m, kind) for m in per_rank) == getattr(ref, kind)
    # an even split up to one block per group (two groups) of the widest moments (amsgrad: 3 x fp32)
    assert max(m.moments for m in per_rank) <= ref.moments / world + 2 * 256 * 12
    for r in results:
        res = r[f"case:{name}"]
        assert res["consistent"] is True  # measured == declared formula, 8-bit decided per whole param
        assert res["sharding"].factor == res["sharding"].world_size == world
        assert "factor=" + str(world) in res["table"]


@pytest.mark.parametrize("name", CASES)
def test_consolidated_state_dict_is_the_unsharded_one(runs, name):
    world, results = runs
    full, ref = results[0][f"case:{name}"]["consolidated"], results[0][f"case:{name}"]["reference"]
    assert results[1][f"case:{name}"]["consolidated"] is None  # only rank `to` holds it
    assert full["state"].keys() == ref["state"].keys()
    for i, st in ref["state"].items():
        assert st.keys() == full["state"][i].keys()
        for k, v in st.items():
            assert torch.equal(full["state"][i][k], v), (i, k)
    assert [g["params"] for g in full["param_groups"]] == [g["params"] for g in ref["param_groups"]]


def test_grad_scaler_skip_is_the_same_on_every_rank(runs):
    world, results = runs
    for r in results:
        assert r["scaler"]["equal"]
        assert set(r["scaler"]["steps"]) == {STEPS - 1.0}  # the inf step did not count


def test_consolidated_adamw_checkpoint_loads_into_torch_adamw(runs):
    """torch.optim.AdamW takes the consolidated checkpoint as its own: the state it holds after
    loading is the unsharded fusedopt.AdamW's, bit for bit, and it steps on from there."""
    _, results = runs
    full, ref = results[0]["case:adamw"]["consolidated"], results[0]["case:adamw"]["reference"]
    m = _model()
    opt = torch.optim.AdamW(_groups(m), lr=1e-2, betas=(0.9, 0.95))
    opt.load_state_dict(copy.deepcopy(full))
    loaded = opt.state_dict()["state"]
    assert all(torch.equal(loaded[i][k], v) for i, st in ref["state"].items() for k, v in st.items())
    _train(m, opt, 1, seed=0)


def test_channels_last_empty_and_fp32_grads_of_bf16_params(runs):
    world, results = runs
    for r in results:
        assert r["odd"]["equal"]
    full, ref = results[0]["odd"]["consolidated"], results[0]["odd"]["reference"]
    assert full["state"].keys() == ref["state"].keys()  # the empty param has its state too
    for i, st in ref["state"].items():
        for k, v in st.items():
            assert torch.equal(full["state"][i][k], v) and full["state"][i][k].stride() == v.stride(), (i, k)


def test_unsharded_checkpoint_loads_and_a_wrong_one_is_refused_everywhere(runs):
    _, results = runs
    for r in results:
        assert r["load"]["equal"] and r["load"]["lr"] == 1e-2
        assert r["load"]["refused"] is not None and "shape (7, 7)" in r["load"]["refused"]
        assert r["load"]["duplicate"] is not None and "twice" in r["load"]["duplicate"]


def test_bad_input_on_one_rank_raises_on_every_rank(runs):
    world, results = runs
    assert results[0]["bad"]["owners"] == [world - 1]  # the case this test is about
    for r in results:
        res = r["bad"]
        assert res["step_error"] is not None and "param 2 of group 0 (shape (3, 70)" in res["step_error"]
        assert "sparse" in res["step_error"] and res["unmoved"]
        assert res["load_error"] is not None and "param 2 of group 0 (shape (3, 70))" in res["load_error"]
        assert "exp_avg_sq" in res["load_error"] and res["state_kept"]
        assert res["equal"] and res["leak_free"]  # and training goes on, as the unsharded optimizer's
    # torch.optim's state_dict hooks (consolidate + state_dict on rank 0; two loads on every rank)
    assert results[0]["bad"]["hooks"] == ["sd_pre", "sd_post", "load_pre", "load_pre", "load_post"]
    assert all(r["bad"]["hooks"] == ["load_pre", "load_pre", "load_post"] for r in results[1:])


def test_shared_memory_and_moved_params_raise_on_every_rank(runs):
    for r in runs[1]:
        assert "params 0 and 1 of group 0 share memory" in r["moved"]["overlap_error"]
        assert "ZeroShardedOptimizer(AdamW)" in r["moved"]["overlap_error"]
        assert "param 0 of group 0 no longer lives in the memory it was sharded from" in r["moved"]["moved_error"]


def test_process_subgroups(tmp_path):
    results = _run(4, ["subgroups"], tmp_path)
    for rank, r in enumerate(results):
        res = r["subgroups"]
        assert res["equal"] and res["world"] == 2 and res["rank"] == rank % 2
        assert res["has_full"] == (rank % 2 == 1) and res["same_state"]


@pytest.mark.parametrize("name", ["adamw8bit", "lion"])
def test_checkpoint_written_at_one_world_size_resumes_at_another(tmp_path, name):
    _run(3, [f"save:{name}"], tmp_path)
    results = _run(2, [f"resume:{name}:3"], tmp_path)
    assert all(r[f"resume:{name}:3"]["equal"] for r in results)


def test_needs_torch_distributed_and_an_elementwise_optimizer():
    p = [torch.randn(10, requires_grad=True)]
    with pytest.raises(TypeError, match="elementwise"):
        fusedopt.ZeroShardedOptimizer(p, fusedopt.Muon)
    assert not dist.is_initialized()  # pytest's process never joins a group
    with pytest.raises(RuntimeError, match="init_process_group"):
        fusedopt.ZeroShardedOptimizer(p, fusedopt.AdamW)
