"""``poll``, the end-to-end tests' wait: a timeout names what it waited for and, given
``on_timeout``, the state that tells why (the multi-host test's jobs and logs)."""

from __future__ import annotations

import pytest

from tests.integration.e2e import poll


def test_a_timeout_says_what_was_awaited_and_why() -> None:
    calls = iter([None, 0, "", 7])
    assert poll(lambda: next(calls), 5, interval_s=0.001) == 7
    with pytest.raises(TimeoutError, match=r"waiting for the answer; jobs \[\(1, 'running'\)\]$"):
        poll(lambda: None, 0.05, 0.01, "the answer", on_timeout=lambda: "jobs [(1, 'running')]")
    with pytest.raises(TimeoutError, match=r"waiting for the answer$"):
        poll(lambda: None, 0.05, 0.01, "the answer")
