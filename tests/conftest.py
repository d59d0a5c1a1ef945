"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded and restore the count after: tiny convs on a shared CPU
    mostly wait on the other processes with a second intra-op thread (10x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
