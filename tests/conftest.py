"Shared test settings."
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    "The tests use tiny models: one torch thread is faster than contending for the shared cores."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
