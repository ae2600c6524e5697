"""Shared fixtures of the model tests (this file holds no tests)."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run fastest on one thread; on a shared 2-core box two OpenMP threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
