from fusedopt.optim.adam import Adam, AdamW
from fusedopt.optim.adam8bit import Adam8bit, AdamW8bit
from fusedopt.optim.lion import Lion
from fusedopt.optim.muon import Muon, MuonWithAdamW

__all__ = ["Adam", "AdamW", "Adam8bit", "AdamW8bit", "Lion", "Muon", "MuonWithAdamW"]
