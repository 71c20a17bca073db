"""S3Store against real SeaweedFS servers (tests/seaweed.py): the ObjectStore contract,
big objects, error classification, timeouts and cancellation on a hung server."""
from __future__ import annotations

import os
import time

import pytest
import trio

from backend import s3 as s3mod
from backend.s3 import S3Store
from backend.store import AlreadyExists, StoreError, StoreUnavailable
from tests.store_contract import check_contract
from tests.seaweed import SeaweedServer, free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    """One server shared by this module's tests (each uses its own key prefix)."""
    srv = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    try:
        srv.start()
        srv.create_bucket("agentmount")
        yield srv
    finally:
        srv.cleanup(graceful=False)


@pytest.fixture
async def store(seaweed, request):
    s = seaweed.store("s3test", prefix=f"t/{request.node.name}/", timeout=10)
    try:
        yield s
    finally:
        if seaweed.paused:
            seaweed.resume()
        await s.aclose()


async def test_s3_store_contract(store, seaweed):
    s = store
    await check_contract(store)
    # Keys are stored below the prefix, and listed without it.
    raw = seaweed.store("raw")
    try:
        assert f"{s.prefix}ws/a/blocks/x1" in await raw.list_keys(s.prefix)
        assert await raw.get(f"{s.prefix}ws/a/blocks/x1") == b"replaced"
    finally:
        await raw.aclose()


async def test_prefix_is_normalised(seaweed):
    for p in ("pfx", "pfx/", "/pfx/"):
        assert S3Store("n", bucket="b", prefix=p).prefix == "pfx/"
    assert S3Store("n", bucket="b", prefix="").prefix == ""
    assert S3Store("n", bucket="b").is_local is False


async def test_big_objects_and_buffer_lists(store):
    s = store
    for size in (4 << 20, (4 << 20) + 37):
        data = os.urandom(size)
        a, b = 7, size // 2
        await s.put(f"big/{size}", [data[:a], memoryview(data)[a:b], bytearray(data[b:])])
        assert await s.get(f"big/{size}") == data
        assert await s.get(f"big/{size}", b - 5, b + 5) == data[b - 5:b + 5]
        assert await s.get(f"big/{size}", size - 3) == data[-3:]
        assert (await s.head(f"big/{size}")).size == size
        await s.put(f"big/{size}-bytes", data)
        assert await s.get(f"big/{size}-bytes") == data


async def test_list_pages_and_byte_order(store, monkeypatch):
    monkeypatch.setattr(s3mod, "_LIST_PAGE", 3)
    keys = ["d/a/x", "d/a-b/x", "d/a.b", "d/a0", "d/a/y/z", "d/b", "d/\u00e9", "d/Z"]
    async with trio.open_nursery() as n:
        for k in keys:
            n.start_soon(store.put, k, k.encode())
    assert await store.list_keys("d/") == sorted(keys)
    assert await store.list_keys("d/a") == sorted(k for k in keys if k.startswith("d/a"))


async def test_create_only_race_has_one_winner(store):
    wins: list[int] = []

    async def writer(i: int) -> None:
        try:
            await store.put("race/slot", f"writer {i}".encode(), create_only=True)
            wins.append(i)
        except AlreadyExists:
            pass

    async with trio.open_nursery() as n:
        for i in range(5):
            n.start_soon(writer, i)
    assert len(wins) == 1
    assert await store.get("race/slot") == f"writer {wins[0]}".encode()


async def _timed(coro_fn, *args):
    t = time.monotonic()
    try:
        await coro_fn(*args)
    except StoreError as e:
        return e, time.monotonic() - t
    return None, time.monotonic() - t


async def test_check_names_the_store_and_the_cause(seaweed):
    stores = {
        "missing bucket": seaweed.store("nobucket", bucket="no-such-bucket"),
        "bad credentials": seaweed.store("badcreds", secret_key="wrong-secret"),
        "unreachable": S3Store("unreach", bucket="agentmount", endpoint=f"http://127.0.0.1:{free_port()}",
                               access_key="k", secret_key="s", timeout=5),
    }
    try:
        errors = {}
        for what, s in stores.items():
            e, dt = await _timed(s.check)
            assert e is not None, what
            assert dt < 4, (what, dt)
            assert s.name in str(e) and s.bucket in str(e) and seaweed.endpoint.rsplit(":", 1)[0] in str(e)
            assert "\n" not in str(e)
            errors[what] = e
        assert "bucket missing" in str(errors["missing bucket"])
        assert not isinstance(errors["missing bucket"], StoreUnavailable)
        assert "bad credentials" in str(errors["bad credentials"])
        assert not isinstance(errors["bad credentials"], StoreUnavailable)
        assert "unreachable" in str(errors["unreachable"])
        assert isinstance(errors["unreachable"], StoreUnavailable)
        # Data calls classify the same way: permanent for 403, transient for a dead endpoint.
        e, _ = await _timed(stores["bad credentials"].get, "k")
        assert type(e) is StoreError and "403" in str(e)
        e, _ = await _timed(stores["missing bucket"].put, "k", b"x")
        assert type(e) is StoreError and "NoSuchBucket" in str(e)
        e, dt = await _timed(stores["unreachable"].put, "k", b"x")
        assert isinstance(e, StoreUnavailable) and dt < 4
    finally:
        for s in stores.values():
            await s.aclose()


async def test_paused_server_gives_store_unavailable_within_timeout(seaweed):
    s = seaweed.store("paused", prefix="t/paused/", timeout=2)
    try:
        await s.put("k", b"v")
        seaweed.pause()
        for call in (lambda: s.get("k"), lambda: s.put("k2", os.urandom(1 << 20)), lambda: s.head("k")):
            t = time.monotonic()
            with pytest.raises(StoreUnavailable) as ei:
                await call()
            dt = time.monotonic() - t
            assert 1.9 < dt < 2.8, dt
            assert "timed out" in str(ei.value) and "paused" in str(ei.value)
        seaweed.resume()
        assert await s.get("k") == b"v"
    finally:
        if seaweed.paused:
            seaweed.resume()
        await s.aclose()


async def test_cancelled_get_on_a_paused_server_returns_promptly(seaweed):
    s = seaweed.store("cancel", prefix="t/cancel/", timeout=30)
    try:
        await s.put("big", os.urandom(4 << 20))
        seaweed.pause()
        for key in ("big", "big", "missing"):
            t = time.monotonic()
            with trio.move_on_after(0.3) as cs:
                await s.get(key)
            assert cs.cancelled_caught
            assert time.monotonic() - t < 0.8
        t = time.monotonic()
        with trio.move_on_after(0.3):  # many calls in flight
            async with trio.open_nursery() as n:
                for _ in range(10):
                    n.start_soon(s.get, "big")
        assert time.monotonic() - t < 0.8
        seaweed.resume()
        assert len(await s.get("big")) == 4 << 20
    finally:
        if seaweed.paused:
            seaweed.resume()
        loop_thread = s._loop
        await s.aclose()
    # The last store to close stops and joins the shared loop thread.
    assert loop_thread.users > 0 or not loop_thread.thread.is_alive()


async def test_crash_and_restart(seaweed_cluster):
    a, b = seaweed_cluster(2)
    assert a.endpoint != b.endpoint
    sa, sb = a.store("a", timeout=3), b.store("b", timeout=3)
    try:
        await sa.put("k", b"on a")
        await sb.put("k", b"on b")
        a.kill()
        e, dt = await _timed(sa.get, "k")
        assert isinstance(e, StoreUnavailable) and dt < 3.5
        assert await sb.get("k") == b"on b"
        a.restart()
        with trio.fail_after(20):  # the filer may need a moment after a crash
            while True:
                try:
                    assert await sa.get("k") == b"on a"
                    break
                except StoreUnavailable:
                    await trio.sleep(0.2)
    finally:
        await sa.aclose()
        await sb.aclose()


async def test_create_only_put_whose_answer_was_lost(store, monkeypatch):
    """The first attempt is stored but its answer lost (a connection error injected after
    the real PUT): the retry's 412 is our own write, not AlreadyExists. Another writer's
    object under the key still gives AlreadyExists."""
    from botocore.exceptions import ConnectionClosedError

    real_run = s3mod._LoopThread.run
    lose = {"n": 0, "before": False}

    async def run(self, fn, *args):
        inject = lose["n"] and fn.__qualname__.startswith("S3Store.put")
        if inject and lose["before"]:
            lose["n"] -= 1
            raise ConnectionClosedError(endpoint_url="injected")
        result = await real_run(self, fn, *args)
        if inject:
            lose["n"] -= 1
            raise ConnectionClosedError(endpoint_url="injected")
        return result

    monkeypatch.setattr(s3mod._LoopThread, "run", run)
    lose["n"] = 1
    await store.put("lost/mine", b"my bytes", create_only=True)
    assert lose["n"] == 0
    assert await store.get("lost/mine") == b"my bytes"
    await store.put("lost/theirs", b"their bytes")
    lose.update(n=1, before=True)
    with pytest.raises(AlreadyExists):
        await store.put("lost/theirs", b"my bytes", create_only=True)
    assert lose["n"] == 0
    assert await store.get("lost/theirs") == b"their bytes"


def test_a_request_body_the_server_dropped_is_not_logged_as_an_error(caplog):
    """aiohttp writes a request body in a task of its own. When a store dies mid-request that
    task's ConnectionResetError is never retrieved (the request fails and is retried): asyncio
    would log it with a traceback at error level. Any other unretrieved exception still is."""
    import asyncio
    import gc
    import logging

    lt = s3mod._LoopThread.acquire()
    try:
        assert lt.loop.get_exception_handler() is s3mod._loop_exception
    finally:
        lt.release()

    async def dropped_body() -> None:
        raise ConnectionResetError("Cannot write to closing transport")

    async def bug() -> None:
        raise ValueError("a bug")

    loop = asyncio.new_event_loop()
    loop.set_exception_handler(s3mod._loop_exception)
    try:
        with caplog.at_level(logging.DEBUG):
            for fn in (dropped_body, bug):
                task = loop.create_task(fn())
                loop.run_until_complete(asyncio.wait([task]))
                del task
                gc.collect()
    finally:
        loop.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [type(r.exc_info[1]) for r in errors] == [ValueError]
    assert any("request body not sent" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
