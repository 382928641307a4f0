"""Reliability suites: each test runs one scenario of ``workloads.reliability`` (the same code as
``kvfuse bench reliability``) and requires a clean tally: no errors, no wrong answers, no lost writes, no
violated bound. Real model (session ``smollm2``), real files, real ``redis-server``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from workloads.reliability.tally import Tally


@pytest.fixture(scope="package", autouse=True)
def single_thread_torch() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_clean(tally: Tally, min_requests: int = 1, min_faults: int = 0) -> None:
    """No failures, and the scenario really ran: enough requests and injected faults."""
    assert tally.failures == [], "\n".join(tally.failures)
    assert (tally.errors, tally.wrong, tally.lost) == (0, 0, 0)
    assert tally.requests >= min_requests, tally
    assert tally.faults >= min_faults, tally
