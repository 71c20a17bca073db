"""`S3Store`: an object store in an S3 bucket (AWS S3, SeaweedFS, MinIO, ...).

Keys live below an optional `prefix` in one bucket. A put is one PutObject (atomic
and durable when it returns, so `sync` and `barrier()` have nothing to do);
`create_only` sends `If-None-Match: *` (412 or 409 means AlreadyExists). A ranged
get sends a Range header (end exclusive, clipped at the object's end).

Errors: NotFound (404/NoSuchKey); StoreUnavailable for connection errors,
timeouts, 5xx and throttling (429, SlowDown, ...); StoreError otherwise (403,
400, a missing bucket, ...). Transient errors are retried here, with exponential
backoff and full jitter, `max_attempts` tries in all (botocore's own retries are
off), and every public call is bounded by `timeout` seconds in total, backoff
included (then StoreUnavailable). A create-only put whose answer was lost to a
transient error and that then finds the key taken compares the object's ETag with
its own MD5, so it does not report AlreadyExists for its own earlier attempt.

How trio talks to S3: aiobotocore on aiohttp, in an asyncio event loop that runs
in one background thread shared by all S3Stores of the process (started with the
first store in use, stopped when the last one is closed). A call schedules its
coroutine on that loop with `call_soon_threadsafe`; the asyncio task's
done-callback wakes the trio task through the trio token's `run_sync_soon`. When
the trio task is cancelled, the asyncio task is cancelled and the trio task
waits until that task has really finished (trio's Abort.FAILED protocol), so a
cancelled call leaves nothing running, and nothing touches trio afterwards.

Why this bridge and not aiobotocore's httpx backend running natively on trio:
both were measured here (2 cores, shared with a loopback SeaweedFS `weed mini`;
sequential calls unless noted; the httpx backend with its BytesIO body fix; two
runs each, interleaved):

    =====================================  ==================  ==================
                                           httpx on trio       aiohttp thread
    =====================================  ==================  ==================
    1 KiB put p50 / p99                    3.9-4.2 / 8-9 ms    3.3-3.7 / 6-7 ms
    1 KiB get p50 / p99                    3.4-3.8 / 7-10 ms   2.8-3.5 / 7-8 ms
    1 KiB get, 16 in flight                290-400 /s          350-450 /s
    4 MiB put                              58-62 MiB/s         48-62 MiB/s
    4 MiB get                              160-255 MiB/s       250-475 MiB/s
    4 MiB get, 8 in flight                 240-255 MiB/s       340-375 MiB/s
    client CPU per 4 MiB get               ~11 ms              ~4-5 ms
    get on a SIGSTOPped server, cancelled  returns at 0.30 s   returns at 0.30 s
    by move_on_after(0.3), also 20 at once
    =====================================  ==================  ==================

Puts are bound by the server (client CPU ~15% with both); small-object latency
is mostly the server's. Both cancel promptly, so big reads decide: httpx/h11
parse bodies in pure Python, 64 KiB at a time, at ~2.5x the client CPU of
aiohttp's C parser, and on these 2-core machines that CPU is taken from the
server and from our own hashing and compression. The thread also keeps S3
sockets and parsing off the trio loop. trio-asyncio is not used: it replaces
asyncio's loop policy for the whole process.

The final version (aiohttp, PutObject bodies handed to aiohttp as bytes, which
saves ~2.5 ms of CPU per 4 MiB put) measured: 1 KiB put p50 3.4-3.9 ms, get
p50 2.8-2.9 ms; 4 MiB put 71-78 MiB/s (~8 ms client CPU each), get 390-440
MiB/s (~5 ms client CPU each).
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import random
import threading
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import outcome
import trio

from backend.store import AlreadyExists, NotFound, ObjectInfo, ObjectStore, StoreError, StoreUnavailable

T = TypeVar("T")

_BACKOFF_BASE = 0.1   # seconds; the n-th retry sleeps uniform(0, min(cap, base * 2**n))
_BACKOFF_CAP = 5.0
_CLOSE_TIMEOUT = 5.0
_LIST_PAGE = 1000

# Error codes that mean "try again" whatever their HTTP status.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "TooManyRequestsException", "RequestThrottled", "RequestThrottledException", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "OperationAborted",
    "PriorRequestNotComplete",
})
_CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
    "TokenRefreshRequired", "403", "401",
})

# Outcome kinds of one attempt.
_NOTFOUND, _EXISTS, _RANGE, _TRANSIENT, _PERMANENT = "notfound", "exists", "range", "transient", "permanent"


# -- the asyncio loop thread -------------------------------------------------------------
log = logging.getLogger("agentmount.s3")


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """aiohttp sends a request body in a task of its own; when the server drops the connection
    (a store killed mid-request) that task's ConnectionError is never retrieved. The request
    itself fails and is retried or reported: that is the error that counts, not this one."""
    if isinstance(context.get("exception"), ConnectionError) and "never retrieved" in context.get("message", ""):
        log.debug("S3 request body not sent: %s", context["exception"])
        return
    loop.default_exception_handler(context)


class _LoopThread:
    """An asyncio event loop in a daemon thread, shared by the S3Stores of the process."""

    _lock = threading.Lock()
    _current: "_LoopThread | None" = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_loop_exception)
        self.users = 0
        self.thread = threading.Thread(target=self._main, name="s3-asyncio", daemon=True)
        self.thread.start()

    @classmethod
    def acquire(cls) -> "_LoopThread":
        with cls._lock:
            lt = cls._current
            if lt is None:
                lt = cls._current = _LoopThread()
            lt.users += 1
            return lt

    def release(self) -> bool:
        """Drop one user; the last one stops the loop. True when the thread is ending."""
        with _LoopThread._lock:
            self.users -= 1
            if self.users > 0:
                return False
            if _LoopThread._current is self:
                _LoopThread._current = None
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # already closed
            pass
        return True

    def _main(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` as a task on the loop and return its result to the calling trio task.

        On trio cancellation the asyncio task is cancelled and this waits until it has
        finished; then the call raises trio.Cancelled (or returns the result when the task
        completed anyway)."""
        loop = self.loop
        token = trio.lowlevel.current_trio_token()
        trio_task = trio.lowlevel.current_task()
        box: dict[str, Any] = {}

        def finished(atask: asyncio.Task) -> None:  # asyncio thread
            if atask.cancelled():
                result = None
            else:
                exc = atask.exception()
                result = outcome.Error(exc) if exc is not None else outcome.Value(atask.result())

            def wake() -> None:  # trio thread
                if result is not None:
                    trio.lowlevel.reschedule(trio_task, result)
                elif "raise_cancel" in box:
                    trio.lowlevel.reschedule(trio_task, outcome.capture(box["raise_cancel"]))
                else:  # cancelled by the loop shutting down
                    trio.lowlevel.reschedule(trio_task, outcome.Error(StoreError("S3 client loop stopped")))

            try:
                token.run_sync_soon(wake)
            except trio.RunFinishedError:
                pass

        def start() -> None:  # asyncio thread
            try:
                atask = loop.create_task(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the trio task
                err = outcome.Error(e)
                try:
                    token.run_sync_soon(trio.lowlevel.reschedule, trio_task, err)
                except trio.RunFinishedError:
                    pass
                return
            box["task"] = atask
            atask.add_done_callback(finished)

        def cancel() -> None:  # asyncio thread; always runs after start()
            atask = box.get("task")
            if atask is not None:
                atask.cancel()

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError as e:  # the loop is closed
            raise StoreError("S3 client loop stopped") from e

        def abort(raise_cancel) -> trio.lowlevel.Abort:
            box["raise_cancel"] = raise_cancel
            try:
                loop.call_soon_threadsafe(cancel)
            except RuntimeError:  # loop closed: its tasks were cancelled, `finished` wakes us
                pass
            return trio.lowlevel.Abort.FAILED

        return await trio.lowlevel.wait_task_rescheduled(abort)


def _aiohttp_session_cls():
    from aiobotocore.httpsession import AIOHTTPSession

    class _Session(AIOHTTPSession):
        """Sends a PutObject body (botocore makes it a BytesIO) as one bytes object, so aiohttp
        writes it in one go instead of 64 KiB reads, each a copy, with a loop turn between."""

        async def send(self, request):
            body = request.body
            if isinstance(body, io.BytesIO):
                request.body = body.getvalue() if body.tell() == 0 else body.read()
            return await super().send(request)

    return _Session


# -- errors -----------------------------------------------------------------------------
def _classify(e: BaseException) -> tuple[str, int | None, str]:
    """(kind, HTTP status, error code) of an exception raised by one attempt."""
    from botocore import exceptions as bx

    if isinstance(e, bx.ClientError):
        err = e.response.get("Error") or {}
        code = str(err.get("Code", "") or "")
        status = (e.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return _PERMANENT, status, code
        if status == 404 or code in ("NoSuchKey", "NotFound", "404"):
            return _NOTFOUND, status, code
        if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return _EXISTS, status, code
        if status == 416 or code == "InvalidRange":
            return _RANGE, status, code
        if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
            return _TRANSIENT, status, code
        if status == 409:
            return _EXISTS, status, code
        return _PERMANENT, status, code
    name = type(e).__name__
    if isinstance(e, (bx.SSLError, bx.NoCredentialsError, bx.PartialCredentialsError,
                      bx.ParamValidationError, bx.InvalidEndpointConfigurationError)):
        return _PERMANENT, None, name
    if isinstance(e, (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError,
                      bx.ResponseStreamingError, asyncio.TimeoutError, TimeoutError, OSError)):
        return _TRANSIENT, None, name
    try:
        import aiohttp
        if isinstance(e, aiohttp.ClientError):
            return _TRANSIENT, None, name
    except ImportError:  # pragma: no cover
        pass
    return _PERMANENT, None, name


def _describe(e: BaseException | None) -> str:
    if e is None:
        return "no answer"
    from botocore import exceptions as bx

    if isinstance(e, bx.ClientError):
        err = e.response.get("Error") or {}
        status = (e.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = str(err.get("Code", "") or "")
        text = f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")
        if err.get("Message"):
            text += f": {err['Message']}"
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())


# -- the store --------------------------------------------------------------------------
class S3Store(ObjectStore):
    """Objects in an S3 bucket below `prefix`; see the module docstring."""

    is_local = False

    def __init__(self, name: str, *, bucket: str, endpoint: str | None = None, prefix: str = "",
                 region: str = "us-east-1", access_key: str | None = None, secret_key: str | None = None,
                 path_style: bool = True, timeout: float = 30.0, max_attempts: int = 4,
                 max_pool: int = 32) -> None:
        self.name = name
        self.bucket = bucket
        self.endpoint = endpoint or None
        prefix = prefix.strip("/")
        self.prefix = prefix + "/" if prefix else ""
        self.region = region
        self._access_key = access_key
        self._secret_key = secret_key
        self.path_style = path_style
        self.timeout = float(timeout)
        self.max_attempts = max(1, int(max_attempts))
        self.max_pool = max(1, int(max_pool))
        self._loop: _LoopThread | None = None
        self._client = None        # aiobotocore client, lives on the loop thread
        self._client_cm = None
        self._open_lock = trio.Lock()
        self._closed = False
        self._finalizer: weakref.finalize | None = None

    def __repr__(self) -> str:
        return (f"S3Store({self.name!r}, endpoint={self.endpoint!r}, bucket={self.bucket!r}, "
                f"prefix={self.prefix!r})")

    def describe(self) -> str:
        """'S3 store NAME (endpoint URL, bucket BUCKET)', for messages."""
        where = self.endpoint or f"AWS {self.region}"
        return f"S3 store {self.name!r} (endpoint {where}, bucket {self.bucket!r})"

    # -- client lifecycle ------------------------------------------------------------
    def _client_config(self):
        from aiobotocore.config import AioConfig

        return AioConfig(
            http_session_cls=_aiohttp_session_cls(),
            connect_timeout=min(self.timeout, 10.0),
            read_timeout=self.timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},  # we retry ourselves
            max_pool_connections=self.max_pool,
            # UNSIGNED-PAYLOAD: botocore would otherwise SHA-256 every body over plain http (~18 %
            # of the daemon's CPU per replica in bench-replicas). Every object we store carries its
            # own xxh3 checksum, verified on every read; https endpoints have TLS integrity too.
            s3={"addressing_style": "path" if self.path_style else "virtual", "payload_signing_enabled": False},
            # Blocks carry their own hashes: no CRC of every body on both sides.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )

    async def _open_client(self) -> None:  # on the loop thread
        from aiobotocore.session import get_session

        kw: dict[str, Any] = {}
        if self._access_key is not None or self._secret_key is not None:
            kw = {"aws_access_key_id": self._access_key, "aws_secret_access_key": self._secret_key}
        cm = get_session().create_client("s3", region_name=self.region, endpoint_url=self.endpoint,
                                         config=self._client_config(), **kw)
        self._client = await cm.__aenter__()
        self._client_cm = cm

    async def _ensure_client(self) -> _LoopThread:
        if self._client is not None:
            return self._loop  # type: ignore[return-value]
        async with self._open_lock:
            if self._closed:
                raise StoreError(f"{self.describe()}: closed")
            if self._client is None:
                if self._loop is None:
                    self._loop = _LoopThread.acquire()
                    self._finalizer = weakref.finalize(self, _abandon, self._loop)
                await self._loop.run(self._open_client)
        return self._loop  # type: ignore[return-value]

    async def aclose(self) -> None:
        """Close the client and release the loop thread (joined when this was its last store)."""
        self._closed = True
        lt, cm = self._loop, self._client_cm
        self._loop = self._client = self._client_cm = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if lt is None:
            return
        with trio.CancelScope(shield=True):
            if cm is not None:
                with trio.move_on_after(_CLOSE_TIMEOUT):
                    try:
                        await lt.run(cm.__aexit__, None, None, None)
                    except Exception:  # noqa: BLE001 - closing anyway
                        pass
            if lt.release():
                await trio.to_thread.run_sync(lt.thread.join, _CLOSE_TIMEOUT)

    # -- calls ---------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        if (not isinstance(key, str) or not key or key.startswith("/") or key.endswith("/")
                or any(seg in ("", ".", "..") for seg in key.split("/"))):
            raise StoreError(f"{self.describe()}: invalid key {key!r}")
        return self.prefix + key

    async def _call(self, what: str, op: Callable[[Any], Awaitable[T]], *,
                    ok_kinds: dict[str, Callable[[], T]] | None = None,
                    also_transient: frozenset[str] = frozenset(),
                    on_transient: Callable[[], None] | None = None) -> T:
        """Run `op(client)` on the loop: retried on transient errors, bounded by `timeout`.

        `ok_kinds` maps an error kind to a function giving the call's result instead
        (e.g. a 416 on a ranged get means "nothing there": b"")."""
        last: BaseException | None = None
        with trio.move_on_after(self.timeout):
            lt = await self._ensure_client_or_raise(what)
            for attempt in range(self.max_attempts):
                if attempt:
                    await trio.sleep(random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** attempt)))
                client = self._client
                if client is None:
                    raise StoreError(f"{self.describe()}: {what}: store closed")
                try:
                    return await lt.run(op, client)
                except Exception as e:  # noqa: BLE001 - classified below
                    kind, _status, _code = _classify(e)
                    if ok_kinds and kind in ok_kinds:
                        return ok_kinds[kind]()
                    if kind in also_transient:
                        kind = _TRANSIENT
                    if kind == _NOTFOUND:
                        raise NotFound(what.split(" ", 1)[-1]) from e
                    if kind == _EXISTS:
                        raise AlreadyExists(what.split(" ", 1)[-1]) from e
                    if kind != _TRANSIENT:
                        raise StoreError(f"{self.describe()}: {what}: {_describe(e)}") from e
                    last = e
                    if on_transient is not None:
                        on_transient()
            raise StoreUnavailable(f"{self.describe()}: {what}: {_describe(last)} "
                                   f"({self.max_attempts} attempts)") from last
        raise StoreUnavailable(f"{self.describe()}: {what}: timed out after {self.timeout:g}s"
                               + (f" (last error: {_describe(last)})" if last else "")) from last

    async def _ensure_client_or_raise(self, what: str) -> _LoopThread:
        try:
            return await self._ensure_client()
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - a bad endpoint URL, an unreadable profile, ...
            kind, _s, _c = _classify(e)
            cls = StoreUnavailable if kind == _TRANSIENT else StoreError
            raise cls(f"{self.describe()}: {what}: cannot create client: {_describe(e)}") from e

    # -- ObjectStore -----------------------------------------------------------------------
    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        k = self._key(key)
        lo = max(0, start or 0)
        if end is not None and end <= lo:
            if await self.head(key) is None:
                raise NotFound(key)
            return b""
        extra: dict[str, Any] = {}
        if lo or end is not None:
            extra["Range"] = f"bytes={lo}-" + ("" if end is None else str(end - 1))
        bucket = self.bucket

        async def op(client) -> bytes:
            resp = await client.get_object(Bucket=bucket, Key=k, **extra)
            async with resp["Body"] as body:
                data = await body.read()
            if extra and resp["ResponseMetadata"]["HTTPStatusCode"] == 200:
                # A server that ignores Range sends the whole object: cut it here.
                data = data[lo:end]
            return data

        # 416: the range starts at or past the end of the object.
        return await self._call(f"get {key}", op, ok_kinds={_RANGE: lambda: b""})

    async def put(self, key: str, data: "bytes | Sequence[bytes]", *, create_only: bool = False,
                  sync: bool = True) -> None:
        k = self._key(key)
        if isinstance(data, bytes):
            body = data
        elif isinstance(data, (bytearray, memoryview)):
            body = bytes(data)
        else:
            parts = list(data)
            body = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)
        bucket = self.bucket
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if create_only else {}
        ambiguous = False

        def lost_answer() -> None:
            nonlocal ambiguous
            ambiguous = True

        async def op(client) -> None:
            await client.put_object(Bucket=bucket, Key=k, Body=body, **extra)

        if not create_only:
            # 409/412 without a condition: a conflicting write in progress, try again.
            await self._call(f"put {key}", op, also_transient=frozenset({_EXISTS}))
            return
        try:
            await self._call(f"put {key}", op, on_transient=lost_answer)
        except AlreadyExists:
            if not ambiguous:
                raise
            # An earlier attempt may have been stored with its answer lost: then the
            # object is ours (single-part ETag = MD5 of the body on S3 and SeaweedFS).
            if await self._etag(key) != hashlib.md5(body).hexdigest():
                raise

    async def _etag(self, key: str) -> str | None:
        k, bucket = self._key(key), self.bucket

        async def op(client) -> str:
            resp = await client.head_object(Bucket=bucket, Key=k)
            return str(resp.get("ETag", "")).strip('"')

        try:
            return await self._call(f"head {key}", op)
        except NotFound:
            return None

    async def head(self, key: str) -> ObjectInfo | None:
        k, bucket = self._key(key), self.bucket

        async def op(client) -> ObjectInfo:
            resp = await client.head_object(Bucket=bucket, Key=k)
            return ObjectInfo(key, int(resp["ContentLength"]), resp["LastModified"].timestamp())

        try:
            return await self._call(f"head {key}", op)
        except NotFound:
            return None

    async def delete(self, key: str) -> None:
        k, bucket = self._key(key), self.bucket

        async def op(client) -> None:
            await client.delete_object(Bucket=bucket, Key=k)

        try:
            await self._call(f"delete {key}", op)
        except NotFound:
            pass

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:  # type: ignore[override]
        """All pages are fetched, then yielded sorted: not every S3 server lists in byte
        order (SeaweedFS walks directories), and the contract promises sorted keys."""
        full, cut, bucket = self.prefix + prefix, len(self.prefix), self.bucket
        out: list[ObjectInfo] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": bucket, "Prefix": full, "MaxKeys": _LIST_PAGE}
            if token:
                kw["ContinuationToken"] = token

            async def op(client, kw=kw) -> dict:
                return await client.list_objects_v2(**kw)

            resp = await self._call(f"list {prefix!r}", op)
            for o in resp.get("Contents") or ():
                out.append(ObjectInfo(o["Key"][cut:], int(o["Size"]), o["LastModified"].timestamp()))
            token = resp.get("NextContinuationToken") if resp.get("IsTruncated") else None
            if not token:
                break
        out.sort(key=lambda i: i.key)
        for info in out:
            yield info

    async def check(self) -> None:
        """HeadBucket: StoreUnavailable when the endpoint cannot be reached, StoreError on bad
        credentials or a missing bucket; each message names the store, endpoint and bucket."""
        bucket = self.bucket

        async def op(client) -> None:
            await client.head_bucket(Bucket=bucket)

        try:
            await self._call("check", op)
        except NotFound as e:
            raise StoreError(f"{self.describe()}: bucket missing") from e
        except StoreUnavailable as e:
            raise StoreUnavailable(f"{self.describe()}: endpoint unreachable: "
                                   f"{_describe(e.__cause__) if e.__cause__ else e}") from e
        except StoreError as e:
            cause = e.__cause__
            _kind, status, code = _classify(cause) if cause is not None else ("", None, "")
            if status in (401, 403) or code in _CREDENTIAL_CODES:
                raise StoreError(f"{self.describe()}: bad credentials (or no access to the bucket): "
                                 f"{_describe(cause)}") from e
            if code in ("NoCredentialsError", "PartialCredentialsError"):
                raise StoreError(f"{self.describe()}: bad credentials: {_describe(cause)}") from e
            if code == "NoSuchBucket":
                raise StoreError(f"{self.describe()}: bucket missing") from e
            raise

    async def barrier(self) -> None:
        """Nothing to do: an S3 PUT is durable when it returns."""

    async def sync(self, keys: Sequence[str]) -> None:
        """Nothing to do: an S3 PUT is durable when it returns."""


def _abandon(lt: _LoopThread) -> None:
    """Finalizer of a store dropped without aclose(): release its share of the loop thread."""
    lt.release()
