from fusedopt.optim.adam import Adam, AdamW
from fusedopt.optim.adam8bit import Adam8bit, AdamW8bit
from fusedopt.optim.lion import Lion, Lion8bit
from fusedopt.optim.muon import Muon, MuonWithAdamW
from fusedopt.optim.zero import ZeroShardedOptimizer, merge_local_state_dicts

__all__ = ["Adam", "AdamW", "Adam8bit", "AdamW8bit", "Lion", "Lion8bit", "Muon", "MuonWithAdamW", "ZeroShardedOptimizer", "merge_local_state_dicts"]
