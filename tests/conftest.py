"Shared test settings."
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _test_threads():
    """The tests use tiny models: one torch thread is fastest, so that is the default. `GETAM_TEST_THREADS=N` runs the
    suite at N threads instead: CI runs it at 1 and at the machine's core count, so that an outcome that holds at one
    thread count only (float sums in another order) fails there before it fails for a user."""
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("GETAM_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(n)
