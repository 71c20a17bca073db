"""Trio-native wrapper around one pyzmq socket (see STACK.md, "ZeroMQ from trio").

Owns: waiting for a zmq socket to become readable/writable from trio, and
closing it. Nothing here knows about messages or peers.

Design and invariants:
- The socket's ZMQ_FD is edge-triggered ("events may have changed"). Exactly
  one task, the pump (`ZSocket.run`), ever waits on it with
  `trio.lowlevel.wait_readable`.
- Operations are non-blocking (`zmq.NOBLOCK`). A task that gets EAGAIN parks
  in a FIFO parking lot (readers or writers).
- Any zmq call (send, recv, a failed attempt, reading ZMQ_EVENTS) may consume
  the FD's edge, so after every send, recv, EAGAIN and pump wakeup we re-read
  ZMQ_EVENTS and unpark ONE reader if POLLIN and ONE writer if POLLOUT (never
  all of them: that collapses throughput). A woken task that then finds
  nothing re-parks; a woken task that succeeds passes the baton on by kicking
  again, so a burst drains reader by reader with no missed wakeups.
- A task never re-checks cancellation between being unparked and trying its
  operation, so a wakeup is never swallowed by a cancelled task.
- After a successful recv or send, only a cancel-shielded checkpoint follows:
  an operation that happened is always reported, never lost to cancellation.
- ROUTER sockets get ROUTER_MANDATORY=1 (unroutable sends raise
  EHOSTUNREACH, a full per-peer pipe gives EAGAIN instead of a silent drop).
  On a mandatory ROUTER, POLLOUT means "some pipe has room", not the one we
  want, so a writer that fails while POLLOUT is set retries on a short
  backoff as well as on wakeups (no busy loop, no hang).
- Dispatch mode (`run(dispatch=f)`, for single-consumer sockets): the pump
  itself reads and hands each message to the synchronous `f`, saving a task
  switch per wakeup. It then counts as the parked reader: a kick that sees
  POLLIN while it waits on the FD cancels its wait scope so it drains again.
- `try_send`/`try_recv` are the synchronous halves (no checkpoint at all) for
  hot paths that checkpoint on their own; they keep the kick rules above.
- When the pump ends (its nursery is cancelled or the socket is closed) the
  socket is closed with linger 0 and parked tasks get `trio.ClosedResourceError`.
"""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, Sequence

import trio
import zmq

log = logging.getLogger("agentmount.peer")

_BACKOFF_MIN = 0.001
_BACKOFF_MAX = 0.05
DISPATCH_BATCH = 64   # messages a dispatching pump hands on before yielding to other tasks

_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)


class ZSocket:
    """A pyzmq socket usable from many trio tasks at once.

    Configure, bind and connect through `raw` (synchronous calls); start `run`
    (the pump) in a nursery before or after; then `send_multipart` and
    `recv_multipart` from any number of tasks. `try_send`/`try_recv` are the
    synchronous, non-parking halves for hot loops that checkpoint on their own.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self.raw = sock
        sock.setsockopt(zmq.LINGER, 0)
        if sock.type == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._fd: int = sock.getsockopt(zmq.FD)
        self._readers = trio.lowlevel.ParkingLot()
        self._writers = trio.lowlevel.ParkingLot()
        self._closed = False
        self._pumping = False
        self._pump_wake: trio.CancelScope | None = None  # set while a dispatching pump waits

    # -- the pump -----------------------------------------------------------------------------
    def _kick(self) -> int:
        """Re-read ZMQ_EVENTS and unpark one reader / one writer that can proceed."""
        ev = self.raw.getsockopt(_EVENTS)
        if ev & _POLLIN:
            if self._readers:
                self._readers.unpark()
            elif self._pump_wake is not None:
                self._pump_wake.cancel()
        if ev & _POLLOUT and self._writers:
            self._writers.unpark()
        return ev

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  dispatch: Callable[[list], Awaitable[None] | None] | None = None,
                  copy: bool = True) -> None:
        """The pump: the only waiter on ZMQ_FD. Closes the socket when it ends.

        With `dispatch`, the pump itself is the socket's only reader: it hands
        every received message to `dispatch` (synchronous, so no message can be
        lost to cancellation), draining bursts `DISPATCH_BATCH` messages per
        scheduler turn; this saves a task switch per wakeup on hot sockets.
        If `dispatch` returns an awaitable, the pump awaits it before reading
        on (back-pressure). Do not call the recv methods on such a socket.
        """
        if self._pumping:
            raise RuntimeError("pump already running")
        if self._closed:
            raise trio.ClosedResourceError("socket is closed")
        self._pumping = True
        task_status.started()
        try:
            while True:
                if dispatch is not None:
                    for _ in range(DISPATCH_BATCH):
                        try:
                            msg = self.try_recv(copy=copy)
                        except trio.ClosedResourceError:
                            return
                        if msg is None:
                            break
                        pause = dispatch(msg)
                        if pause is not None:
                            await pause
                    else:
                        await trio.lowlevel.checkpoint()  # more may be queued: yield, then go on
                        continue
                    # Another task's kick may consume the FD edge while we wait: it then
                    # cancels this scope (the dispatching pump counts as a parked reader).
                    self._pump_wake = trio.CancelScope()
                else:
                    self._kick()
                try:
                    if self._pump_wake is not None:
                        with self._pump_wake:
                            await trio.lowlevel.wait_readable(self._fd)
                        self._pump_wake = None
                    else:
                        await trio.lowlevel.wait_readable(self._fd)
                except trio.ClosedResourceError:
                    return
        finally:
            self._pumping = False
            self._close_now()

    # -- closing --------------------------------------------------------------------------------
    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._readers.unpark_all()
        self._writers.unpark_all()
        self.raw.close(linger=0)

    def close(self) -> None:
        """Close now (linger 0). Safe to call from any task, and more than once."""
        if self._closed:
            return
        if self._pumping:
            trio.lowlevel.notify_closing(self._fd)  # the pump wakes with ClosedResourceError
        self._close_now()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- receiving ------------------------------------------------------------------------------
    def try_recv(self, *, copy: bool = True) -> list | None:
        """Receive one multipart message if one is ready, else None (never parks)."""
        if self._closed:
            raise trio.ClosedResourceError("socket is closed")
        raw = self.raw
        for _ in range(2):
            try:
                part = raw.recv(_NOBLOCK, copy=copy)
            except zmq.Again:
                ev = raw.getsockopt(_EVENTS)
                if ev & _POLLOUT and self._writers:
                    self._writers.unpark()
                if ev & _POLLIN:
                    continue  # the failed attempt itself made a message available
                return None
            msg = [part]
            while raw.getsockopt(_RCVMORE):
                msg.append(raw.recv(_NOBLOCK, copy=copy))
            self._kick()
            return msg
        return None

    async def wait_recv(self) -> None:
        """Park until the pump (or another task) reports the socket readable.

        Only call right after `try_recv` returned None, with no checkpoint in
        between; may return spuriously (try again)."""
        if self._closed:
            raise trio.ClosedResourceError("socket is closed")
        await self._readers.park()

    async def recv_multipart(self, *, copy: bool = True) -> list:
        """Receive one multipart message (list of bytes, or of zmq.Frame if copy=False)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            msg = self.try_recv(copy=copy)
            if msg is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return msg
            await self._readers.park()

    # -- sending --------------------------------------------------------------------------------
    def try_send(self, frames: Sequence[bytes | zmq.Frame], *, copy: bool = True) -> bool:
        """Send one multipart message if the socket takes it now; False on EAGAIN.

        zmq accepts or refuses a multipart message as a whole (the high-water
        mark is checked on the first part only). Raises zmq.ZMQError for hard
        errors (e.g. EHOSTUNREACH on a ROUTER for an unknown peer).
        """
        if self._closed:
            raise trio.ClosedResourceError("socket is closed")
        raw = self.raw
        last = len(frames) - 1
        try:
            raw.send(frames[0], _NOBLOCK | _SNDMORE if last else _NOBLOCK, copy=copy)
        except zmq.Again:
            ev = raw.getsockopt(_EVENTS)
            if ev & _POLLIN:
                if self._readers:
                    self._readers.unpark()
                elif self._pump_wake is not None:
                    self._pump_wake.cancel()
            return False
        for i in range(1, last + 1):
            raw.send(frames[i], _NOBLOCK | _SNDMORE if i < last else _NOBLOCK, copy=copy)
        self._kick()
        return True

    async def send_multipart(self, frames: Sequence[bytes | zmq.Frame], *, copy: bool = True) -> None:
        """Send one multipart message, waiting while the socket is not writable."""
        await trio.lowlevel.checkpoint_if_cancelled()
        backoff = _BACKOFF_MIN
        while not self.try_send(frames, copy=copy):
            if not self.raw.getsockopt(_EVENTS) & _POLLOUT:
                await self._writers.park()  # the pump or a kick wakes us when writable
                continue
            # POLLOUT set yet EAGAIN: a mandatory ROUTER's pipe to this peer is full.
            # Do not wake other writers (they may be stuck on the same pipe: ping-pong);
            # retry on the next wakeup or after a short backoff, whichever comes first.
            with trio.move_on_after(backoff):
                await self._writers.park()
            backoff = min(backoff * 2, _BACKOFF_MAX)
        await trio.lowlevel.cancel_shielded_checkpoint()


@asynccontextmanager
async def open_zsocket(context: zmq.Context, socket_type: int,
                       setup: Callable[[zmq.Socket], None] | None = None) -> AsyncIterator[ZSocket]:
    """Create a socket, let `setup(raw)` configure/bind/connect it, run its pump,
    and close it (linger 0) when the block exits."""
    raw = context.socket(socket_type)
    try:
        zs = ZSocket(raw)
        if setup is not None:
            setup(raw)
    except BaseException:
        raw.close(linger=0)
        raise
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(zs.run)
            try:
                yield zs
            finally:
                nursery.cancel_scope.cancel()
    finally:
        zs.close()


class LogLimiter:
    """Log at most `burst` warnings per `window` seconds; count and report the rest.

    Peers can send garbage at line rate; the log must not become the bottleneck.
    """

    def __init__(self, logger: logging.Logger, burst: int = 20, window: float = 10.0) -> None:
        self._log = logger
        self._burst = burst
        self._window = window
        self._start = -1e18
        self._count = 0
        self._suppressed = 0

    def warning(self, fmt: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._start >= self._window:
            if self._suppressed:
                self._log.warning("event=log_suppressed count=%d window_s=%g", self._suppressed, self._window)
            self._start, self._count, self._suppressed = now, 0, 0
        if self._count < self._burst:
            self._count += 1
            self._log.warning(fmt, *args, stacklevel=2)  # attribute the record to our caller
        else:
            self._suppressed += 1

