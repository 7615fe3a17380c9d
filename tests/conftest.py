import pytest
import torch

import fusedopt


def cuda_usable() -> bool:
    # Never touch CUDA at import time beyond this cheap query (collection must work without a GPU).
    return fusedopt.backends()["cuda_compiled"] and torch.cuda.is_available()


DEVICES = ["cpu"] + (["cuda"] if cuda_usable() else [])
requires_cuda = pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA device and a CUDA build of fusedopt")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
