"""AdamW step time: fusedopt.AdamW vs torch.optim.AdamW (for-loop, foreach, fused).

A suite of `python -m fusedopt bench` (see fusedopt/benchmarks/harness.py); bench/README.md has
the bytes model behind each row's B/param.
"""
from __future__ import annotations

import torch

import fusedopt
from fusedopt.benchmarks.harness import SIZES as DEFAULT_SIZES
from fusedopt.benchmarks.harness import Impl, Missing, peer

NAME = "adamw"
SIZES = DEFAULT_SIZES  # this suite runs the default sizes
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
_DeepSpeedCPUAdam = peer("deepspeed.ops.adam", "DeepSpeedCPUAdam", "deepspeed")


def deepspeed_cpu_adam(params):
    """DeepSpeed's AVX CPU Adam (JIT-built on first use), in AdamW mode; CPU params only."""
    if params[0].device.type != "cpu":
        raise Missing("missing (DeepSpeedCPUAdam runs on CPU params only)")
    return _DeepSpeedCPUAdam(params, **HYPER, adamw_mode=True)



# Each group is timed on its own params; a peer's "fusedopt speedup" is against the nearest fusedopt
# entry above it.
GROUPS = [
    [
        Impl("fusedopt", torch.float32, "fp32 p,g,m,v", 28, lambda ps: fusedopt.AdamW(ps, **HYPER), True),
        Impl("torch for-loop", torch.float32, "fp32 p,g,m,v", 28, lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=False)),
        Impl("torch foreach", torch.float32, "fp32 p,g,m,v", 28, lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=True)),
        Impl("torch fused", torch.float32, "fp32 p,g,m,v", 28, lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True)),
        Impl("deepspeed CPUAdam", torch.float32, "fp32 p,g,m,v", 28, deepspeed_cpu_adam),
    ],
    [
        # g2 + master 4 (r+w) + m 4 (r+w) + v 4 (r+w) + p2 written = 28
        Impl("fusedopt master_weights", torch.bfloat16, "bf16 p,g + fp32 master,m,v", 28,
             lambda ps: fusedopt.AdamW(ps, **HYPER, master_weights=True), True),
        # p,g,m,v all bf16: 2 * 7 = 14; torch's bf16 layout, so the row below compares like with like
        Impl("fusedopt bf16 states", torch.bfloat16, "bf16 p,g,m,v", 14,
             lambda ps: fusedopt.AdamW(ps, **HYPER, state_dtype=torch.bfloat16), True),
        Impl("torch fused bf16", torch.bfloat16, "bf16 p,g,m,v", 14, lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True)),
    ],
]
IMPLS = {impl.name: impl for group in GROUPS for impl in group}


# --- validation: a broken kernel is reported, never timed -----------------------------------------
def check(impl_name: str, device: str) -> str | None:
    """Two steps of `impl` vs torch.optim.AdamW(foreach=False) in fp32 from the same values; None if ok.
    Sizes cross the CPU backend's chunk and OpenMP thresholds."""
    impl = IMPLS[impl_name]
    torch.manual_seed(0)
    shapes = [(3, 70001), (1000,), (7,)]
    # At |p| ~ 0.01 bf16's spacing (~6e-5) is well below the steps (~lr): a wrong p shows in bf16 too
    params = [(0.01 * torch.randn(s, device=device)).to(impl.dtype) for s in shapes]
    refs = [p.detach().float().clone() for p in params]  # float() alone returns fp32 params themselves
    opt, ref_opt = impl.make(params), torch.optim.AdamW(refs, **HYPER, foreach=False)
    for _ in range(2):  # a new gradient each step: under a constant one m-hat is g whatever beta1 is
        for p, r in zip(params, refs):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.float()
        opt.step()
        ref_opt.step()
    try:
        for p, r in zip(params, refs):
            state, ref_state = opt.state[p], ref_opt.state[r]
            master = state.get("master_param")
            if state["exp_avg"].dtype == torch.bfloat16:
                # Rounded to bf16 after each step (2^-9 relative) where the reference stays fp32. p and v
                # (no cancellation: a sum of positives) keep that relative bound, within bf16's default
                # rtol (1.6e-2); m at step 2 is 0.9 m1 + 0.1 g2 and can cancel, leaving step 1's
                # rounding 0.9 * |m1| * 2^-9 <= 0.9 * 0.1 * max|g| * 2^-9 < 1e-3 as an absolute error.
                torch.testing.assert_close(p, r.to(p.dtype))
                torch.testing.assert_close(state["exp_avg"].float(), ref_state["exp_avg"], rtol=1.6e-2, atol=1e-3)
                torch.testing.assert_close(state["exp_avg_sq"].float(), ref_state["exp_avg_sq"], rtol=1.6e-2,
                                           atol=1e-5)
                continue
            torch.testing.assert_close(p.float() if master is None else master, r)
            for key in ("exp_avg", "exp_avg_sq"):  # bias correction hides a wrong beta from p for a while
                torch.testing.assert_close(state[key], ref_state[key])
            if master is not None:
                torch.testing.assert_close(p, master.to(p.dtype), rtol=0, atol=0)
    except AssertionError as e:
        return str(e).splitlines()[0]
    return None
