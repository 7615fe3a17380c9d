"""Memory accountant: measured state equals the declared layout for every optimizer configuration
that exists (and equals bytes counted by hand here), the plan reproduces the ZeRO paper, and the
CLI prints it. Optimizers still being written are skipped until they land."""
import contextlib
import io
import itertools
import math

import pytest
import torch

import fusedopt
from conftest import requires_cuda
from fusedopt.__main__ import main
from fusedopt.memory import LAYOUTS, PLAN_OPTIMIZERS

# A param above the 8-bit threshold (4096 elements), one below it, and a matrix above it.
SHAPES = [(5000,), (3, 7), (64, 80)]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ZERO_PAPER_GB = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}  # 7.5B params, 64 ranks, K = 12


def requires(name):
    return pytest.mark.skipif(not hasattr(fusedopt, name), reason=f"fusedopt.{name} has not landed yet")


def stepped(make, dtype=torch.float32, shapes=SHAPES):
    """An optimizer over fresh params of `shapes` (split into two groups), after one step."""
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    opt = make([{"params": params[:2]}, {"params": params[2:]}])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt, params


def check(opt, params, expected_total):
    """measured == declared in every group and kind, and the total is what we counted by hand."""
    report = fusedopt.memory_report(opt)
    assert report.consistent is True, f"\n{report}"
    for g in [*report.groups, report.total]:
        assert g.measured == g.declared
    assert report.total.measured.total == expected_total, f"\n{report}"
    assert report.total.num_params == sum(p.numel() for p in params)
    assert report.total.tensors_with_state == len(params)
    return report


def master_bytes(params, master):
    return sum(4 * p.numel() for p in params if master and p.dtype != torch.float32)


# --- measured == declared ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, dtype, state_dtype, amsgrad, master",
    itertools.product(["Adam", "AdamW"], PARAM_DTYPES, [torch.float32, torch.bfloat16], [False, True], [False, True]),
)
def test_adam(name, dtype, state_dtype, amsgrad, master):
    opt, params = stepped(
        lambda groups: getattr(fusedopt, name)(
            groups, amsgrad=amsgrad, master_weights=master, state_dtype=state_dtype
        ),
        dtype,
    )
    moments = (2 + amsgrad) * state_dtype.itemsize * sum(p.numel() for p in params)
    check(opt, params, moments + master_bytes(params, master) + 4 * len(params))


@pytest.mark.parametrize(
    "name, dtype, master", itertools.product(["Adam8bit", "AdamW8bit"], PARAM_DTYPES, [False, True])
)
def test_adam8bit(name, dtype, master):
    if not hasattr(fusedopt, name):
        pytest.skip(f"fusedopt.{name} has not landed yet")
    opt, params = stepped(lambda groups: getattr(fusedopt, name)(groups, master_weights=master), dtype)
    # >= 4096 elements: two uint8 moments + two fp32 absmax per 256-block; smaller: two fp32 moments
    moments = sum(2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in (p.numel() for p in params))
    report = check(opt, params, moments + master_bytes(params, master) + 4 * len(params))
    assert report.total.measured.absmax == 8 * (math.ceil(5000 / 256) + math.ceil(5120 / 256))


@requires("Lion")
@pytest.mark.parametrize(
    "dtype, state_dtype, master", itertools.product(PARAM_DTYPES, [torch.float32, torch.bfloat16], [False, True])
)
def test_lion(dtype, state_dtype, master):
    opt, params = stepped(lambda groups: fusedopt.Lion(groups, master_weights=master, state_dtype=state_dtype), dtype)
    moments = state_dtype.itemsize * sum(p.numel() for p in params)
    check(opt, params, moments + master_bytes(params, master))  # Lion keeps no step counter


@requires("Lion8bit")
@pytest.mark.parametrize("dtype", PARAM_DTYPES)
def test_lion8bit(dtype):
    assert fusedopt.Lion8bit in LAYOUTS, "add fusedopt.Lion8bit's StateLayout to fusedopt.memory.LAYOUTS"
    opt, params = stepped(fusedopt.Lion8bit, dtype)
    moments = sum(n + 4 * math.ceil(n / 256) if n >= 4096 else 4 * n for n in (p.numel() for p in params))
    check(opt, params, moments)


@requires("Muon")
def test_muon():
    assert fusedopt.Muon in LAYOUTS, "add fusedopt.Muon's StateLayout to fusedopt.memory.LAYOUTS"
    opt, params = stepped(fusedopt.Muon, shapes=[(64, 80), (32, 32)])
    report = fusedopt.memory_report(opt)
    assert report.consistent is True, f"\n{report}"
    assert report.total.measured.moments == 4 * sum(p.numel() for p in params)  # fp32 momentum_buffer


@pytest.mark.parametrize("name, dtype, amsgrad", itertools.product(["Adam", "AdamW"], PARAM_DTYPES, [False, True]))
def test_torch_optim(name, dtype, amsgrad):
    opt, params = stepped(lambda groups: getattr(torch.optim, name)(groups, amsgrad=amsgrad), dtype)
    moments = (2 + amsgrad) * dtype.itemsize * sum(p.numel() for p in params)  # torch keeps moments in the param dtype
    report = check(opt, params, moments + 4 * len(params))
    assert report.optimizer == f"torch.optim.{name}"


# --- measurement details -----------------------------------------------------------------------
def test_fp32_adamw_is_8_bytes_per_param():
    n = 1 << 20
    opt, _ = stepped(fusedopt.AdamW, shapes=[(n,)])
    report = fusedopt.memory_report(opt)
    assert report.optimizer == "fusedopt.AdamW"
    assert report.total.bytes_per_param == pytest.approx(8.0, abs=4 / n)  # + one 4-byte step tensor


def test_unknown_optimizer_is_measured_without_a_formula():
    opt, params = stepped(lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9))
    report = fusedopt.memory_report(opt)
    assert report.total.declared is None and report.consistent is None
    assert report.total.measured.moments == 4 * sum(p.numel() for p in params)  # momentum_buffer
    assert "no formula" in report.table()


def test_shared_storage_counted_once_and_flagged():
    opt, params = stepped(fusedopt.AdamW, shapes=[(5000,)])
    (p,) = params
    state = opt.state[p]
    # A state entry viewing another's storage, and one aliasing the param, allocate nothing.
    state["exp_avg_sq"] = state["exp_avg"].view(50, 100)
    state["scratch"] = p.detach().view(-1)
    report = fusedopt.memory_report(opt)
    assert report.total.measured.moments == 4 * 5000
    assert report.total.measured.other == 0
    assert report.total.declared.moments == 8 * 5000
    assert report.consistent is False and "NO" in report.table()


def test_state_kinds_by_key_name():
    from fusedopt.memory import state_kind

    assert [state_kind(k) for k in ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"]] == ["moments"] * 4
    assert [state_kind(k) for k in ["exp_avg_absmax", "exp_avg_sq_absmax"]] == ["absmax"] * 2
    assert [state_kind(k) for k in ["master_param", "step", "sum"]] == ["master", "step", "other"]


def test_state_not_allocated_before_the_first_step():
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    report = fusedopt.memory_report(fusedopt.AdamW(params))
    assert report.total.measured.total == 0 and report.total.declared.total == 0
    assert report.total.tensors_with_state == 0 and report.consistent is True


def test_table_and_sharding():
    opt, _ = stepped(fusedopt.AdamW)
    report = fusedopt.memory_report(opt)
    lines = str(report).splitlines()
    assert lines[0].startswith("fusedopt.AdamW")
    assert [line.split()[0] for line in lines[2:5]] == ["0", "1", "total"]
    assert all(line.split()[-1] == "yes" for line in lines[2:5])
    assert len({len(line) for line in lines[1:5]}) == 1  # aligned columns
    assert (report.sharding.world_size, report.sharding.rank, report.sharding.factor) == (1, 0, 1)
    assert "sharding: world_size=1 rank=0 factor=1" in str(report)  # sharded: tests/test_zero.py


def test_step_peak_is_skipped_on_cpu():
    opt, params = stepped(fusedopt.AdamW)
    before = [p.detach().clone() for p in params]
    report = fusedopt.memory_report(opt, measure_step_peak=True)
    assert report.step_peak is None
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # no step was run


@pytest.mark.cuda
@requires_cuda
def test_step_peak_on_cuda():
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fusedopt.AdamW(params)
    report = fusedopt.memory_report(opt, measure_step_peak=True)  # the first step allocates the state
    peak = report.step_peak
    assert peak is not None and peak.peak >= peak.allocated_after >= peak.allocated_before
    assert peak.allocated_after - peak.allocated_before >= report.total.measured.total - 4 * len(params)
    assert report.consistent is True


# --- planning ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, gb", ZERO_PAPER_GB.items())
def test_zero_paper_example(stage, gb):
    plan = fusedopt.plan_memory(params=7.5e9, optimizer="adamw", precision="bf16-mixed", world_size=64, stage=stage)
    assert plan.bytes_per_param == {"weights": 2, "grads": 2, "master": 4, "states": 8} and plan.k == 12
    assert plan.total_gb() == pytest.approx(gb, abs=0.05)
    # The paper's formulas, exactly: 2Ψ+2Ψ+KΨ, 2Ψ+2Ψ+KΨ/Nd, 2Ψ+(2+K)Ψ/Nd, (2+2+K)Ψ/Nd
    psi, k, nd = 7.5e9, 12, 64
    exact = {0: (4 + k) * psi, 1: (4 + k / nd) * psi, 2: (2 + (2 + k) / nd) * psi, 3: (4 + k) * psi / nd}[stage]
    assert plan.total_gb() * 1e9 == pytest.approx(exact, rel=1e-12)


def test_fp32_plan():
    plan = fusedopt.plan_memory(7.5e9, "adamw", "fp32", world_size=64, stage=0)
    assert plan.bytes_per_param == {"weights": 4, "grads": 4, "master": 0, "states": 8} and plan.k == 8
    assert plan.total_gb() == pytest.approx(120.0)


def test_every_plan_row():
    states = {name: fusedopt.plan_memory(1e9, name).bytes_per_param["states"] for name in PLAN_OPTIMIZERS}
    assert states == pytest.approx({
        "adamw": 8, "adamw-bf16-states": 4, "adamw8bit": 2 + 8 / 256,
        "lion": 4, "lion-bf16": 2, "lion8bit": 1 + 4 / 256, "muon": 4,
    })


# Plan rows whose optimizer exists: the plan's state bytes are what that optimizer allocates.
PLAN_TO_OPTIMIZER = {
    "adamw": ("AdamW", {}),
    "adamw-bf16-states": ("AdamW", {"state_dtype": torch.bfloat16}),
    "adamw8bit": ("AdamW8bit", {}),
    "lion": ("Lion", {}),
    "lion-bf16": ("Lion", {"state_dtype": torch.bfloat16}),
    "lion8bit": ("Lion8bit", {}),
    "muon": ("Muon", {}),
}


@pytest.mark.parametrize("row", PLAN_OPTIMIZERS)
def test_plan_matches_allocated_state(row):
    name, kw = PLAN_TO_OPTIMIZER[row]
    if not hasattr(fusedopt, name):
        pytest.skip(f"fusedopt.{name} has not landed yet")
    n = 256 * 256  # whole 8-bit blocks, as a huge model has
    opt, _ = stepped(lambda groups: getattr(fusedopt, name)(groups, **kw), shapes=[(256, 256)])
    measured = fusedopt.memory_report(opt).total.measured
    plan = fusedopt.plan_memory(n, row, "fp32")
    assert (measured.moments + measured.absmax) / n == plan.bytes_per_param["states"]


def test_plan_rejects_bad_arguments():
    for kwargs in [dict(optimizer="sgd"), dict(precision="int4"), dict(stage=4), dict(world_size=0), dict(params=0)]:
        with pytest.raises(ValueError):
            fusedopt.plan_memory(**{"params": 1e9, **kwargs})


# --- CLI ---------------------------------------------------------------------------------------
def run_cli(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        plan = main(["memory", *args])
    return plan, out.getvalue()


def stage_totals(out):
    """{stage: total GB} from the first table's rows ('0  -  ...  120.00', '1 *  ...')."""
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit() and line[1:2] == " "]
    return {int(r[0]): float(r[-1]) for r in rows}


def test_cli_zero_paper_example():
    plan, out = run_cli("--params", "7.5e9", "--optimizer", "adamw", "--precision", "bf16-mixed",
                        "--world-size", "64", "--stage", "1")
    assert plan.stage == 1 and plan.total_gb() == pytest.approx(31.4, abs=0.05)
    assert stage_totals(out) == pytest.approx(ZERO_PAPER_GB, abs=0.05)
    assert "K = 12" in out and "1 *" in out
    assert all(name in out for name in PLAN_OPTIMIZERS)  # the comparison over every optimizer
    assert "AdamW" in out  # the muon note


def test_cli_fp32():
    _, out = run_cli("--params", "7.5e9", "--precision", "fp32", "--world-size", "64")
    assert "K = 8" in out and stage_totals(out)[0] == pytest.approx(120.0)


def test_cli_bad_arguments_exit():
    with pytest.raises(SystemExit):
        run_cli("--params", "-1")
