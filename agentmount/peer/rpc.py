"""Peer RPC and change notices over CurveZMQ: RpcServer, RpcClient, Publisher, Subscriber.

Owns request/reply matching, deadlines and retries, idempotent dedup of
retried requests, error transport, and PUB/SUB notices. It knows nothing of
leases, leaders or namespaces: those layers plug in a handler and call
`RpcClient.call`.

Wire (all payloads are `wire.Envelope`s):
- request:  DEALER -> ROUTER, one frame ``envelope(kind, id, epoch, sender, body)``
- reply:    ROUTER -> DEALER, one frame ``envelope("$reply", same id, server epoch, server, result)``
- error:    same with kind ``"$error"`` and body ``{"code": str, "message": str}``
- notice:   PUB -> SUB, two frames ``topic, envelope("$notice", fresh id, epoch, publisher, body)``

Invariants:
- Every socket is Curve-encrypted; servers (ROUTER, PUB) accept only keys
  listed in their context's `keys.Authenticator`, and refuse to start if it is
  not running. The handler's `sender` is the ZAP-authenticated peer name;
  a request whose envelope `sender` differs is dropped.
- The server never crashes on peer input: malformed messages are dropped and
  logged (rate-limited, with the reason); handler exceptions become error
  replies (`RemoteError` on the client); at most `max_concurrency` handlers run
  at once and the socket's pump stops reading until a slot frees
  (back-pressure through zmq's queues to the clients).
- A request id (per authenticated peer) is handled at most once while it is
  remembered: duplicates of a running request are answered when it finishes;
  duplicates of a finished one get the cached reply (bounded LRU, TTL
  `dedup_ttl`). Keep `dedup_ttl` longer than any call's timeout. The cache is
  in memory: a retry that reaches a *restarted* server runs again, so
  handlers that must be exactly-once need their own idempotency (epochs).
- `RpcClient.call` never outlives its timeout: it raises `PeerUnavailable`
  when the deadline passes (peer dead, unreachable, refusing our key, or
  slow). Retries reuse the request id, so the server runs it at most once.
  Late replies to abandoned calls are ignored.
- Notices are hints, not a log: PUB/SUB drops on overload and for
  subscribers that were not connected yet. Consumers must tolerate loss
  (e.g. carry a sequence number in the body and resync on a gap).
"""
from __future__ import annotations

import errno
import heapq
import itertools
import logging
import math
import time
from collections import OrderedDict
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import trio
import zmq

from . import wire
from .keys import Authenticator, load_key
from .wire import BadMessage, Envelope
from .zsock import LogLimiter, ZSocket

log = logging.getLogger("agentmount.peer")

Handler = Callable[[str, str, Any, "int | None"], Awaitable[Any]]


RETRYABLE_CODES = frozenset({"not_leader"})


class PeerError(Exception):
    """Base class of the errors a peer call can raise."""


class PeerUnavailable(PeerError):
    """No reply from `peer` before the call's deadline (or the client is closed)."""

    def __init__(self, peer: str, kind: str, reason: str) -> None:
        super().__init__(f"peer {peer!r} unavailable for {kind!r}: {reason}")
        self.peer = peer
        self.kind = kind
        self.reason = reason


class RemoteError(PeerError):
    """The remote handler failed. Handlers raise it to choose `code`; any other
    exception reaches the caller as code "internal"."""

    def __init__(self, code: str, message: str = "", *, epoch: int | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.epoch = epoch


@dataclass(frozen=True, slots=True)
class Notice:
    topic: bytes
    sender: str
    epoch: int | None
    id: bytes
    body: Any


def _endpoint(raw: zmq.Socket) -> str:
    return raw.getsockopt(zmq.LAST_ENDPOINT).decode()


def _bind_server(auth: Authenticator, kind: int, secret_key: str, endpoint: str,
                 opts: dict[int, int]) -> tuple[ZSocket, str]:
    """A Curve-server socket of `kind` bound at `endpoint`; returns it and the bound endpoint."""
    raw = auth.context.socket(kind)
    try:
        zs = ZSocket(raw)
        for opt, value in opts.items():
            raw.setsockopt(opt, value)
        _curve_server(raw, secret_key, auth)
        raw.bind(endpoint)
        return zs, _endpoint(raw)
    except BaseException:
        raw.close(linger=0)
        raise


def _curve_server(raw: zmq.Socket, secret_key: str, auth: Authenticator) -> None:
    raw.setsockopt(zmq.CURVE_SERVER, 1)
    raw.setsockopt(zmq.CURVE_SECRETKEY, load_key(secret_key, "secret_key").encode())
    raw.setsockopt(zmq.ZAP_DOMAIN, auth.domain.encode())


def _curve_client(raw: zmq.Socket, public_key: str, secret_key: str, server_key: str) -> None:
    raw.setsockopt(zmq.CURVE_SERVERKEY, load_key(server_key, "server public_key").encode())
    raw.setsockopt(zmq.CURVE_PUBLICKEY, load_key(public_key, "public_key").encode())
    raw.setsockopt(zmq.CURVE_SECRETKEY, load_key(secret_key, "secret_key").encode())


def _check_auth(auth: Authenticator, what: str) -> None:
    if not auth.running:
        raise RuntimeError(f"{what}: the Authenticator of its zmq context must be running first "
                           "(without a ZAP handler libzmq accepts every Curve key)")


def _user_id(frame: zmq.Frame) -> str | None:
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


class Service(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[Any] = ...) -> None: ...


@asynccontextmanager
async def running(*services: Service) -> AsyncIterator[None]:
    """Run services (Authenticator first, then servers/clients) for the block's
    duration; they start in order and stop in reverse order."""
    async with AsyncExitStack() as stack:
        for svc in services:
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            await nursery.start(svc.run)
        yield


# -- server ----------------------------------------------------------------------------------

class ServerStats:
    __slots__ = ("requests", "replies", "errors", "duplicates", "cache_hits", "malformed", "unroutable")

    def __init__(self) -> None:
        self.requests = self.replies = self.errors = self.duplicates = 0
        self.cache_hits = self.malformed = self.unroutable = 0

    def __repr__(self) -> str:
        return "ServerStats(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


class _ReplyCache:
    """Bounded LRU of finished replies with a TTL."""

    def __init__(self, size: int, ttl: float) -> None:
        self._size = size
        self._ttl = ttl
        self._d: OrderedDict[tuple[str, bytes], tuple[float, bytes]] = OrderedDict()

    def get(self, key: tuple[str, bytes]) -> bytes | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self._d[key]
            return None
        return hit[1]

    def put(self, key: tuple[str, bytes], data: bytes) -> None:
        now = time.monotonic()
        self._d[key] = (now + self._ttl, data)
        self._d.move_to_end(key)
        while self._d:
            k, (exp, _) = next(iter(self._d.items()))
            if len(self._d) > self._size or exp < now:
                del self._d[k]
            else:
                break

    def __len__(self) -> int:
        return len(self._d)


class RpcServer:
    """ROUTER endpoint dispatching requests to `handler(sender, kind, body, epoch) -> reply body`.

    Start with ``endpoint = await nursery.start(server.run)`` (returns the bound
    endpoint, useful with ``tcp://127.0.0.1:*``). Set `epoch` to stamp replies.
    """

    def __init__(self, endpoint: str, handler: Handler, *, name: str, secret_key: str,
                 auth: Authenticator, max_concurrency: int = 256, dedup_size: int = 10_000,
                 dedup_ttl: float = 120.0, max_message: int = wire.MAX_MESSAGE) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.bind_endpoint = endpoint
        self.endpoint: str | None = None
        self.name = name
        self.epoch: int | None = None
        self.stats = ServerStats()
        self._handler = handler
        self._secret = load_key(secret_key, "secret_key")
        self._auth = auth
        self._limit = trio.Semaphore(max_concurrency)
        self._running: dict[tuple[str, bytes], list[bytes]] = {}
        self._cache = _ReplyCache(dedup_size, dedup_ttl)
        self._max = max_message
        self._badlog = LogLimiter(log)
        self._errlog = LogLimiter(log)
        self._zs: ZSocket | None = None
        self._nursery: trio.Nursery | None = None

    def _bad(self, reason: str, peer: str | None, size: int) -> None:
        self.stats.malformed += 1
        self._badlog.warning("event=bad_message side=server server=%s peer=%s size=%d reason=%r",
                             self.name, peer or "?", size, reason)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        _check_auth(self._auth, "RpcServer")
        zs, self.endpoint = _bind_server(self._auth, zmq.ROUTER, self._secret, self.bind_endpoint,
                                         {zmq.RCVHWM: 10_000, zmq.SNDHWM: 10_000,
                                          zmq.MAXMSGSIZE: self._max + 4096})
        self._zs = zs
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(partial(zs.run, dispatch=self._on_message, copy=False))
                log.info("event=rpc_listen server=%s endpoint=%s", self.name, self.endpoint)
                task_status.started(self.endpoint)
        finally:
            zs.close()
            self._zs = None

    async def _wait_for_slot(self) -> None:
        await self._limit.acquire()  # at capacity: stop reading (back-pressure through zmq)
        self._limit.release()

    def _on_message(self, frames: list[zmq.Frame]) -> Awaitable[None] | None:
        """Handle one received message (called by the pump; never waits). Returns
        an awaitable when the handler concurrency limit is reached: the pump
        awaits it (a free slot) before reading more."""
        nursery = self._nursery
        assert nursery is not None
        user = _user_id(frames[-1])
        if len(frames) != 2:
            self._bad(f"expected 1 frame, got {len(frames) - 1}", user, sum(len(f) for f in frames[1:]))
            return None
        routing, payload = frames[0].bytes, frames[1]
        try:
            env = wire.decode(payload.buffer, max_size=self._max)
        except BadMessage as e:
            self._bad(e.reason, user, len(payload))
            return None
        if user is None or env.sender != user:
            self._bad(f"sender {env.sender!r} is not the authenticated peer {user!r}", user, len(payload))
            return None
        if env.kind.startswith("$"):
            self._bad(f"reserved kind {env.kind!r} in a request", user, len(payload))
            return None
        key = (user, env.id)
        waiting = self._running.get(key)
        if waiting is not None:  # a retry of a request still running: answer it when done
            self.stats.duplicates += 1
            if routing not in waiting:
                waiting.append(routing)
            return None
        cached = self._cache.get(key)
        if cached is not None:
            self.stats.duplicates += 1
            self.stats.cache_hits += 1
            nursery.start_soon(self._send, routing, cached)
            return None
        self.stats.requests += 1
        self._running[key] = [routing]
        self._limit.acquire_nowait()  # the pump only reads while a slot is free
        nursery.start_soon(self._serve_one, key, env)
        return self._wait_for_slot() if self._limit.value == 0 else None

    async def _serve_one(self, key: tuple[str, bytes], env: Envelope) -> None:
        try:
            retryable = False
            try:
                result = await self._handler(env.sender, env.kind, env.body, env.epoch)
            except RemoteError as e:
                data = self._error(env, e.code, e.message)
                # "Ask again later" answers are not remembered: a retry of the same request
                # must be served afresh once the condition (e.g. no leadership) has changed.
                retryable = e.code in RETRYABLE_CODES
            except Exception as e:
                self.stats.errors += 1
                self._errlog.warning("event=handler_error server=%s peer=%s kind=%s error=%r",
                                     self.name, env.sender, env.kind, e)
                log.debug("event=handler_error_detail kind=%s", env.kind, exc_info=True)
                data = self._error(env, "internal", f"{type(e).__name__}: {e}")
            else:
                try:
                    data = wire.encode(Envelope(wire.KIND_REPLY, env.id, self.epoch, self.name, result),
                                       max_size=self._max)
                except BadMessage as e:
                    self.stats.errors += 1
                    self._errlog.warning("event=bad_reply server=%s peer=%s kind=%s reason=%r",
                                         self.name, env.sender, env.kind, e.reason)
                    data = self._error(env, "bad_reply", e.reason)
        except BaseException:
            self._running.pop(key, None)  # cancelled (shutdown): no reply, nothing cached
            raise
        finally:
            self._limit.release()
        routes = self._running.pop(key, [])
        if not retryable:
            self._cache.put(key, data)
        self.stats.replies += 1
        for routing in routes:
            await self._send(routing, data)

    def _error(self, env: Envelope, code: str, message: str) -> bytes:
        body = {"code": str(code), "message": str(message)[:4096]}
        return wire.encode(Envelope(wire.KIND_ERROR, env.id, self.epoch, self.name, body))

    async def _send(self, routing: bytes, data: bytes) -> None:
        zs = self._zs
        if zs is None:
            return
        try:
            if not zs.try_send([routing, data]):
                await zs.send_multipart([routing, data])
        except zmq.ZMQError as e:
            if e.errno != errno.EHOSTUNREACH:
                raise
            self.stats.unroutable += 1  # the client disconnected; its retry gets the cached reply
            log.debug("event=reply_unroutable server=%s", self.name)
        except trio.ClosedResourceError:
            pass


# -- client ----------------------------------------------------------------------------------

class _Pending:
    """One call in flight: the parked caller, its reply, its current wake-up time."""
    __slots__ = ("task", "env", "done", "live", "wake_at")

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.env: Envelope | None = None
        self.done = False
        self.live = True
        self.wake_at = math.inf

    def wake(self) -> None:
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    async def park(self) -> None:
        """Wait until `wake` (reply, timer, shutdown); Cancelled propagates."""
        self.task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class RpcClient:
    """One DEALER to one remote peer; many concurrent `call`s share it.

    `peer` must be the server's `name` (replies from anyone else are dropped);
    `name` must be the name the server's Authenticator maps our public key to.
    Start with ``await nursery.start(client.run)``; calls fail with
    `PeerUnavailable` after the client stops. Reconnects on its own.
    """

    def __init__(self, endpoint: str, *, name: str, peer: str, server_public_key: str,
                 public_key: str, secret_key: str, context: zmq.Context | None = None,
                 timeout: float = 5.0, retries: int = 2, max_message: int = wire.MAX_MESSAGE,
                 reconnect_ivl: float = 0.1, reconnect_ivl_max: float = 1.0,
                 heartbeat: float = 1.0) -> None:
        self.endpoint = endpoint
        self.name = name
        self.peer = peer
        self.timeout = timeout
        self.retries = retries
        self.max_epoch_seen: int | None = None
        self._context = context if context is not None else zmq.Context.instance()
        self._keys = (load_key(public_key, "public_key"), load_key(secret_key, "secret_key"),
                      load_key(server_public_key, f"public_key of peer {peer!r}"))
        self._opts = (reconnect_ivl, reconnect_ivl_max, heartbeat)
        self._max = max_message
        self._pending: dict[bytes, _Pending] = {}
        self._zs: ZSocket | None = None
        self._closed = False
        self._badlog = LogLimiter(log)
        # Deadlines: one timer task over a heap (lazy deletion) instead of a cancel scope per
        # call attempt; it sleeps until the earliest wake-up and is nudged when an earlier one comes.
        self._timers: list[tuple[float, int, _Pending]] = []
        self._timer_seq = itertools.count()
        self._timer_scope: trio.CancelScope | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._zs is not None or self._closed:
            raise RuntimeError("RpcClient.run can only be started once")
        raw = self._context.socket(zmq.DEALER)
        try:
            zs = ZSocket(raw)
            ivl, ivl_max, hb = self._opts
            raw.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections: no stale backlog to dead peers
            raw.setsockopt(zmq.RECONNECT_IVL, int(ivl * 1000))
            raw.setsockopt(zmq.RECONNECT_IVL_MAX, int(ivl_max * 1000))
            raw.setsockopt(zmq.HEARTBEAT_IVL, int(hb * 1000))
            raw.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(hb * 3000))
            raw.setsockopt(zmq.SNDHWM, 10_000)
            raw.setsockopt(zmq.RCVHWM, 10_000)
            raw.setsockopt(zmq.MAXMSGSIZE, self._max + 4096)
            _curve_client(raw, *self._keys)
            raw.connect(self.endpoint)
        except BaseException:
            raw.close(linger=0)
            raise
        self._zs = zs
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._timer_loop)
                await nursery.start(partial(zs.run, dispatch=self._on_reply))
                task_status.started()
        finally:
            self._closed = True
            zs.close()
            for slot in self._pending.values():
                slot.wake()  # env stays None: the caller raises PeerUnavailable

    def _add_timer(self, slot: _Pending) -> None:
        heap = self._timers
        if len(heap) > 2 * len(self._pending) + 1024:  # drop entries of finished calls
            heap[:] = [e for e in heap if e[2].live]
            heapq.heapify(heap)
        heapq.heappush(heap, (slot.wake_at, next(self._timer_seq), slot))
        scope = self._timer_scope
        if scope is not None and slot.wake_at < scope.deadline:
            scope.cancel()

    async def _timer_loop(self) -> None:
        heap = self._timers
        while True:
            now = trio.current_time()
            # Pop what is due, and every stale entry on top (finished call, or an earlier
            # attempt of a retried one), so we only ever sleep until a live wake-up.
            while heap:
                when, _, slot = heap[0]
                if when <= now:
                    heapq.heappop(heap)
                    if slot.wake_at <= now:
                        slot.wake()
                elif not slot.live or slot.wake_at != when:
                    heapq.heappop(heap)
                else:
                    break
            self._timer_scope = trio.CancelScope(deadline=heap[0][0] if heap else math.inf)
            with self._timer_scope:
                await trio.sleep_forever()
            self._timer_scope = None

    def _on_reply(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            self._bad(f"expected 1 frame, got {len(frames)}", sum(map(len, frames)))
            return
        try:
            env = wire.decode(frames[0], max_size=self._max)
        except BadMessage as e:
            self._bad(e.reason, len(frames[0]))
            return
        if env.kind not in (wire.KIND_REPLY, wire.KIND_ERROR):
            self._bad(f"unexpected kind {env.kind!r} in a reply", len(frames[0]))
            return
        if env.sender != self.peer:
            self._bad(f"reply from {env.sender!r}, expected {self.peer!r}", len(frames[0]))
            return
        if env.epoch is not None and (self.max_epoch_seen is None or env.epoch > self.max_epoch_seen):
            self.max_epoch_seen = env.epoch
        slot = self._pending.get(env.id)
        if slot is None or slot.done:
            log.debug("event=late_reply peer=%s", self.peer)  # abandoned call, or a 2nd reply to a retry
            return
        slot.env = env
        slot.done = True
        slot.wake()

    def _bad(self, reason: str, size: int) -> None:
        self._badlog.warning("event=bad_message side=client client=%s peer=%s size=%d reason=%r",
                             self.name, self.peer, size, reason)

    async def call(self, kind: str, body: Any = None, *, epoch: int | None = None,
                   timeout: float | None = None, retries: int | None = None,
                   request_id: bytes | None = None) -> Any:
        """Send a request and return the reply body.

        The deadline is `timeout` seconds from now for the whole call; the
        request is (re)sent up to `retries` + 1 times with the same id (pass
        `request_id` to make a later call a retry of an earlier one).
        Raises `PeerUnavailable` at the deadline, `RemoteError` for an error
        reply, `BadMessage` if the request cannot be encoded.
        """
        zs = self._zs
        if zs is None:
            if self._closed:
                raise PeerUnavailable(self.peer, kind, "client closed")
            raise RuntimeError("RpcClient.run is not running")
        if kind.startswith("$"):
            raise ValueError(f"kind {kind!r}: names starting with '$' are reserved")
        timeout = self.timeout if timeout is None else timeout
        attempts = 1 + max(0, self.retries if retries is None else retries)
        rid = request_id if request_id is not None else wire.new_id()
        data = wire.encode(Envelope(kind, rid, epoch, self.name, body), max_size=self._max)
        if rid in self._pending:
            raise ValueError("request id already in flight on this client")
        slot = _Pending()
        self._pending[rid] = slot
        deadline = trio.current_time() + timeout
        try:
            while True:
                try:
                    if not zs.try_send([data]):
                        with trio.move_on_at(deadline):
                            await zs.send_multipart([data])
                except trio.ClosedResourceError:
                    raise PeerUnavailable(self.peer, kind, "client closed") from None
                attempts -= 1
                now = trio.current_time()
                if slot.done or now >= deadline:
                    break
                slot.wake_at = deadline if not attempts else now + (deadline - now) / (attempts + 1)
                self._add_timer(slot)
                await slot.park()
                if slot.done or not attempts or self._closed:
                    break
                log.debug("event=retry peer=%s kind=%s", self.peer, kind)
        finally:
            slot.live = False
            del self._pending[rid]
        env = slot.env
        if env is None:
            reason = "client closed" if self._closed else f"no reply within {timeout:g}s"
            raise PeerUnavailable(self.peer, kind, reason)
        if env.kind == wire.KIND_ERROR:
            b = env.body
            if isinstance(b, dict) and isinstance(b.get("code"), str) and isinstance(b.get("message"), str):
                raise RemoteError(b["code"], b["message"], epoch=env.epoch)
            raise RemoteError("bad_error", f"malformed error reply: {b!r:.200}", epoch=env.epoch)
        return env.body


# -- notices ---------------------------------------------------------------------------------

class Publisher:
    """PUB endpoint for change notices; only listed peers can subscribe.

    ``endpoint = await nursery.start(pub.run)``, then ``await pub.publish(topic, body)``.
    """

    def __init__(self, endpoint: str, *, name: str, secret_key: str, auth: Authenticator,
                 hwm: int = 10_000, max_message: int = wire.MAX_MESSAGE) -> None:
        self.bind_endpoint = endpoint
        self.endpoint: str | None = None
        self.name = name
        self._secret = load_key(secret_key, "secret_key")
        self._auth = auth
        self._hwm = hwm
        self._max = max_message
        self._zs: ZSocket | None = None

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        _check_auth(self._auth, "Publisher")
        zs, self.endpoint = _bind_server(self._auth, zmq.PUB, self._secret, self.bind_endpoint,
                                         {zmq.SNDHWM: self._hwm})
        self._zs = zs
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(zs.run)
                task_status.started(self.endpoint)
                await trio.sleep_forever()
        finally:
            zs.close()
            self._zs = None

    async def publish(self, topic: bytes, body: Any, *, epoch: int | None = None) -> None:
        """Send a notice to every subscriber of a prefix of `topic` (best effort)."""
        if not isinstance(topic, bytes):
            raise TypeError("topic must be bytes")
        zs = self._zs
        if zs is None:
            raise RuntimeError("Publisher.run is not running")
        data = wire.encode(Envelope(wire.KIND_NOTICE, wire.new_id(), epoch, self.name, body),
                           max_size=self._max)
        await zs.send_multipart([topic, data])


class Subscriber:
    """SUB socket connected to any number of publishers; ``async for notice in sub``.

    `connect`/`subscribe` work before or after `run` starts. The socket exists
    from construction: run it (its pump closes it on exit) or `close` it.
    Publishers are authenticated by the Curve server key given to `connect`;
    `Notice.sender` is the publisher's own claim.
    """

    def __init__(self, *, name: str, public_key: str, secret_key: str,
                 context: zmq.Context | None = None, hwm: int = 10_000,
                 max_message: int = wire.MAX_MESSAGE, reconnect_ivl: float = 0.1,
                 reconnect_ivl_max: float = 1.0, heartbeat: float = 1.0) -> None:
        self.name = name
        self._keys = (load_key(public_key, "public_key"), load_key(secret_key, "secret_key"))
        self._max = max_message
        ctx = context if context is not None else zmq.Context.instance()
        raw = ctx.socket(zmq.SUB)
        try:
            self._zs = ZSocket(raw)
            raw.setsockopt(zmq.RCVHWM, hwm)
            raw.setsockopt(zmq.RECONNECT_IVL, int(reconnect_ivl * 1000))
            raw.setsockopt(zmq.RECONNECT_IVL_MAX, int(reconnect_ivl_max * 1000))
            raw.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat * 1000))
            raw.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat * 3000))
            raw.setsockopt(zmq.MAXMSGSIZE, self._max + 4096)
        except BaseException:
            raw.close(linger=0)
            raise
        self._badlog = LogLimiter(log)
        self.malformed = 0

    def connect(self, endpoint: str, server_public_key: str) -> None:
        """Connect to a publisher whose Curve public key is `server_public_key`."""
        raw = self._zs.raw
        _curve_client(raw, self._keys[0], self._keys[1], server_public_key)
        raw.connect(endpoint)

    def disconnect(self, endpoint: str) -> None:
        self._zs.raw.disconnect(endpoint)

    def subscribe(self, topic: bytes) -> None:
        """Receive notices whose topic starts with `topic` (b"" = everything)."""
        self._zs.raw.setsockopt(zmq.SUBSCRIBE, topic)

    def unsubscribe(self, topic: bytes) -> None:
        self._zs.raw.setsockopt(zmq.UNSUBSCRIBE, topic)

    def close(self) -> None:
        self._zs.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The socket's pump; the socket closes when this ends."""
        await self._zs.run(task_status=task_status)

    async def receive(self) -> Notice:
        """The next well-formed notice (malformed ones are logged and skipped)."""
        while True:
            frames = await self._zs.recv_multipart()
            if len(frames) != 2:
                self._bad(f"expected 2 frames, got {len(frames)}", sum(map(len, frames)))
                continue
            topic, payload = frames
            try:
                env = wire.decode(payload, max_size=self._max)
            except BadMessage as e:
                self._bad(e.reason, len(payload))
                continue
            if env.kind != wire.KIND_NOTICE:
                self._bad(f"unexpected kind {env.kind!r} in a notice", len(payload))
                continue
            return Notice(topic, env.sender, env.epoch, env.id, env.body)

    def _bad(self, reason: str, size: int) -> None:
        self.malformed += 1
        self._badlog.warning("event=bad_message side=subscriber subscriber=%s size=%d reason=%r",
                             self.name, size, reason)

    def __aiter__(self) -> AsyncIterator[Notice]:
        return self

    async def __anext__(self) -> Notice:
        try:
            return await self.receive()
        except trio.ClosedResourceError:
            raise StopAsyncIteration from None
