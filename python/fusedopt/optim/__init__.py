from fusedopt.optim.adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]
