"""Block caches: an in-memory LRU of plain bytes and a bounded on-disk LRU.

Both are strictly bounded by bytes. The disk cache stores encoded block
objects (verified again on every read) and is best-effort: a full or failing
cache disk only disables caching of the block at hand, it never fails a read
or a write.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import trio

from agentmount.chunks import block
from backend.local import writev_all


class MemoryCache:
    """LRU of key -> plain bytes, bounded by `capacity` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._d: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.capacity // 4:
            return
        old = self._d.pop(key, None)
        if old is not None:
            self.used -= len(old)
        self._d[key] = value
        self.used += len(value)
        while self.used > self.capacity and self._d:
            _, v = self._d.popitem(last=False)
            self.used -= len(v)

    def discard(self, key: str) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.used -= len(old)


class DiskCache:
    """Encoded blocks under `root`, LRU-evicted to stay below `capacity` bytes."""

    def __init__(self, root: str, capacity: int) -> None:
        self.root = root
        self.capacity = capacity
        self.used = 0
        self._lru: OrderedDict[str, int] = OrderedDict()  # file name -> size
        self._limiter = trio.CapacityLimiter(4)
        self.disabled_reason: str | None = None

    def _name(self, key: str) -> str:
        return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name[:2], name)

    def load(self) -> None:
        """Index what a previous run left (synchronous; call before serving)."""
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            self.disabled_reason = f"cache dir {self.root}: {e.strerror}"
            return
        entries = []
        for dirpath, _, files in os.walk(self.root):
            for fn in files:
                p = os.path.join(dirpath, fn)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                if ".tmp" in fn:
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
                    continue
                entries.append((st.st_atime, fn, st.st_size))
        entries.sort()
        for _, fn, size in entries:
            self._lru[fn] = size
            self.used += size
        self._evict_sync()

    def _evict_sync(self) -> None:
        while self.used > self.capacity and self._lru:
            fn, size = self._lru.popitem(last=False)
            self.used -= size
            try:
                os.unlink(self._path(fn))
            except OSError:
                pass

    def _read_sync(self, name: str) -> bytes | None:
        try:
            with open(self._path(name), "rb") as f:
                obj = f.read()
        except OSError:
            return None
        try:
            return block.decode(obj)
        except block.CorruptBlock:
            try:
                os.unlink(self._path(name))
            except OSError:
                pass
            return None

    def _write_sync(self, name: str, obj: "bytes | list") -> bool:
        p = self._path(name)
        tmp = p + ".tmp"
        try:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                writev_all(fd, obj)
            finally:
                os.close(fd)
            os.rename(tmp, p)
            return True
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False

    async def get(self, key: str) -> bytes | None:
        name = self._name(key)
        if name not in self._lru:
            return None
        self._lru.move_to_end(name)
        plain = await trio.to_thread.run_sync(self._read_sync, name, limiter=self._limiter)
        if plain is None:
            size = self._lru.pop(name, 0)
            self.used -= size
        return plain

    async def put(self, key: str, obj: "bytes | list") -> None:
        """Cache an encoded block object (one buffer, or buffers to concatenate)."""
        size = len(obj) if isinstance(obj, (bytes, bytearray, memoryview)) else sum(len(b) for b in obj)
        if self.disabled_reason or size > self.capacity // 4:
            return
        name = self._name(key)
        if name in self._lru:
            return
        ok = await trio.to_thread.run_sync(self._write_sync, name, obj, limiter=self._limiter)
        if ok:
            self._lru[name] = size
            self.used += size
            if self.used > self.capacity:
                await trio.to_thread.run_sync(self._evict_sync, limiter=self._limiter)

    def discard(self, key: str) -> None:
        name = self._name(key)
        size = self._lru.pop(name, None)
        if size is not None:
            self.used -= size
            try:
                os.unlink(self._path(name))
            except OSError:
                pass
