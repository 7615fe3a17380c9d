"""Lion8bit on CUDA: agreement with the CPU backend. Skipped where no GPU or no CUDA build is
present. (The machinery it shares with AdamW8bit, cuda/blockwise8bit.cuh, is covered by
tests/test_adam8bit_cuda.py: graph capture for both, streams, launch splitting, misaligned views.)"""
import pytest
import torch

import fusedopt
from conftest import requires_cuda
from problems import cpu_cuda_lockstep

pytestmark = [pytest.mark.cuda, requires_cuda]

SHAPES = [(1,), (255,), (257,), (4097,), (300, 7), (70001,)]


def _opt(params, **kw):
    return fusedopt.Lion8bit(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, min_8bit_size=0, **kw)


@pytest.mark.parametrize("dtype, kw", [(torch.float32, {}), (torch.bfloat16, dict(master_weights=True))])
def test_each_step_agrees_with_the_cpu_backend(dtype, kw):
    """Both backends start every step from the same params and state and share math/lion8bit.h and
    math/quant8.h. nvcc may contract b1*m + (1-b1)*g into an FMA where g++ rounds twice: then
    sign(c) can differ where c is within an ulp of 0 (a param off by 2 lr) and a code can move by
    one; both rare."""
    flips = sign_flips = total = 0
    for cpu, gpu, oc, og in cpu_cuda_lockstep(lambda ps: _opt(ps, **kw), SHAPES, dtype):
        for pc, pg in zip(cpu, gpu):
            sc, sg = oc.state[pc], {k: v.cpu() for k, v in og.state[pg].items()}
            a, b = (sg["master_param"], sc["master_param"]) if dtype != torch.float32 else (pg.detach().cpu(), pc.detach())
            # one step from the same values: equal to fp32 rounding (FMA contraction, ~1 ulp of |p|),
            # or 2 lr apart where sign(c) flipped; a wrong decay (lr * wd * |p| = 1e-3 |p|) is neither
            sign_flips += int(((a - b).abs() > 1e-6 * (1 + b.abs())).sum())
            torch.testing.assert_close(sg["exp_avg_absmax"], sc["exp_avg_absmax"], rtol=1e-6, atol=0)
            diff = (sg["exp_avg"].long() - sc["exp_avg"].long()).abs()
            assert diff.max().item() <= 1
            flips += int((diff != 0).sum())
            total += diff.numel()
    assert flips <= 1e-3 * total and sign_flips <= 1e-3 * total
