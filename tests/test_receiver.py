"""The webhook receiver process itself: logging, each answer mode, refusing and re-listening."""
from __future__ import annotations

import http.client
import json
import pathlib
import socket
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import wait_for
from tests.receiver import Receiver
from tests.webhook_receiver import HUGE_SIZE


def _post(url: str, payload: object, timeout: float = 5, headers: dict[str, str] | None = None):
    """POST JSON; return (status, headers, body) whatever the status."""
    req = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def _until(cond, timeout: float, what: str) -> None:
    wait_for(cond, timeout, what=what)


def _probe(port: int) -> str:
    """"refused", "accepted", or "reset": a connect that raced the listener closing."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    return "accepted"


def _refused(port: int) -> bool:
    return _probe(port) == "refused"


def _listening(port: int) -> bool:
    return _probe(port) == "accepted"


@pytest.fixture
def rx(tmp_path: pathlib.Path):
    r = Receiver(tmp_path / "rx").start()
    try:
        yield r
    finally:
        r.stop()
    assert "Traceback" not in r.stderr_path.read_text()


def test_ok_logs_request_and_answers_200(rx: Receiver) -> None:
    status, _, body = _post(rx.url, {"event": "created", "n": 1}, headers={"X-Sig": "abc"})
    assert (status, body) == (200, b"ok")
    [req] = rx.wait_for(lambda rs: len(rs) == 1, timeout=5, what="one request")
    assert req["path"] == "/hook"
    assert req["status"] == 200
    assert req["headers"]["x-sig"] == "abc"
    assert req["headers"]["content-type"] == "application/json"
    assert json.loads(req["body"]) == {"event": "created", "n": 1}
    assert abs(req["t"] - time.time()) < 10
    [d] = rx.deliveries()
    assert d["payload"] == {"event": "created", "n": 1}


def test_keep_alive_serves_several_requests_on_one_connection(rx: Receiver) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", rx.port, timeout=5)
    try:
        for i in range(3):
            conn.request("POST", "/hook", body=json.dumps({"i": i}))
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"ok")
        assert [d["payload"]["i"] for d in rx.deliveries()] == [0, 1, 2]
    finally:
        conn.close()


def test_error_modes(rx: Receiver) -> None:
    rx.set_mode("500")
    assert _post(rx.url, {"m": 500})[0] == 500
    rx.set_mode("410")
    assert _post(rx.url, {"m": 410})[0] == 410
    rx.set_mode("429:7")
    status, headers, _ = _post(rx.url, {"m": 429})
    assert (status, headers["Retry-After"]) == (429, "7")
    reqs = rx.wait_for(lambda rs: len(rs) == 3, timeout=5, what="three requests")
    assert [r["status"] for r in reqs] == [500, 410, 429]
    assert rx.deliveries() == []


def test_slow_mode_delays_the_answer(rx: Receiver) -> None:
    rx.set_mode("slow:0.3")
    start = time.monotonic()
    assert _post(rx.url, {"m": "slow"})[0] == 200
    assert time.monotonic() - start >= 0.3


def test_refuse_then_listen_again_on_same_port(rx: Receiver) -> None:
    port = rx.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/hook", body=b"{}")
    assert conn.getresponse().read() == b"ok"  # an open keep-alive connection

    rx.set_mode("refuse")
    _until(lambda: _refused(port), 5, "connections refused")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    with pytest.raises(urllib.error.URLError) as info:
        _post(rx.url, {"m": "refused"})
    assert isinstance(info.value.reason, ConnectionRefusedError)
    with pytest.raises((OSError, http.client.HTTPException)):  # the open connection was dropped
        conn.request("POST", "/hook", body=b"{}")
        conn.getresponse()
    conn.close()

    rx.set_mode("ok")
    _until(lambda: _listening(port), 5, "listening again")
    assert rx.port == port
    assert _post(rx.url, {"m": "back"})[0] == 200
    assert [d["payload"] for d in rx.deliveries()] == [{}, {"m": "back"}]


def test_starting_in_refuse_mode_still_publishes_port(tmp_path: pathlib.Path) -> None:
    r = Receiver(tmp_path / "rx", mode="refuse").start()
    try:
        assert r.port > 0
        _until(lambda: _refused(r.port), 5, "connections refused")
        r.set_mode("ok")
        _until(lambda: _listening(r.port), 5, "listening")
        assert _post(r.url, {"m": "ok"})[0] == 200
    finally:
        r.stop()


def test_hang_never_answers_but_other_connections_are_served(rx: Receiver) -> None:
    rx.set_mode("hang")
    with pytest.raises(TimeoutError):
        _post(rx.url, {"m": "hang"}, timeout=0.5)
    [req] = rx.wait_for(lambda rs: len(rs) == 1, timeout=5, what="the hung request")
    assert req["status"] is None
    rx.set_mode("ok")
    assert _post(rx.url, {"m": "after"})[0] == 200
    assert [d["payload"] for d in rx.deliveries()] == [{"m": "after"}]


def test_huge_returns_64_mib(rx: Receiver) -> None:
    rx.set_mode("huge")
    status, headers, body = _post(rx.url, {"m": "huge"}, timeout=30)
    assert status == 200
    assert int(headers["Content-Length"]) == HUGE_SIZE == 64 * 1024 * 1024
    assert len(body) == HUGE_SIZE


def test_stop_is_idempotent(tmp_path: pathlib.Path) -> None:
    r = Receiver(tmp_path / "rx").start()
    r.stop()
    r.stop()
    assert _refused(r.port)


def test_request_cut_short_by_a_dying_client_is_neither_answered_nor_logged(rx: Receiver) -> None:
    port = int(rx.url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"cut\": ")
        s.shutdown(socket.SHUT_WR)            # the sender dies before the rest of its body
        assert s.recv(100) == b""             # closed without an answer
    status, _, _ = _post(rx.url, {"after": 1})
    assert status == 200
    reqs = rx.wait_for(lambda rs: len(rs) >= 1, timeout=5, what="the request after the cut one")
    assert [json.loads(r["body"]) for r in reqs] == [{"after": 1}]
