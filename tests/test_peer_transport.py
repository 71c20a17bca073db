"""Peer transport (agentmount.peer): envelope codec, Curve keys and ZAP, RPC, PUB/SUB.

Real zmq sockets on 127.0.0.1 (ports picked by the kernel via ``tcp://127.0.0.1:*``);
the crash test runs the server as a separate process (this file, run as a script)
and kills it with SIGKILL mid-traffic. No fixed sleeps: every wait is on a
condition with a deadline.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
import tomllib
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import pytest
import trio
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from agentmount.peer import (Authenticator, BadMessage, Envelope, KeyFormatError, PeerUnavailable, Publisher,
                             RemoteError, RpcClient, RpcServer, Subscriber, keys, running, wire)

REPO = Path(__file__).resolve().parent.parent
SERVER = keys.generate()     # (public, secret)
CLIENT = keys.generate()
CLIENT2 = keys.generate()
STRANGER = keys.generate()   # never listed anywhere


# -- helpers -------------------------------------------------------------------------------

@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


async def wait_until(cond, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `cond()` until true; fail the test if `timeout` passes first."""
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def echo(sender, kind, body, epoch):
    if kind == "echo":
        return body
    if kind == "whoami":
        return {"sender": sender, "epoch": epoch}
    if kind == "fail":
        raise RemoteError("stale_epoch", f"epoch {epoch} is old")
    if kind == "crash":
        raise KeyError("boom")
    if kind == "unencodable":
        return {1, 2}
    raise RemoteError("unknown_kind", kind)


@asynccontextmanager
async def server(ctx, handler=echo, allowed=None, **kw):
    allowed = {CLIENT[0]: "c", CLIENT2[0]: "c2"} if allowed is None else allowed
    auth = Authenticator(allowed, context=ctx)
    srv = RpcServer("tcp://127.0.0.1:*", handler, name="s", secret_key=SERVER[1], auth=auth, **kw)
    async with running(auth, srv):
        yield srv, auth


def client(ctx, endpoint, pair=CLIENT, name="c", **kw) -> RpcClient:
    return RpcClient(endpoint, name=name, peer="s", server_public_key=SERVER[0], public_key=pair[0],
                     secret_key=pair[1], context=ctx, **kw)


# -- wire ----------------------------------------------------------------------------------

def _raw(**over):
    m = {"v": 1, "kind": "k", "id": b"i" * 16, "epoch": 3, "sender": "a", "body": None}
    m.update(over)
    return msgpack.packb(m, use_bin_type=True)


def test_wire_roundtrip():
    for body in [None, True, 0, -1, 2**63, 1.5, "é", b"\0" * 1024, [1, [2, {"x": b"y"}]], {1: "int keys"}]:
        env = Envelope("op", wire.new_id(), 7, "peer-a", body)
        assert wire.decode(wire.encode(env)) == env
    assert wire.decode(wire.encode(Envelope("op", b"x", None, "p"))).epoch is None


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"\xc1", "not valid msgpack"),
    (msgpack.packb([1, 2]), "must be a map"),
    (msgpack.packb({"v": 1}), "missing"),
    (_raw()[:-1], "not valid msgpack"),
    (_raw() + b"\x00", "trailing"),
    (_raw(v=2), "unsupported protocol version 2"),
    (_raw(v=True), "version must be an int"),
    (_raw(kind=1), "kind must be a str"),
    (_raw(kind=""), "kind length"),
    (_raw(kind="k" * 65), "kind length"),
    (_raw(id="str"), "id must be bytes"),
    (_raw(id=b""), "id length"),
    (_raw(id=b"x" * 65), "id length"),
    (_raw(epoch=-1), "epoch -1 out of range"),
    (_raw(epoch=1.0), "epoch must be an int"),
    (_raw(epoch=False), "epoch must be an int"),
    (_raw(sender=b"a"), "sender must be a str"),
    (_raw(sender=""), "sender length"),
    (_raw(extra=1), "unexpected"),
    (_raw(body=msgpack.ExtType(5, b"x")), "extension type 5"),
    (msgpack.packb({"v": 1, "kind": b"\xff", "id": b"i", "epoch": 0, "sender": "a", "body": 0},
                   use_bin_type=False), "not valid msgpack"),
    (b"\x91" * 100_000, "not valid msgpack"),           # nesting bomb
    (b"\xdd\xff\xff\xff\xff", "not valid msgpack"),    # claims a 4G-element array
])
def test_wire_rejects(data, reason):
    with pytest.raises(BadMessage) as ei:
        wire.decode(data)
    assert reason in ei.value.reason


def test_wire_size_limit_and_encode_validation():
    big = wire.encode(Envelope("k", b"i", None, "a", b"x" * 5000))
    with pytest.raises(BadMessage, match="exceeds limit"):
        wire.decode(big, max_size=4096)
    with pytest.raises(BadMessage, match="exceeds limit"):
        wire.encode(Envelope("k", b"i", None, "a", b"x" * 5000), max_size=4096)
    with pytest.raises(BadMessage, match="not encodable"):
        wire.encode(Envelope("k", b"i", None, "a", object()))
    with pytest.raises(BadMessage, match="epoch"):
        wire.encode(Envelope("k", b"i", -5, "a"))
    with pytest.raises(BadMessage, match="id must be bytes"):
        wire.encode(Envelope("k", "i", None, "a"))


def _decode_total(data: bytes) -> None:
    try:
        env = wire.decode(data)
    except BadMessage:
        return
    assert isinstance(env, Envelope) and env.v == wire.PROTOCOL_VERSION


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_wire_fuzz_random_bytes(data):
    _decode_total(data)


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers(-2**63, 2**63 - 1), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "kind", "id", "epoch", "sender", "body", "x"]), _msgpack_values,
                       max_size=7))
def test_wire_fuzz_structured(m):
    _decode_total(msgpack.packb(m, use_bin_type=True))


def test_wire_fuzz_mutations():
    rnd = random.Random(4)
    good = wire.encode(Envelope("op", wire.new_id(), 9, "peer", {"a": [1, b"x" * 40, "y"]}))
    for _ in range(5000):
        b = bytearray(good)
        for _ in range(rnd.randint(1, 4)):
            op = rnd.random()
            i = rnd.randrange(len(b))
            if op < 0.5:
                b[i] = rnd.randrange(256)
            elif op < 0.75:
                del b[i:i + rnd.randint(1, 8)]
            else:
                b[i:i] = os.urandom(rnd.randint(1, 8))
            if not b:
                break
        _decode_total(bytes(b))


# -- keys ----------------------------------------------------------------------------------

def test_keys_generate_validate_and_cli_text():
    pub, sec = keys.generate()
    assert keys.load_pair(pub, sec) == (pub, sec)
    assert keys.public_from_secret(sec) == pub
    t = tomllib.loads(keys.keygen_text())
    assert list(t) == ["public_key", "secret_key"]
    assert keys.public_from_secret(t["secret_key"]) == t["public_key"]
    for bad, msg in [("abc", "40 z85 characters"), ("~" * 40, "invalid z85"), (5, "expected a z85 string")]:
        with pytest.raises(KeyFormatError, match=msg) as ei:
            keys.load_key(bad, "node.public_key")
        assert "node.public_key" in str(ei.value)
    with pytest.raises(KeyFormatError, match="does not match"):
        keys.load_pair(keys.generate()[0], sec)
    with pytest.raises(KeyFormatError):
        Authenticator({"short": "x"}, context=zmq.Context.instance())


# -- ZSocket -------------------------------------------------------------------------------

async def test_zsocket_many_parked_readers_and_writers_no_loss(ctx):
    """Tiny high-water marks force writers and readers to park; some readers are cancelled
    at random. Every message must arrive exactly once and nothing may hang."""
    from agentmount.peer.zsock import open_zsocket

    def setup_pull(raw):
        raw.setsockopt(zmq.RCVHWM, 5)
        raw.bind("tcp://127.0.0.1:*")

    async with open_zsocket(ctx, zmq.PULL, setup_pull) as pull:
        ep = pull.raw.getsockopt(zmq.LAST_ENDPOINT).decode()

        def setup_push(raw):
            raw.setsockopt(zmq.SNDHWM, 5)
            raw.connect(ep)

        async with open_zsocket(ctx, zmq.PUSH, setup_push) as push:
            got: list[bytes] = []
            writers, per_writer = 40, 100

            async def writer(w):
                for i in range(per_writer):
                    await push.send_multipart([b"%d" % w, b"%d" % i])

            async def reader(r):
                rnd = random.Random(r)
                while len(got) < writers * per_writer:
                    with trio.move_on_after(rnd.random() * 0.003 if r % 2 else 10):
                        got.append(b"/".join(await pull.recv_multipart()))

            with trio.fail_after(20):
                async with trio.open_nursery() as n:
                    for r in range(20):
                        n.start_soon(reader, r)
                    for w in range(writers):
                        n.start_soon(writer, w)
                    await wait_until(lambda: len(got) == writers * per_writer, what="all messages")
                    n.cancel_scope.cancel()
            assert sorted(got) == sorted(b"%d/%d" % (w, i) for w in range(writers) for i in range(per_writer))


async def test_zsocket_router_full_pipe_does_not_spin_or_hang(ctx):
    """ROUTER_MANDATORY: sending to a peer whose pipe is full waits (EAGAIN while POLLOUT may
    be set), an unknown peer raises EHOSTUNREACH, and the sends finish once the peer reads."""
    from agentmount.peer.zsock import open_zsocket

    def setup_router(raw):
        raw.setsockopt(zmq.SNDHWM, 4)
        raw.bind("tcp://127.0.0.1:*")

    async with open_zsocket(ctx, zmq.ROUTER, setup_router) as router:
        ep = router.raw.getsockopt(zmq.LAST_ENDPOINT).decode()

        def setup_dealer(raw):
            raw.setsockopt(zmq.RCVHWM, 4)
            raw.setsockopt(zmq.ROUTING_ID, b"slow")
            raw.connect(ep)

        def setup_other(raw):
            raw.setsockopt(zmq.ROUTING_ID, b"idle")
            raw.connect(ep)

        # a second, idle peer keeps the ROUTER's POLLOUT set while the slow peer's pipe is full
        async with open_zsocket(ctx, zmq.DEALER, setup_dealer) as dealer, \
                open_zsocket(ctx, zmq.DEALER, setup_other) as other:
            with trio.fail_after(20):
                await dealer.send_multipart([b"hello"])
                await other.send_multipart([b"hello"])
                assert sorted([await router.recv_multipart(), await router.recv_multipart()]) == [
                    [b"idle", b"hello"], [b"slow", b"hello"]]
                with pytest.raises(zmq.ZMQError) as ei:
                    await router.send_multipart([b"nobody", b"x"])
                assert ei.value.errno == zmq.EHOSTUNREACH
                sent = 0

                blob = b"x" * 65536   # more than the TCP buffers hold: the pipe must fill

                async def flood():
                    nonlocal sent
                    for i in range(200):
                        await router.send_multipart([b"slow", b"%d" % i, blob])
                        sent += 1

                async with trio.open_nursery() as n:
                    n.start_soon(flood)
                    await wait_until(lambda: sent >= 4, what="the pipe to fill")
                    # A measurement window (not a wait for a condition): the stuck flood must
                    # be idle, not spinning on EAGAIN, while the reader does not read.
                    cpu0 = time.thread_time()
                    with trio.move_on_after(0.25):
                        await trio.sleep_forever()
                    assert sent < 200
                    assert router.raw.getsockopt(zmq.EVENTS) & zmq.POLLOUT
                    assert time.thread_time() - cpu0 < 0.05
                    got = []
                    while len(got) < 200:
                        got.append((await dealer.recv_multipart())[0])
                assert got == [b"%d" % i for i in range(200)]


# -- RPC -----------------------------------------------------------------------------------

async def test_call_replies_errors_and_identity(ctx):
    async with server(ctx) as (srv, auth):
        srv.epoch = 12
        c = client(ctx, srv.endpoint)
        async with running(c):
            with trio.fail_after(10):
                assert await c.call("echo", b"x" * 1024) == b"x" * 1024
                assert await c.call("whoami", epoch=5) == {"sender": "c", "epoch": 5}
                assert c.max_epoch_seen == 12
                with pytest.raises(RemoteError) as ei:
                    await c.call("fail", epoch=4)
                assert (ei.value.code, ei.value.message, ei.value.epoch) == ("stale_epoch", "epoch 4 is old", 12)
                with pytest.raises(RemoteError, match="internal.*KeyError"):
                    await c.call("crash")
                with pytest.raises(RemoteError, match="bad_reply"):
                    await c.call("unencodable")
                with pytest.raises(ValueError):
                    await c.call("$reply")
                assert await c.call("echo", [1, 2]) == [1, 2]      # the server survived all that
        assert srv.stats.errors == 2


async def test_2000_concurrent_calls_match_replies(ctx):
    async def handler(sender, kind, body, epoch):
        for _ in range(body["n"] % 5):   # reorder completions
            await trio.sleep(0)
        return {"i": body["i"], "sq": body["i"] ** 2, "from": sender}

    async with server(ctx, handler, max_concurrency=64) as (srv, _):
        c = client(ctx, srv.endpoint, timeout=20)
        peak = 0
        async with running(c):
            with trio.fail_after(20):
                bad = []

                async def one(i):
                    nonlocal peak
                    r = await c.call("sq", {"i": i, "n": random.randrange(1000)})
                    peak = max(peak, c.in_flight + 1)
                    if r != {"i": i, "sq": i * i, "from": "c"}:
                        bad.append((i, r))

                async with trio.open_nursery() as n:
                    for i in range(2000):
                        n.start_soon(one, i)
                assert not bad
                assert c.in_flight == 0
        assert peak > 1000
        assert srv.stats.requests == 2000 and srv.stats.duplicates == 0


async def test_request_id_dedup(ctx):
    runs = []
    gate = trio.Event()

    async def handler(sender, kind, body, epoch):
        runs.append(body)
        if kind == "slow":
            await gate.wait()
        return len(runs)

    async with server(ctx, handler) as (srv, _):
        c = client(ctx, srv.endpoint)
        async with running(c):
            with trio.fail_after(15):
                # a retry of a finished request gets the cached reply
                rid = wire.new_id()
                assert await c.call("inc", "a", request_id=rid) == 1
                assert await c.call("inc", "a", request_id=rid) == 1
                assert await c.call("inc", "b") == 2
                assert srv.stats.cache_hits == 1

                # retries (same id) of a request still running are not run again
                async def release_after_duplicates():
                    await wait_until(lambda: srv.stats.duplicates >= 3, what="retries to reach the server")
                    gate.set()

                async with trio.open_nursery() as n:
                    n.start_soon(release_after_duplicates)
                    assert await c.call("slow", "s", timeout=10, retries=40) == 3
                assert runs == ["a", "b", "s"]


async def test_malformed_frames_are_dropped_and_logged(ctx, caplog):
    caplog.set_level(logging.WARNING, logger="agentmount.peer")
    async with server(ctx, max_message=4096) as (srv, _):
        raw = ctx.socket(zmq.DEALER)
        raw.curve_serverkey, raw.curve_publickey, raw.curve_secretkey = (k.encode() for k in (SERVER[0], *CLIENT))
        raw.connect(srv.endpoint)
        try:
            garbage = [
                [b"\xc1" + os.urandom(63)],                   # 0xc1: never valid msgpack
                [b"\x00"],
                [msgpack.packb(42)],
                [_raw(sender="c", v=99)],
                [_raw(sender="c", epoch="x")],
                [_raw(sender="c"), b"extra frame"],
                [_raw(sender="mallory")],                     # not the authenticated peer
                [_raw(sender="c", kind="$reply")],            # reserved kind
                [_raw(sender="c", body=b"x" * 5000)],         # over the server's max_message
            ]
            for frames in garbage:
                raw.send_multipart(frames)
            with trio.fail_after(10):
                await wait_until(lambda: srv.stats.malformed == len(garbage), what="garbage to be counted")
                # the server still answers, the raw socket included
                raw.send(_raw(sender="c", kind="echo", body="ok"))
                while True:
                    try:
                        reply = wire.decode(raw.recv(zmq.NOBLOCK))
                        break
                    except zmq.Again:
                        await trio.sleep(0.005)
                assert (reply.kind, reply.body, reply.id) == (wire.KIND_REPLY, "ok", b"i" * 16)
                c = client(ctx, srv.endpoint)
                async with running(c):
                    assert await c.call("echo", 1) == 1
        finally:
            raw.close(linger=0)
    reasons = [r.getMessage() for r in caplog.records if "event=bad_message" in r.getMessage()]
    assert len(reasons) == len(garbage)
    for needle in ["not valid msgpack", "envelope must be a map", "unsupported protocol version 99",
                   "epoch must be an int", "expected 1 frame, got 2", "is not the authenticated peer",
                   "reserved kind", "exceeds limit"]:
        assert any(needle in r for r in reasons), needle
    assert srv.stats.requests == 2


async def test_unlisted_key_is_refused(ctx, caplog):
    caplog.set_level(logging.WARNING, logger="agentmount.peer")
    calls = []

    async def handler(sender, kind, body, epoch):
        calls.append(sender)
        return sender

    async with server(ctx, handler) as (srv, auth):
        bad = client(ctx, srv.endpoint, pair=STRANGER, name="c")   # claims a listed name, wrong key
        good = client(ctx, srv.endpoint, pair=CLIENT2, name="c2")
        async with running(bad, good):
            with trio.fail_after(10):
                t0 = trio.current_time()
                with pytest.raises(PeerUnavailable):
                    await bad.call("echo", 1, timeout=0.7, retries=1)
                assert trio.current_time() - t0 < 1.5
                assert await good.call("echo", 1) == "c2"
                await wait_until(lambda: auth.stats.refused >= 1, what="the refusal")
            # a plaintext (no Curve) peer cannot talk to it either: its handshake fails
            plain = ctx.socket(zmq.DEALER)
            mon = plain.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            try:
                plain.connect(srv.endpoint)
                plain.send(_raw(sender="c", kind="echo"))
                await wait_until(lambda: mon.poll(0), what="the plaintext handshake to fail")
                assert await good.call("echo", 2) == "c2"
                assert not plain.poll(0)
            finally:
                plain.disable_monitor()
                mon.close(linger=0)
                plain.close(linger=0)
    assert calls == ["c2", "c2"]
    assert any("reason=unknown_key" in r.getMessage() and STRANGER[0] in r.getMessage() for r in caplog.records)


async def test_cancelled_calls_do_not_break_later_calls(ctx):
    entered = trio.Event()
    gate = trio.Event()

    async def handler(sender, kind, body, epoch):
        if kind == "block":
            entered.set()
            await gate.wait()
            return "late"
        await trio.sleep(random.random() * 0.002)
        return body

    async with server(ctx, handler) as (srv, _):
        c = client(ctx, srv.endpoint)
        async with running(c):
            with trio.fail_after(20):
                async with trio.open_nursery() as n:
                    scope = trio.CancelScope()

                    async def blocked():
                        with scope:
                            await c.call("block", timeout=30)
                        assert scope.cancelled_caught

                    n.start_soon(blocked)
                    await entered.wait()
                    scope.cancel()
                assert c.in_flight == 0
                replies = srv.stats.replies
                gate.set()
                await wait_until(lambda: srv.stats.replies == replies + 1, what="the late reply")
                assert await c.call("echo", "after") == "after"

                # a storm of calls cancelled at random moments, then everything still matches
                async def maybe_cancelled(i):
                    with trio.move_on_after(random.random() * 0.01):
                        assert await c.call("echo", i) == i

                async with trio.open_nursery() as n:
                    for i in range(500):
                        n.start_soon(maybe_cancelled, i)
                assert c.in_flight == 0
                results = []

                async def check(i):
                    results.append(await c.call("echo", i) == i)

                async with trio.open_nursery() as n:
                    for i in range(200):
                        n.start_soon(check, i)
                assert results == [True] * 200


async def test_pubsub_notices(ctx):
    pub2_keys = keys.generate()
    auth = Authenticator({CLIENT[0]: "sub", CLIENT2[0]: "sub2"}, context=ctx)
    p1 = Publisher("tcp://127.0.0.1:*", name="p1", secret_key=SERVER[1], auth=auth)
    p2 = Publisher("tcp://127.0.0.1:*", name="p2", secret_key=pub2_keys[1], auth=auth)
    sub = Subscriber(name="sub", public_key=CLIENT[0], secret_key=CLIENT[1], context=ctx)
    stranger = Subscriber(name="x", public_key=STRANGER[0], secret_key=STRANGER[1], context=ctx)
    async with running(auth, p1, p2, sub, stranger):
        sub.subscribe(b"ws/a/")
        sub.connect(p1.endpoint, SERVER[0])
        sub.connect(p2.endpoint, pub2_keys[0])
        stranger.subscribe(b"")
        stranger.connect(p1.endpoint, SERVER[0])
        got: dict[str, list] = {"p1": [], "p2": []}
        stranger_got = []

        async def collect():
            async for notice in sub:
                got[notice.sender].append(notice)

        async def collect_stranger():
            async for notice in stranger:
                stranger_got.append(notice)

        with trio.fail_after(15):
            async with trio.open_nursery() as n:
                n.start_soon(collect)
                n.start_soon(collect_stranger)
                # subscriptions propagate asynchronously: publish probes until both are through
                while not (got["p1"] and got["p2"]):
                    await p1.publish(b"ws/a/probe", "probe")
                    await p2.publish(b"ws/a/probe", "probe")
                    await trio.sleep(0.01)
                base = {k: len(v) for k, v in got.items()}
                for i in range(200):
                    await p1.publish(b"ws/b/x", {"seq": i})           # not subscribed
                    await p1.publish(b"ws/a/ino/1", {"seq": i}, epoch=3)
                    await p2.publish(b"ws/a/ino/2", {"seq": i}, epoch=4)
                await wait_until(lambda: len(got["p1"]) - base["p1"] == 200 and len(got["p2"]) - base["p2"] == 200,
                                 what="notices")
                await wait_until(lambda: auth.stats.refused >= 1, what="the stranger's refusal")
                n.cancel_scope.cancel()
        for name, topic, epoch in [("p1", b"ws/a/ino/1", 3), ("p2", b"ws/a/ino/2", 4)]:
            tail = got[name][base[name]:]
            assert [x.body["seq"] for x in tail] == list(range(200))
            assert {(x.topic, x.epoch, x.sender) for x in tail} == {(topic, epoch, name)}
        assert all(x.topic.startswith(b"ws/a/") for x in got["p1"] + got["p2"])
        assert stranger_got == []


# -- a server in another process -------------------------------------------------------------

def _serve_main(endpoint: str, secret: str, client_pub: str) -> None:
    """Entry point of the server subprocess: echo server, prints its endpoint when ready."""
    async def handler(sender, kind, body, epoch):
        if kind == "pid":
            return os.getpid()
        return body

    async def main():
        ctx = zmq.Context()
        auth = Authenticator({client_pub: "c"}, context=ctx)
        srv = RpcServer(endpoint, handler, name="s", secret_key=secret, auth=auth)
        async with running(auth, srv):
            print(srv.endpoint, flush=True)
            await trio.sleep_forever()

    trio.run(main)


@asynccontextmanager
async def server_process(endpoint: str = "tcp://127.0.0.1:*"):
    p = subprocess.Popen([sys.executable, __file__, "serve", endpoint, SERVER[1], CLIENT[0]], cwd=REPO,
                         stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        with trio.fail_after(20):
            line = await trio.to_thread.run_sync(p.stdout.readline)
        assert line.startswith("tcp://"), line
        yield p, line.strip()
    finally:
        if p.poll() is None:
            p.kill()
        await trio.to_thread.run_sync(p.wait)
        p.stdout.close()


async def test_server_killed_mid_traffic_then_restarted(ctx):
    timeout = 1.0
    async with server_process() as (proc, endpoint):
        c = client(ctx, endpoint, timeout=timeout, retries=2)
        async with running(c):
            with trio.fail_after(30):
                pid1 = await c.call("pid")
                ok = 0
                outcomes: list[tuple[str, float]] = []
                stop = trio.Event()

                async def worker(w):
                    nonlocal ok
                    i = 0
                    while not stop.is_set():
                        t0 = trio.current_time()
                        try:
                            assert await c.call("echo", [w, i]) == [w, i]
                            ok += 1
                        except PeerUnavailable:
                            outcomes.append(("unavailable", trio.current_time() - t0))
                            return
                        i += 1

                async with trio.open_nursery() as n:
                    for w in range(16):
                        n.start_soon(worker, w)
                    await wait_until(lambda: ok >= 300, what="traffic")
                    proc.send_signal(signal.SIGKILL)
                    await trio.to_thread.run_sync(proc.wait)
                    await wait_until(lambda: len(outcomes) == 16, timeout=timeout + 5, what="workers to see the death")
                    stop.set()
                assert all(kind == "unavailable" and dt < timeout + 0.5 for kind, dt in outcomes), outcomes

                # restart on the same port: calls succeed again
                async with server_process(endpoint) as (proc2, endpoint2):
                    assert endpoint2 == endpoint
                    t0 = trio.current_time()
                    while True:
                        try:
                            pid2 = await c.call("pid")
                            break
                        except PeerUnavailable:
                            assert trio.current_time() - t0 < 10, "no recovery after restart"
                    assert pid2 == proc2.pid != pid1
                    async with trio.open_nursery() as n:
                        for i in range(100):
                            async def one(i=i):
                                assert await c.call("echo", i) == i
                            n.start_soon(one)


async def test_throughput_report(ctx, capsys):
    """Round trips/s with 1 KiB bodies, Curve on, server in another process (a report, not a gate)."""
    async with server_process() as (_, endpoint):
        c = client(ctx, endpoint, timeout=10)
        body = os.urandom(1024)
        async with running(c):
            with trio.fail_after(30):
                for _ in range(200):
                    await c.call("echo", body)
                n_seq, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < 1.5:
                    assert await c.call("echo", body) == body
                    n_seq += 1
                seq = n_seq / (time.perf_counter() - t0)

                n_par, end = 0, time.perf_counter() + 1.5

                async def worker():
                    nonlocal n_par
                    while time.perf_counter() < end:
                        assert await c.call("echo", body) == body
                        n_par += 1

                t0 = time.perf_counter()
                async with trio.open_nursery() as n:
                    for _ in range(64):
                        n.start_soon(worker)
                par = n_par / (time.perf_counter() - t0)
    with capsys.disabled():
        print(f"\n[peer transport] 1 KiB echo, Curve, loopback: sequential {seq:,.0f} round trips/s "
              f"(mean {1e6 / seq:.0f} us); 64 in flight {par:,.0f} round trips/s")
    assert seq > 50 and par > 50


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        _serve_main(*sys.argv[2:5])
