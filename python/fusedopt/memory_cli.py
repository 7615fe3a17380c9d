"""`python -m fusedopt memory`: per-rank memory of a model that is not allocated, under ZeRO 0..3.

    python -m fusedopt memory --params 7.5e9 --optimizer adamw --precision bf16-mixed --world-size 64 --stage 1

prints the chosen optimizer's weights, grads, master weights and optimizer states per rank for
every stage, then every fusedopt optimizer side by side (bytes/param and total GB per stage).
"""
from __future__ import annotations

import argparse

from fusedopt.memory import COMPONENTS, PLAN_OPTIMIZERS, PRECISIONS, SHARDED, MemoryPlan, plan_memory, render_table

NOTES = """\
Not included: activations, temporary buffers, per-tensor step counters, allocator fragmentation.
8-bit rows assume every tensor has >= 4096 elements (smaller ones keep 8 B/param of fp32 state).
muon: momentum of the matrix params only; embeddings, head, norms and biases run AdamW (plan them as adamw).
Stages are ZeRO as DeepSpeed/FSDP shard; fusedopt.ZeroShardedOptimizer is stage 1."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=float, required=True, help="parameter count, e.g. 7.5e9")
    p.add_argument("--optimizer", choices=PLAN_OPTIMIZERS, default="adamw")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed",
                   help="fp32; bf16-mixed / fp16-mixed (16-bit params and grads, fp32 master); bf16 (no master)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks")
    p.add_argument("--stage", type=int, choices=sorted(SHARDED), default=0,
                   help="ZeRO stage: 1 shards master weights and optimizer states, 2 also grads, 3 also weights")


def comparison_table(plans: list[MemoryPlan]) -> str:
    stage = plans[0].stage
    header = ["optimizer", *(f"{c} B/p" for c in COMPONENTS), "total B/p",
              *(f"stage {s}{' *' if s == stage else ''} GB" for s in SHARDED)]
    rows = [[p.optimizer, *(f"{b:.4g}" for b in p.bytes_per_param.values()), f"{sum(p.bytes_per_param.values()):.4g}",
             *(f"{p.total_gb(s):.2f}" for s in SHARDED)] for p in plans]
    return render_table(header, rows)


def run(args: argparse.Namespace) -> MemoryPlan:
    try:
        plans = {name: plan_memory(args.params, name, args.precision, args.world_size, args.stage)
                 for name in PLAN_OPTIMIZERS}
    except ValueError as e:
        raise SystemExit(f"python -m fusedopt memory: {e}") from None
    chosen = plans[args.optimizer]
    print(chosen.table())
    print(f"\nevery optimizer, {args.precision}, {args.world_size} ranks (GB per rank; * = --stage):")
    print(comparison_table(list(plans.values())))
    print("\n" + NOTES)
    return chosen
