"""The credential cache every Basic source of ``[auth]`` shares: what it remembers, for how
long, what it refuses unchecked, and what it serves when the source cannot answer. The
source here is a small fake whose answers and outages the test sets; the real sources
(htpasswd, LDAP) run behind the same cache in test_plugin_auth.py and test_auth_ldap.py."""

from __future__ import annotations

from typing import Hashable, Optional

import gevent
import gevent.event
import pytest
from geproxy_plugins.auth.credentials import CredentialCache, Unavailable, Verdict

pytestmark = pytest.mark.timeout(30)


class Source:
    """Passwords by user; ``down`` makes every check raise Unavailable; ``gate`` makes
    checks wait for it."""

    name = "fake"

    def __init__(self, passwords: dict[str, bytes]) -> None:
        self.passwords = passwords
        self.down = False
        self.checks: list[tuple[str, bytes]] = []
        self.gate: Optional[gevent.event.Event] = None
        self.version = 1

    def canonical(self, user: str) -> Optional[str]:
        return user

    def stamp(self, user: str) -> Hashable:
        return self.version

    def verify(self, user: str, password: bytes) -> bool:
        self.checks.append((user, password))
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        if self.down:
            raise Unavailable("every server is down")
        return self.passwords.get(user) == password


def _cache(clock, **settings) -> CredentialCache:
    options = dict(size=100, ttl=300.0, negative_ttl=60.0, stale_ttl=900.0, max_failures=3)
    options.update(settings)
    return CredentialCache(clock=clock, **options)


def test_a_good_password_is_checked_once_per_ttl(fake_clock):
    source, cache = Source({"alice": b"pw"}), _cache(fake_clock)
    assert cache.check(source, "alice", b"pw") == Verdict("alice", "ok")
    fake_clock.advance(299)
    assert cache.check(source, "alice", b"pw") == Verdict("alice", "cached")
    fake_clock.advance(2)
    assert cache.check(source, "alice", b"pw") == Verdict("alice", "ok")
    assert len(source.checks) == 2


def test_a_wrong_password_is_checked_once_per_negative_ttl(fake_clock):
    source, cache = Source({"alice": b"pw"}), _cache(fake_clock)
    for _ in range(5):
        assert cache.check(source, "alice", b"old") == Verdict(None, "failed")
    assert source.checks == [("alice", b"old")]
    fake_clock.advance(61)
    assert cache.check(source, "alice", b"old") == Verdict(None, "failed")
    assert len(source.checks) == 2
    # The corrected password is other credentials: checked at once.
    assert cache.check(source, "alice", b"pw") == Verdict("alice", "ok")


def test_a_guesser_is_throttled_after_max_failures_and_known_users_go_on(fake_clock):
    source, cache = Source({"alice": b"pw"}), _cache(fake_clock)
    assert cache.check(source, "alice", b"pw").result == "ok"
    for guess in (b"a", b"b", b"c"):
        assert cache.check(source, "alice", guess) == Verdict(None, "failed")
    checked = len(source.checks)
    for guess in (b"d", b"e", b"f", b"g"):
        assert cache.check(source, "alice", guess) == Verdict(None, "throttled")
    assert len(source.checks) == checked  # the source was not asked
    # The user's remembered good password still works meanwhile.
    assert cache.check(source, "alice", b"pw") == Verdict("alice", "cached")
    fake_clock.advance(61)  # the window passed: checked again
    assert cache.check(source, "alice", b"h") == Verdict(None, "failed")
    assert len(source.checks) == checked + 1


def test_a_source_that_is_down_is_stood_in_for_within_stale_ttl_only(fake_clock):
    source, cache = Source({"alice": b"pw", "bob": b"bob-pw"}), _cache(fake_clock)
    assert cache.check(source, "alice", b"pw").result == "ok"
    source.down = True
    fake_clock.advance(301)  # past ttl: asked, and it cannot answer
    assert cache.check(source, "alice", b"pw") == Verdict("alice", "stale")
    with pytest.raises(Unavailable):  # another password of hers: cannot be told
        cache.check(source, "alice", b"wrong")
    with pytest.raises(Unavailable):  # never seen good: nothing to stand in
        cache.check(source, "bob", b"bob-pw")
    fake_clock.advance(900)  # past ttl + stale_ttl
    with pytest.raises(Unavailable):
        cache.check(source, "alice", b"pw")


def test_a_wrong_password_remembered_stays_wrong_while_the_source_is_down(fake_clock):
    source, cache = Source({"alice": b"pw"}), _cache(fake_clock)
    assert cache.check(source, "alice", b"old").result == "failed"
    source.down = True
    assert cache.check(source, "alice", b"old") == Verdict(None, "failed")
    with pytest.raises(Unavailable):
        cache.check(source, "alice", b"other")


def test_a_password_changed_at_the_source_is_not_served_stale(fake_clock):
    source, cache = Source({"alice": b"pw"}), _cache(fake_clock)
    assert cache.check(source, "alice", b"pw").result == "ok"
    source.passwords["alice"] = b"new"
    fake_clock.advance(301)
    assert cache.check(source, "alice", b"pw") == Verdict(None, "failed")
    source.down = True
    assert cache.check(source, "alice", b"pw") == Verdict(None, "failed")  # remembered
    fake_clock.advance(61)
    with pytest.raises(Unavailable):  # the old good entry is gone, not served stale
        cache.check(source, "alice", b"pw")


def test_a_changed_stamp_drops_a_good_entry(fake_clock):
    source, cache = Source({"alice": b"pw"}), _cache(fake_clock)
    assert cache.check(source, "alice", b"pw").result == "ok"
    source.version = 2  # the user's hash in the file changed
    assert cache.check(source, "alice", b"pw").result == "ok"
    assert len(source.checks) == 2


def test_concurrent_checks_of_the_same_credentials_share_one(fake_clock):
    source, cache = Source({"alice": b"pw"}), _cache(fake_clock)
    source.gate = gevent.event.Event()
    checks = [gevent.spawn(cache.check, source, "alice", b"pw") for _ in range(5)]
    gevent.sleep(0)
    source.gate.set()
    assert [job.get(timeout=10) for job in checks] == [Verdict("alice", "ok")] * 5
    assert len(source.checks) == 1


def test_concurrent_checks_share_an_outage_too(fake_clock):
    source, cache = Source({"alice": b"pw"}), _cache(fake_clock)
    source.down, source.gate = True, gevent.event.Event()
    checks = [gevent.spawn(cache.check, source, "alice", b"pw") for _ in range(3)]
    gevent.sleep(0)
    source.gate.set()
    for job in checks:
        job.join(timeout=10)
        assert isinstance(job.exception, Unavailable)
    assert len(source.checks) == 1


def test_nothing_remembered_with_zero_ttls(fake_clock):
    source = Source({"alice": b"pw"})
    cache = _cache(fake_clock, ttl=0, negative_ttl=0, stale_ttl=0)
    for _ in range(3):
        assert cache.check(source, "alice", b"pw").result == "ok"
        assert cache.check(source, "alice", b"no").result == "failed"
    assert len(source.checks) == 6
