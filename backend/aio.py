"""`FdSyncer`: fdatasync without a worker thread, through the kernel's native AIO.

Why: a durable `close()` waits for one journal append, which is a small write and an
fdatasync. Through a worker thread the hand-off cost more than the flush itself (measured
on 2 vCPUs: 290-340 µs and 190-210 µs of CPU per append, against 190-250 µs and 45 µs of
CPU here). The kernel runs an IOCB_CMD_FDSYNC on a kernel worker and signals an eventfd
that trio waits on, so the event loop never blocks on the disk and no Python thread wakes.

Invariants: one AIO context per syncer, opened lazily on the trio thread that uses it;
each submitted request's control block stays referenced until its completion is reaped,
even when the waiting task was cancelled (the kernel writes into it). Where native AIO is
refused (seccomp, `aio-max-nr` exhausted, ENOSYS) `available()` turns False for good and
callers use their thread path.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform

import trio

log = logging.getLogger("backend.aio")

_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}   # setup, destroy, getevents, submit
_IOCB_CMD_FDSYNC = 3
_IOCB_FLAG_RESFD = 1
_MAX_EVENTS = 128


class NotSubmitted(OSError):
    """The kernel did not take the request (queue full, or AIO refused): nothing was flushed,
    the caller flushes another way."""


class _IOCB(ctypes.Structure):
    # struct iocb of <linux/aio_abi.h>, little-endian layout
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32), ("aio_rw_flags", ctypes.c_int32),
                ("aio_lio_opcode", ctypes.c_uint16), ("aio_reqprio", ctypes.c_int16),
                ("aio_fildes", ctypes.c_uint32), ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64), ("aio_flags", ctypes.c_uint32),
                ("aio_resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


class _Request:
    __slots__ = ("iocb", "ptr", "result", "done")

    def __init__(self, iocb: _IOCB) -> None:
        self.iocb = iocb
        self.ptr = (ctypes.POINTER(_IOCB) * 1)(ctypes.pointer(iocb))
        self.result: int | None = None
        self.done = trio.Event()


def _libc():
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        return lib
    except (OSError, AttributeError):  # pragma: no cover - glibc and musl both export syscall
        return None


class FdSyncer:
    """fdatasync(fd) as an awaitable that neither blocks the trio loop nor wakes a thread."""

    def __init__(self) -> None:
        self._state = "new"          # new | ready | off
        self._ctx = ctypes.c_ulong(0)
        self._efd = -1
        self._lib = None
        self._nrs = _SYSCALLS.get(platform.machine())
        self._pending: dict[int, _Request] = {}
        self._next = 1
        self._reaping = False
        self._reaped = trio.Event()
        self._events = (_Event * _MAX_EVENTS)()
        self._zero = (ctypes.c_long * 2)(0, 0)     # timespec {0, 0}: never wait in io_getevents

    def available(self) -> bool:
        if self._state == "new":
            self._open()
        return self._state == "ready"

    def _open(self) -> None:
        self._state = "off"
        self._lib = _libc()
        if self._lib is None or self._nrs is None or not hasattr(os, "eventfd"):
            return
        if self._lib.syscall(self._nrs[0], _MAX_EVENTS, ctypes.byref(self._ctx)) != 0:
            log.info("native AIO unavailable (%s); journal flushes use worker threads",
                     os.strerror(ctypes.get_errno()))
            return
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError as e:
            self._lib.syscall(self._nrs[1], self._ctx)
            log.info("no eventfd (%s); journal flushes use worker threads", e.strerror)
            return
        self._state = "ready"

    def _off(self, why: str) -> None:
        log.info("native AIO fdatasync refused (%s); journal flushes use worker threads", why)
        self._state = "off"

    async def fdatasync(self, fd: int) -> None:
        """Flush `fd`'s data (and size) to disk; OSError as fdatasync would raise it, or
        `NotSubmitted` when the kernel would not take the request. Call only after
        `available()` said True."""
        token, self._next = self._next, self._next + 1
        req = _Request(_IOCB(aio_data=token, aio_lio_opcode=_IOCB_CMD_FDSYNC, aio_fildes=fd,
                             aio_flags=_IOCB_FLAG_RESFD, aio_resfd=self._efd))
        if self._lib.syscall(self._nrs[3], self._ctx, 1, req.ptr) != 1:
            err = ctypes.get_errno()
            if err == errno.EBADF:
                raise OSError(err, os.strerror(err))
            if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP) and not self._pending:
                self._off(os.strerror(err))     # e.g. a file system without AIO fsync: never again
            raise NotSubmitted(err, f"io_submit: {os.strerror(err)}")
        self._pending[token] = req
        while not req.done.is_set():
            if self._reaping:
                await self._reaped.wait()       # another waiter reaps; it wakes us after each round
                continue
            self._reaping = True
            try:
                await trio.lowlevel.wait_readable(self._efd)
                self._reap()
            finally:
                self._reaping = False
                ev, self._reaped = self._reaped, trio.Event()
                ev.set()
        if req.result < 0:
            raise OSError(-req.result, os.strerror(-req.result))

    def _reap(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            return
        while self._pending:
            n = self._lib.syscall(self._nrs[2], self._ctx, 0, _MAX_EVENTS, self._events, self._zero)
            if n <= 0:
                return
            for i in range(n):
                ev = self._events[i]
                req = self._pending.pop(ev.data, None)
                if req is not None:
                    req.result = ev.res
                    req.done.set()
            if n < _MAX_EVENTS:
                return

    def close(self) -> None:
        """Release the context (completions still in flight are dropped with it)."""
        if self._state == "ready":
            self._lib.syscall(self._nrs[1], self._ctx)
            os.close(self._efd)
        self._state = "off"
        self._pending.clear()
