"""`LocalStore`: an object store in a local directory.

Each key is a file below the root (key segments become directories). Puts
write a temporary file, fsync it, rename it into place and fsync the
directory, so an object is either wholly present or absent after a crash.
All disk I/O runs in worker threads, bounded by a capacity limiter.
"""
from __future__ import annotations

import errno
import os
import secrets
from typing import AsyncIterator

import trio

from backend.store import AlreadyExists, NotFound, ObjectInfo, ObjectStore, StoreError, StoreUnavailable

_TMP_SUFFIX = ".tmp-"

try:
    import ctypes
    import ctypes.util
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - libc is always there on Linux
    _libc = None
_TRANSIENT = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE}


def fsync_dir(path: str) -> None:
    """Make the entries of directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _classify(e: OSError, key: str) -> StoreError:
    if e.errno == errno.ENOENT:
        return NotFound(key)
    if e.errno in _TRANSIENT:
        return StoreUnavailable(f"{key}: {os.strerror(e.errno or 0)}", e.errno)
    return StoreError(f"{key}: {e}", e.errno)


class LocalStore(ObjectStore):
    """Directory-backed store; see module docstring for durability guarantees."""

    def __init__(self, root: str, name: str = "local", *, max_threads: int = 8, fsync: bool = True) -> None:
        self.name = name
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self._limiter = trio.CapacityLimiter(max_threads)
        self._known_dirs: set[str] = set()

    # -- helpers (run in threads) -------------------------------------------------
    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/") or _TMP_SUFFIX in key:
            raise StoreError(f"invalid key {key!r}")
        return os.path.join(self.root, key)

    def _ensure_dir(self, d: str) -> None:
        if d in self._known_dirs:
            return
        missing = []
        p = d
        while not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        for m in reversed(missing):
            try:
                os.mkdir(m)
            except FileExistsError:
                pass
            if self.fsync:
                fsync_dir(os.path.dirname(m))
        self._known_dirs.add(d)

    def _put_sync(self, key: str, data, create_only: bool, sync: bool = True) -> None:
        path = self._path(key)
        d = os.path.dirname(path)
        try:
            self._ensure_dir(d)
            tmp = path + _TMP_SUFFIX + secrets.token_hex(6)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                bufs = [memoryview(b) for b in ((data,) if isinstance(data, (bytes, bytearray, memoryview))
                                                else data)]
                while bufs:
                    n = os.writev(fd, bufs)
                    while bufs and n >= len(bufs[0]):
                        n -= len(bufs[0])
                        bufs.pop(0)
                    if n:
                        bufs[0] = bufs[0][n:]
                if self.fsync and sync:
                    os.fdatasync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            os.close(fd)
            try:
                if create_only:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        raise AlreadyExists(key) from None
                    finally:
                        os.unlink(tmp)
                else:
                    os.rename(tmp, path)
            except OSError:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            if self.fsync and sync:
                fsync_dir(d)
        except OSError as e:
            if e.errno == errno.ENOENT:
                self._known_dirs.discard(d)
            raise _classify(e, key) from e

    def _get_sync(self, key: str, start: int | None, end: int | None) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _classify(e, key) from e
        try:
            size = os.fstat(fd).st_size
            lo = min(start or 0, size)
            hi = size if end is None else min(end, size)
            # Ask for the whole range at once: the kernel then reads it in large requests
            # instead of growing its readahead window from 128 KiB on every object.
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
            parts = []
            pos = lo
            while pos < hi:
                chunk = os.pread(fd, hi - pos, pos)
                if not chunk:
                    break
                parts.append(chunk)
                pos += len(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except OSError as e:
            raise _classify(e, key) from e
        finally:
            os.close(fd)

    def _head_sync(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _classify(e, key) from e
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def _delete_sync(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _classify(e, key) from e

    def _list_sync(self, prefix: str) -> list[ObjectInfo]:
        # Walk only the directory that can contain the prefix.
        base_dir = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = os.path.join(self.root, base_dir)
        out: list[ObjectInfo] = []
        if not os.path.isdir(top):
            return out
        for dirpath, dirnames, filenames in os.walk(top):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel + "/"
            dirnames[:] = [d for d in dirnames if (rel + d + "/").startswith(prefix) or prefix.startswith(rel + d + "/")]
            for fn in filenames:
                key = rel + fn
                if _TMP_SUFFIX in fn or not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, fn))
                except FileNotFoundError:
                    continue
                out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        out.sort(key=lambda i: i.key)
        return out

    async def _run(self, fn, *args):
        # Abandon on cancel: a disk that hangs must not hang the caller past its timeout.
        # Puts stay safe to abandon: they are atomic and idempotent per key.
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=True)

    # -- ObjectStore ---------------------------------------------------------------
    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        return await self._run(self._get_sync, key, start, end)

    async def put(self, key: str, data, *, create_only: bool = False, sync: bool = True) -> None:
        await self._run(self._put_sync, key, data, create_only, sync)

    def _barrier_sync(self) -> None:
        if not self.fsync:
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc is not None and _libc.syncfs(fd) == 0:
                return
            os.sync()
        finally:
            os.close(fd)

    async def barrier(self) -> None:
        await self._run(self._barrier_sync)

    async def head(self, key: str) -> ObjectInfo | None:
        return await self._run(self._head_sync, key)

    async def delete(self, key: str) -> None:
        await self._run(self._delete_sync, key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:  # type: ignore[override]
        for info in await self._run(self._list_sync, prefix):
            yield info

    def _check_sync(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StoreError(f"store directory {self.root}: {e.strerror}") from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"store directory {self.root} is not writable")
        probe = os.path.join(self.root, ".probe" + _TMP_SUFFIX + secrets.token_hex(4))
        try:
            with open(probe, "wb") as f:
                f.write(b"x")
            os.unlink(probe)
        except OSError as e:
            raise StoreError(f"store directory {self.root} is not writable: {e.strerror}") from e

    async def check(self) -> None:
        await self._run(self._check_sync)
