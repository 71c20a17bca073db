"""Appends to a LocalStore object (journal logs): the held-open fast path, flushed through
native AIO (`backend.aio.FdSyncer`) on real files, and the worker-thread path it falls back to."""
from __future__ import annotations

import errno
import os

import pytest
import trio

from backend.aio import FdSyncer
from backend.local import LocalStore
from backend.store import StoreError

KEY = "ws/w/journal/0000000001-0000000000000001.log"


def test_fdsyncer_flushes_many_at_once_and_survives_a_cancelled_waiter(tmp_path):
    async def main():
        s = FdSyncer()
        assert s.available(), "native AIO is expected on Linux hosts without a seccomp filter"
        fds = [os.open(tmp_path / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600) for i in range(12)]
        try:
            for fd in fds:
                os.write(fd, b"x" * 4096)
            async with trio.open_nursery() as n:       # several waiters share one eventfd
                for fd in fds:
                    n.start_soon(s.fdatasync, fd)
            with trio.move_on_after(0):                # submitted, then its waiter is cancelled
                await s.fdatasync(fds[0])
            with trio.fail_after(10):                  # the next one reaps both
                await s.fdatasync(fds[1])
                while s._pending:
                    await s.fdatasync(fds[2])
            closed = os.open(tmp_path / "g", os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(closed)
            with pytest.raises(OSError) as e:
                await s.fdatasync(closed)
            assert e.value.errno == errno.EBADF
            assert s.available()                       # a bad fd does not turn AIO off
        finally:
            for fd in fds:
                os.close(fd)
            s.close()
    trio.run(main)


@pytest.mark.parametrize("aio", [True, False])
def test_appends_read_back_exactly_with_or_without_aio(tmp_path, aio):
    async def main():
        store = LocalStore(str(tmp_path / "s"))
        if not aio:
            store._syncer._state = "off"               # as where io_setup is refused
        await store.write_at(KEY, b"a" * 100, 0)
        assert (KEY in store._appends) == aio          # held open after the first (thread) append
        await store.write_at(KEY, [b"b" * 50, b"c" * 50], 100)
        await store.write_at(KEY, b"d" * 10, 200)
        assert await store.get(KEY) == b"a" * 100 + b"b" * 50 + b"c" * 50 + b"d" * 10
        await store.write_at(KEY, b"e" * 5, 150)       # over a torn tail: cut there, then append
        assert await store.get(KEY) == b"a" * 100 + b"b" * 50 + b"e" * 5
        with pytest.raises(StoreError):
            await store.write_at(KEY, b"f", 1000)      # past the end: refused, nothing written
        assert await store.get(KEY) == b"a" * 100 + b"b" * 50 + b"e" * 5
        big = os.urandom(200 << 10)                     # too big for the trio thread: via a worker
        await store.write_at(KEY, big, 155)
        assert (await store.get(KEY))[155:] == big
        await store.delete(KEY)                         # closes what was held open
        assert KEY not in store._appends and await store.head(KEY) is None
        await store.write_at(KEY, b"new", 0)
        await store.put(KEY, b"replaced")              # a put over it drops the held fd too
        assert KEY not in store._appends
        await store.write_at(KEY, b"!", 8)
        assert await store.get(KEY) == b"replaced!"
        await store.aclose()
        assert not store._appends
    trio.run(main)


def test_an_append_the_kernel_refuses_to_flush_is_flushed_by_a_thread(tmp_path):
    import ctypes

    async def main():
        store = LocalStore(str(tmp_path / "s"))
        await store.write_at(KEY, b"a" * 10, 0)
        assert KEY in store._appends
        real = store._syncer._ctx
        store._syncer._ctx = ctypes.c_ulong(0)          # io_submit on no context: EINVAL
        await store.write_at(KEY, b"b" * 10, 10)        # still durable, through a worker thread
        assert not store._syncer.available()            # and AIO is not tried again
        await store.write_at(KEY, b"c" * 10, 20)
        assert await store.get(KEY) == b"a" * 10 + b"b" * 10 + b"c" * 10
        store._syncer._ctx = real
        store._syncer._state = "ready"
        await store.aclose()
    trio.run(main)
