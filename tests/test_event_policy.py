"""Webhook URL SSRF policy (events/policy.py) and retry timing (events/schedule.py): pure logic."""
from __future__ import annotations

import ipaddress
import math
import random
import re
import socket
from email.utils import format_datetime
from datetime import datetime, timezone

import pytest

from agentmount.events.policy import UrlRefused, check_ip, check_url, resolve_and_check
from agentmount.events.schedule import (DEFAULT_BUDGET, DEFAULT_EVERY, DEFAULT_SCHEDULE, MAX_RETRY_AFTER,
                                        RetryPolicy, parse_retry_after)

HINT = "allow_private = true"

# -- check_url: syntax ---------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://example.com/",
    "https://example.com:8443/hooks?x=1#frag",
    "HTTPS://Example.COM",
    "http://hooks.example.com:1/",
    "http://hooks.example.com:65535/",
    "http://8.8.8.8/",
    "http://[2001:4860:4860::8888]:443/",
    "https://localhost/",  # names are only judged after resolution
])
def test_check_url_accepts(url: str) -> None:
    assert check_url(url) is None


@pytest.mark.parametrize("url, why", [
    ("ftp://x", "scheme must be http or https"),
    ("file:///etc/passwd", "scheme must be http or https"),
    ("example.com/hook", "scheme must be http or https"),
    ("http:///path", "a host is required"),
    ("http://", "a host is required"),
    ("http://user:pw@example.com/", "credentials"),
    ("http://user@example.com/", "credentials"),
    ("http://example.com:0/", "out of range 1..65535"),
    ("http://example.com:65536/", "out of range 1..65535"),
    ("http://example.com:http/", "must be a number"),
    ("http://example.com:/", "must be a number"),
    ("http://example.com/" + "a" * 2100, "at most 2048"),
    ("http://exa mple.com/", "whitespace or control"),
    ("http://example.com/\n", "whitespace or control"),
    ("http://example.com/\x00", "whitespace or control"),
    ("http://example.com\\@evil.com/", "not allowed"),
    ("http://::1/", "brackets"),
    ("http://[::1/", "cannot be parsed"),
    ("http://[not-v6]/", "cannot be parsed|not a valid IPv6"),  # urlsplit may catch it first
    ("http://999.1.1.1/", "not a valid IPv4"),
    ("http://éxample.com/", "punycode"),
])
def test_check_url_refuses(url: str, why: str) -> None:
    with pytest.raises(UrlRefused, match=why) as exc:
        check_url(url, allow_private=True)
    msg = str(exc.value)
    assert msg.startswith("webhook url '") and "\n" not in msg


def test_check_url_message_format() -> None:
    with pytest.raises(UrlRefused) as exc:
        check_url("ftp://x")
    assert str(exc.value) == "webhook url 'ftp://x': scheme must be http or https"
    assert isinstance(exc.value, ValueError)


# -- check_ip / IP literals ----------------------------------------------------------------

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private (10.0.0.0/8)"),
    ("172.16.0.1", "private (172.16.0.0/12)"),
    ("172.31.255.254", "private (172.16.0.0/12)"),
    ("192.168.1.1", "private (192.168.0.0/16)"),
    ("fc00::1", "unique-local"),
    ("fd12:3456::1", "unique-local"),
    ("169.254.169.254", "link-local"),
    ("169.254.0.1", "link-local"),
    ("fe80::1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.255", "carrier-grade NAT"),
    ("240.0.0.1", "reserved"),
    ("192.0.2.10", "not globally routable"),  # TEST-NET-1
    ("198.18.0.1", "not globally routable"),  # benchmarking
    ("::ffff:127.0.0.1", "IPv4-mapped 127.0.0.1) is loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped 10.0.0.1) is private"),
    ("::ffff:169.254.169.254", "IPv4-mapped 169.254.169.254) is link-local"),
    ("::ffff:100.64.0.1", "carrier-grade NAT"),
    ("::ffff:192.168.0.1", "private"),
    ("64:ff9b::a9fe:a9fe", "NAT64 for 169.254.169.254"),
    ("2002:c0a8:101::1", "6to4 for 192.168.1.1"),
]
NEVER = [
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("::ffff:224.0.0.1", "multicast"),
]


@pytest.mark.parametrize("ip, why", REFUSED)
def test_check_ip_refuses_private_ranges(ip: str, why: str) -> None:
    with pytest.raises(UrlRefused, match=re.escape(why)) as exc:
        check_ip(ip, allow_private=False)
    assert HINT in str(exc.value)
    # the same address object and the URL form are refused the same way
    with pytest.raises(UrlRefused):
        check_ip(ipaddress.ip_address(ip), False)
    host = f"[{ip}]" if ":" in ip else ip
    with pytest.raises(UrlRefused, match=re.escape(f"webhook url 'http://{host}:8080/x': ")):
        check_url(f"http://{host}:8080/x")
    # ...and allowed with allow_private
    assert check_ip(ip, allow_private=True) is None
    assert check_url(f"http://{host}:8080/x", allow_private=True) is None


@pytest.mark.parametrize("ip, why", NEVER)
def test_check_ip_never_allowed(ip: str, why: str) -> None:
    for allow in (False, True):
        with pytest.raises(UrlRefused, match=why) as exc:
            check_ip(ip, allow_private=allow)
        assert "never" in str(exc.value)
        host = f"[{ip}]" if ":" in ip else ip
        with pytest.raises(UrlRefused, match=why):
            check_url(f"https://{host}/", allow_private=allow)


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8",
                                "64:ff9b::808:808", "2002:808:808::1", "172.32.0.1", "100.128.0.1"])
def test_check_ip_allows_public(ip: str) -> None:
    assert check_ip(ip, allow_private=False) is None
    assert check_ip(ipaddress.ip_address(ip), allow_private=False) is None


def test_allow_private_permits_loopback_and_10_but_not_unspecified() -> None:
    assert check_url("http://127.0.0.1:9000/hook", allow_private=True) is None
    assert check_url("http://10.0.0.5/hook", allow_private=True) is None
    with pytest.raises(UrlRefused, match="127.0.0.1"):
        check_url("http://127.0.0.1:9000/hook", allow_private=False)
    with pytest.raises(UrlRefused, match="10.0.0.5"):
        check_url("http://10.0.0.5/hook")
    with pytest.raises(UrlRefused, match="0.0.0.0"):
        check_url("http://0.0.0.0:9000/", allow_private=True)


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0x7f.0.0.1"])
def test_legacy_numeric_ipv4_forms_are_judged_as_addresses(host: str) -> None:
    with pytest.raises(UrlRefused, match=r"address 127\.0\.0\.1 is loopback"):
        check_url(f"http://{host}/")
    assert check_url(f"http://{host}/", allow_private=True) is None


def test_check_ip_rejects_garbage() -> None:
    with pytest.raises(UrlRefused, match="not a valid IP address"):
        check_ip("example.com", allow_private=True)


# -- resolve_and_check ---------------------------------------------------------------------


def test_resolve_localhost_refused_without_allow_private() -> None:
    with pytest.raises(UrlRefused, match="loopback") as exc:
        resolve_and_check("http://localhost:1/", allow_private=False)
    assert "localhost" in str(exc.value) and HINT in str(exc.value)


def test_resolve_localhost_allowed_with_allow_private() -> None:
    addrs = resolve_and_check("http://localhost:1/", allow_private=True)
    assert addrs and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)
    assert len(addrs) == len(set(addrs))


def test_resolve_ip_literal_needs_no_dns() -> None:
    assert resolve_and_check("http://127.0.0.1:1/", allow_private=True) == ["127.0.0.1"]
    assert resolve_and_check("http://[::1]:1/", allow_private=True) == ["::1"]


def _fake_getaddrinfo(answers: list[str], seen: list[tuple]):
    def fake(host, port, family=0, type=0, proto=0, flags=0):
        seen.append((host, port))
        out = []
        for a in answers:
            if ":" in a:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)))
        return out
    return fake


def test_resolve_refuses_if_any_address_is_private(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple] = []
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo(["93.184.216.34", "10.0.0.7"], seen))
    with pytest.raises(UrlRefused, match=r"hooks\.example\.com.*10\.0\.0\.7"):
        resolve_and_check("https://hooks.example.com/x", allow_private=False)
    assert seen == [("hooks.example.com", 443)]


def test_resolve_returns_distinct_addresses_and_default_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple] = []
    answers = ["93.184.216.34", "93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo(answers, seen))
    assert resolve_and_check("http://example.com/", False) == ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]
    assert resolve_and_check("https://example.com:8443/", False) == ["93.184.216.34",
                                                                       "2606:2800:220:1:248:1893:25c8:1946"]
    assert [p for _, p in seen] == [80, 8443]


def test_resolve_failure_is_url_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(UrlRefused, match="cannot resolve host 'nowhere.example': Name or service not known"):
        resolve_and_check("http://nowhere.example/", allow_private=True)
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo([], []))
    with pytest.raises(UrlRefused, match="resolved to no"):
        resolve_and_check("http://nowhere.example/", allow_private=True)


def test_resolve_checks_url_first(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple] = []
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo(["93.184.216.34"], seen))
    with pytest.raises(UrlRefused, match="scheme"):
        resolve_and_check("gopher://example.com/", allow_private=True)
    assert seen == []


# -- RetryPolicy ---------------------------------------------------------------------------


def test_defaults() -> None:
    p = RetryPolicy()
    p.validate()
    assert p.schedule == DEFAULT_SCHEDULE == (0, 5, 30, 120, 600, 1800, 7200)
    assert p.every == DEFAULT_EVERY == 21600.0
    assert p.budget == DEFAULT_BUDGET == 259200.0
    assert p.jitter == 0.1


def test_delays_without_jitter() -> None:
    p = RetryPolicy(jitter=0)
    assert [p.delay(n) for n in range(1, 10)] == [5, 30, 120, 600, 1800, 7200, 21600, 21600, 21600]
    with pytest.raises(ValueError, match="failures"):
        p.delay(0)


def test_jitter_bounds_with_seeded_rng() -> None:
    p = RetryPolicy(jitter=0.1)
    rng = random.Random(1234)
    samples = [p.delay(2, rng) for _ in range(2000)]
    assert all(27.0 <= s <= 33.0 for s in samples)
    assert min(samples) < 27.3 and max(samples) > 32.7  # actually spread over the range
    assert len(set(samples)) > 1000
    # reproducible with the same seed
    assert [p.delay(3, random.Random(7)) for _ in range(3)] == [p.delay(3, random.Random(7)) for _ in range(3)]
    # zero delays stay zero under jitter
    assert RetryPolicy(schedule=(0, 0, 10), jitter=0.5).delay(1, rng) == 0
    wide = [RetryPolicy(jitter=0.5).delay(7, rng) for _ in range(500)]
    assert all(10800 <= s <= 32400 for s in wide)


def test_next_attempt_and_budget() -> None:
    p = RetryPolicy(jitter=0)
    assert p.next_attempt(first_seen=1000, now=1000, failures=1) == 1005
    assert p.next_attempt(first_seen=1000, now=2000, failures=4) == 2600
    # last attempt that still fits the budget, then exhaustion
    end = 1000 + DEFAULT_BUDGET
    assert p.next_attempt(1000, end - 21600, failures=20) == end
    assert p.next_attempt(1000, end - 21599, failures=20) is None
    short = RetryPolicy(budget=60, jitter=0)
    assert short.next_attempt(0, 30, failures=2) == 60  # 30 + 30 = 60: exactly at the budget still runs
    assert short.next_attempt(0, 31, failures=2) is None
    assert short.next_attempt(100, 129, failures=2) == 159  # budget counts from first_seen


def test_next_attempt_retry_after() -> None:
    p = RetryPolicy(jitter=0)
    assert p.next_attempt(0, 100, failures=1, retry_after=60) == 160  # longer than the 5 s step
    assert p.next_attempt(0, 100, failures=3, retry_after=60) == 220  # schedule (120) wins
    assert p.next_attempt(0, 100, failures=1, retry_after=-5) == 105
    assert p.next_attempt(0, 100, failures=1, retry_after=math.nan) == 105
    # capped at 24 h
    assert p.next_attempt(0, 100, failures=1, retry_after=10 * 86400) == 100 + MAX_RETRY_AFTER == 86500
    assert p.next_attempt(0, 100, failures=1, retry_after=math.inf) == 86500
    # ...but a capped Retry-After can still exhaust the budget
    assert p.next_attempt(0, DEFAULT_BUDGET - 3600, failures=1, retry_after=7200) is None


@pytest.mark.parametrize("kw, why", [
    ({"schedule": ()}, "empty"),
    ({"schedule": (0, -1)}, r"schedule\[1\]"),
    ({"schedule": (0, math.inf)}, "finite"),
    ({"schedule": (0, math.nan)}, "finite"),
    ({"every": -1.0}, "every"),
    ({"every": 0.0}, "every"),
    ({"every": math.inf}, "every"),
    ({"budget": -1.0}, "budget"),
    ({"budget": math.nan}, "budget"),
    ({"jitter": -0.1}, "jitter"),
    ({"jitter": 0.6}, "jitter"),
    ({"jitter": math.nan}, "jitter"),
])
def test_validate_rejects(kw: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        RetryPolicy(**kw).validate()


def test_validate_accepts_edges() -> None:
    RetryPolicy(schedule=(0,), every=1, budget=0, jitter=0).validate()
    RetryPolicy(jitter=0.5).validate()
    assert RetryPolicy(schedule=(0,), every=1, jitter=0).delay(1) == 1


# -- parse_retry_after ---------------------------------------------------------------------


def test_retry_after_seconds() -> None:
    assert parse_retry_after("120", now=0) == 120.0
    assert parse_retry_after(" 0 ", now=5) == 0.0
    assert parse_retry_after("99999999999999999999999", now=0) >= MAX_RETRY_AFTER


def test_retry_after_http_date() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc).timestamp()
    assert parse_retry_after("Wed, 01 May 2024 12:01:30 GMT", now) == 90.0
    later = format_datetime(datetime(2024, 5, 1, 13, 0, 0, tzinfo=timezone.utc), usegmt=True)
    assert parse_retry_after(later, now) == 3600.0
    # a date in the past means "now"
    assert parse_retry_after("Wed, 01 May 2024 11:00:00 GMT", now) == 0.0
    # a numeric zone offset is honoured
    assert parse_retry_after("Wed, 01 May 2024 14:00:10 +0200", now) == 10.0


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "-5", "1.5", "12abc", "Wed, 99 Foo 2024", "٣"])
def test_retry_after_garbage(value: str | None) -> None:
    assert parse_retry_after(value, now=1000.0) is None
