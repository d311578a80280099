"""Busy associations poll the network fast; idle ones go back to pynetdicom's default."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from pynetdicom.dul import DULServiceProvider

from node.polling import DELAY_ATTRIBUTE, BusyPolling


class FakeDUL:
    def __init__(self) -> None:
        self._run_loop_delay = 0.001
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive


def _pdu_from(dul: object) -> SimpleNamespace:
    return SimpleNamespace(assoc=SimpleNamespace(dul=dul))


def _wait_until(condition, timeout_s: float = 2.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_pynetdicom_still_has_the_delay_attribute() -> None:
    # BusyPolling sets it; if a pynetdicom release renames it, this fails rather than the
    # listener silently getting slower
    dul = DULServiceProvider.__new__(DULServiceProvider)
    DULServiceProvider.__init__(dul, SimpleNamespace())  # type: ignore[arg-type]
    assert isinstance(getattr(dul, DELAY_ATTRIBUTE), float)


def test_a_pdu_makes_the_association_fast_and_quiet_makes_it_slow_again() -> None:
    polling = BusyPolling(busy_delay_s=0.0001, idle_after_s=0.05)
    dul = FakeDUL()

    polling.on_pdu_received(_pdu_from(dul))
    assert dul._run_loop_delay == 0.0001
    assert polling.busy_count() == 1

    assert _wait_until(lambda: dul._run_loop_delay == 0.001)
    assert polling.busy_count() == 0
    assert _wait_until(lambda: polling._reaper is None)  # no thread while nothing is busy


def test_pdus_keep_the_association_fast() -> None:
    polling = BusyPolling(busy_delay_s=0.0001, idle_after_s=0.2)
    dul = FakeDUL()
    for _ in range(8):  # 0.4 s of traffic: twice the idle time
        polling.on_pdu_received(_pdu_from(dul))
        time.sleep(0.05)
        assert dul._run_loop_delay == 0.0001
    assert _wait_until(lambda: dul._run_loop_delay == 0.001)


def test_a_closed_association_is_forgotten() -> None:
    polling = BusyPolling(busy_delay_s=0.0001, idle_after_s=1.0)
    dul = FakeDUL()
    polling.on_pdu_received(_pdu_from(dul))
    dul.alive = False
    # the reaper looks every half idle time: gone before it would have counted as idle
    assert _wait_until(lambda: polling.busy_count() == 0, timeout_s=0.9)


def test_without_the_attribute_it_warns_once_and_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    polling = BusyPolling()

    class OldDUL:
        def is_alive(self) -> bool:
            return True

    dul = OldDUL()
    with caplog.at_level(logging.WARNING, logger="node.polling"):
        polling.on_pdu_received(_pdu_from(dul))
        polling.on_pdu_received(_pdu_from(dul))
    assert not hasattr(dul, DELAY_ATTRIBUTE)
    assert polling.busy_count() == 0
    assert len([r for r in caplog.records if DELAY_ATTRIBUTE in r.getMessage()]) == 1
