"""fusedopt: fused optimizers for PyTorch (AdamW/Adam today), one native pass per param group.

    import fusedopt
    opt = fusedopt.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

The same update rules run on CUDA (multi-tensor-apply kernels) and on the CPU (OpenMP), from
one C++ header per rule. ``fusedopt.backends()`` says what this build and machine can run.
"""
from fusedopt._ext import backends
from fusedopt.optim import Adam, Adam8bit, AdamW, AdamW8bit, Lion, Lion8bit, Muon, MuonWithAdamW, ZeroShardedOptimizer, merge_local_state_dicts
from fusedopt.memory import memory_report, plan_memory

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "Adam8bit", "AdamW8bit", "Lion", "Lion8bit", "Muon", "MuonWithAdamW", "ZeroShardedOptimizer", "merge_local_state_dicts", "backends", "memory_report", "plan_memory", "__version__"]
