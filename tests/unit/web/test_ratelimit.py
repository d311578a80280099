"""The failed-login limiter on its own: a clock the test moves, no server."""

from __future__ import annotations

import pytest

from node.web.ratelimit import LoginLimiter, client_address


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_five_failures_within_the_window_lock_and_the_lockout_doubles() -> None:
    clock = Clock()
    limiter = LoginLimiter(max_failures=5, window_s=300, lockout_s=60, max_lockout_s=200, clock=clock)
    keys = ["ip:10.0.0.1", "user:admin"]
    for _ in range(4):
        assert limiter.failure(keys) == []
    assert limiter.locked(keys) is None
    started = limiter.failure(keys)
    assert [(s.key, s.lockout_s, s.lockouts) for s in started] == [("ip:10.0.0.1", 60, 1), ("user:admin", 60, 1)]
    locked = limiter.locked(["ip:10.0.0.9", "user:admin"])  # another address, the same user name
    assert locked is not None and locked.key == "user:admin" and locked.retry_after_s == 60
    clock.now += 61
    assert limiter.locked(keys) is None
    for _ in range(5):
        started = limiter.failure(keys)
    assert [s.lockout_s for s in started] == [120, 120]
    clock.now += 121
    for _ in range(5):
        started = limiter.failure(keys)
    assert [s.lockout_s for s in started] == [200, 200]  # capped


def test_old_failures_leave_the_window_and_a_success_resets() -> None:
    clock = Clock()
    limiter = LoginLimiter(max_failures=3, window_s=10, lockout_s=5, clock=clock)
    limiter.failure(["ip:a"])
    limiter.failure(["ip:a"])
    clock.now += 11
    assert limiter.failure(["ip:a"]) == []  # the first two are out of the window
    limiter.failure(["ip:a"])
    limiter.success(["ip:a"])
    assert limiter.failure(["ip:a"]) == [] and limiter.locked(["ip:a"]) is None


def test_keys_are_bounded() -> None:
    limiter = LoginLimiter(max_failures=1, lockout_s=5, max_keys=3, clock=Clock())
    for n in range(10):
        limiter.failure([f"ip:{n}"])
    assert limiter.locked(["ip:0"]) is None and limiter.locked(["ip:9"]) is not None


def test_refuses_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="max_failures"):
        LoginLimiter(max_failures=0)


def test_forwarded_for_only_from_trusted_proxies() -> None:
    assert client_address("203.0.113.5", "1.2.3.4", []) == "203.0.113.5"
    assert client_address("127.0.0.1", "1.2.3.4", []) == "127.0.0.1"
    assert client_address("127.0.0.1", "1.2.3.4", ["127.0.0.1"]) == "1.2.3.4"
    # the client can prepend anything; only what the trusted proxies appended counts
    assert client_address("127.0.0.1", "6.6.6.6, 198.51.100.7, 10.0.0.2", ["127.0.0.1", "10.0.0.0/8"]) == \
        "198.51.100.7"
    assert client_address("10.0.0.3", "garbage", ["10.0.0.0/8"]) == "garbage"
    assert client_address(None, None, []) == "unknown"


def test_settings_check_the_trusted_proxies_and_lockouts() -> None:
    from pydantic import ValidationError

    from node.config import Settings

    with pytest.raises(ValidationError, match="web_trusted_proxies: 'proxy.local' is not an IP address"):
        Settings(web_trusted_proxies=["proxy.local"])
    with pytest.raises(ValidationError, match="web_login_max_lockout_s"):
        Settings(web_login_lockout_s=100, web_login_max_lockout_s=10)
    assert Settings(web_trusted_proxies=["10.0.0.0/8", "::1"]).web_trusted_proxies == ["10.0.0.0/8", "::1"]
