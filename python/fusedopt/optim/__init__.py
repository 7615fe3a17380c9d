from fusedopt.optim.adam import Adam, AdamW
from fusedopt.optim.lion import Lion

__all__ = ["Adam", "AdamW", "Lion"]
