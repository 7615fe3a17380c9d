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



# Each group is timed on its own params; its first entry is the reference for "fusedopt speedup".
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
        # p,g,m,v all bf16: 2 * 7 = 14
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
    params = [torch.randn(s, device=device).to(impl.dtype) for s in shapes]
    refs = [p.float() for p in params]
    for p, r in zip(params, refs):
        p.grad = torch.randn_like(p)
        r.grad = p.grad.float()
    opt, ref_opt = impl.make(params), torch.optim.AdamW(refs, **HYPER, foreach=False)
    for _ in range(2):
        opt.step()
        ref_opt.step()
    try:
        for p, r in zip(params, refs):
            master = opt.state[p].get("master_param")
            torch.testing.assert_close(p.float() if master is None else master, r)
            if master is not None:
                torch.testing.assert_close(p, master.to(p.dtype), rtol=0, atol=0)
    except AssertionError as e:
        return str(e).splitlines()[0]
    return None
