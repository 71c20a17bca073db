"""The `ObjectStore` interface: flat keys to immutable-ish byte objects.

Invariants every implementation keeps:
- `put` is atomic: a reader sees the whole old object, the whole new one, or
  NotFound, never a torn write; when `put` returns, the object is durable.
- `put(create_only=True)` fails with AlreadyExists if the key exists.
- `get` with a range returns exactly those bytes (clipped at the end).
- `delete` of a missing key is not an error.
- `list(prefix)` yields every key under the prefix, sorted by key.
- Errors are classified: NotFound (permanent, key missing), StoreUnavailable
  (transient: retry or fail over), StoreError (permanent otherwise).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence, TypeVar

import trio

T = TypeVar("T")


class StoreError(Exception):
    """A store operation failed permanently. `errno` hints at the cause (e.g. ENOSPC)."""

    errno: int | None = None

    def __init__(self, msg: str = "", errno: int | None = None) -> None:
        super().__init__(msg)
        if errno is not None:
            self.errno = errno


class NotFound(StoreError):
    """The key does not exist."""


class AlreadyExists(StoreError):
    """A create-only put found the key already present."""


class CorruptObject(StoreError):
    """An object's bytes failed the caller's check (format or checksum)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or failed transiently (disk full, I/O error, timeout)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float


class ObjectStore(abc.ABC):
    """Async key/value object store used for blocks, journal segments and snapshots."""

    name: str
    # True when reads are served from a local disk as fast as a block cache could serve them,
    # so the chunk layer keeps no second copy of its blocks in the disk cache.
    is_local: bool = False
    # True when `write_at` is supported: a durable write into an existing object costs one data
    # flush, no object creation. Journals use it for append-only logs (see agentmount.meta.journal).
    appendable: bool = False

    @abc.abstractmethod
    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Return the object's bytes, or bytes [start, end) of it."""

    @abc.abstractmethod
    async def put(self, key: str, data: "bytes | Sequence[bytes]", *, create_only: bool = False,
                  sync: bool = True) -> None:
        """Store `data` (bytes, or buffers to concatenate) under `key` atomically, and durably
        unless `sync` is False.

        With sync=False the object may be lost or torn by a crash until the
        next `barrier()` returns; callers use it only for data they can rebuild.
        """

    async def put_many(self, items: "Sequence[tuple[str, bytes | Sequence[bytes]]]", *, sync: bool = True) -> None:
        """put() each (key, data) of `items` (default: one after the other). Stores where a
        put is a local file write do them all in one worker-thread call."""
        for key, data in items:
            await self.put(key, data, sync=sync)

    async def write_at(self, key: str, data: "bytes | Sequence[bytes]", offset: int, *, sync: bool = True) -> None:
        """Write `data` at `offset` of object `key` (created when `offset` is 0 and it is
        missing), cutting off whatever lay at or beyond `offset` (a torn earlier attempt), and
        make it durable unless `sync` is False. Raises StoreError when the object is shorter
        than `offset`. Only stores with `appendable` set offer it; callers check that first."""
        raise StoreError(f"{self.name}: objects cannot be written in place")

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """Return the object's info, or None when it does not exist."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the key (no error when missing)."""

    @abc.abstractmethod
    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Yield the objects whose key starts with `prefix`, sorted by key."""

    async def list_keys(self, prefix: str) -> list[str]:
        return [info.key async for info in self.list(prefix)]

    async def get_checked(self, key: str, check: "Callable[[bytes], T] | None", *,
                          buffer: bool = False) -> "tuple[bytes, T | None]":
        """The whole object and `check(bytes)` of it (run in a worker thread); `check` raises
        CorruptObject on bad bytes. Replicated stores then try another replica and repair.

        `buffer=True`: the caller only uses the buffer protocol on the object (slicing,
        len, hashing, decompressing), so a store may hand back a read-only memoryview
        into a reused buffer instead of copying into bytes."""
        data = await self.get(key)
        if check is None:
            return data, None
        return data, await trio.to_thread.run_sync(check, data)

    async def barrier(self) -> None:
        """Make every earlier put durable (those made with sync=False included)."""

    async def sync(self, keys: Sequence[str]) -> None:
        """Make the named objects, stored with sync=False, durable (default: a full barrier)."""
        await self.barrier()

    async def check(self) -> None:
        """Raise StoreUnavailable/StoreError when the store is not usable."""

    def health(self) -> list[dict]:
        """Per underlying store: name, up, latency_ms, repair_queue, last_error, hedged_reads."""
        return [{"name": self.name, "up": True, "latency_ms": None, "repair_queue": 0, "last_error": None,
                 "hedged_reads": 0}]

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background work of the store, if any (start it in a nursery; it ends when cancelled)."""
        task_status.started()

    async def aclose(self) -> None:
        """Release resources."""
