"""The leader side of a shared workspace: serving the namespace to the other peers.

`LeaderRole` wraps the `LocalNamespace` this peer holds while it leads a
workspace. Every change, from this peer's own VFS or from a follower's RPC,
goes through `mutate`: replayed request ids get their first outcome, the
change is applied and journaled, and then every *other* holder of a callback
on what changed is told to drop it (`ns.inval`) before the call returns —
so a change is visible on every peer as soon as it returns. Callbacks are
AFS-style promises: a follower that was sent an inode's attributes holds one
on the inode, one that looked up or listed a directory holds one on its
entries. A follower that does not acknowledge within `invalidate_timeout_s`
is evicted: its callbacks are dropped and its callback generation bumped, so
it discards its whole cache on the next reply or ping.

Open files: followers register the inodes they hold open (``open``,
``close``, ``reopen`` after a failover), so unlinking a file one peer still
has open keeps it as an orphan until its last user anywhere closes it.
"""
from __future__ import annotations

import errno
import logging
from typing import Any, Awaitable, Callable

import trio

from agentmount.chunks.layout import Slice
from agentmount.errors import Deposed, FsError
from agentmount.meta.service import LocalNamespace
from agentmount.meta.state import Inode
from agentmount.peer.rpc import PeerError, RemoteError

log = logging.getLogger("agentmount.meta")

# What a change touched: inodes whose attributes changed, inodes whose data changed,
# directory entries (parent, name) that changed.
Affected = tuple[list[int], list[int], list[tuple[int, bytes]]]
KernelInval = Callable[[list[int], list[int], list[tuple[int, bytes]]], Awaitable[None]]
SendInval = Callable[[str, dict], Awaitable[Any]]


def attr_list(node: Inode) -> list:
    """An inode's attributes for the wire (no block map: followers fetch slices per chunk)."""
    return [node.ino, node.mode, node.uid, node.gid, node.nlink, node.size, node.atime, node.mtime,
            node.ctime, node.rdev, node.version, node.xattrs, node.target, {}, node.parent]


def _hold(table: dict[int, set[str]], peer: str, ino: int) -> None:
    s = table.get(ino)
    if s is None:
        table[ino] = {peer}
    else:
        s.add(peer)


def gone(ino: int) -> Inode:
    """What a replayed unlink returns once the inode was freed since."""
    n = Inode(ino, 0o100000, 0, 0, 0)
    n.nlink = 0
    return n


class LeaderRole:
    """See module docstring. One per workspace this peer leads, for one epoch."""

    def __init__(self, me: str, local: LocalNamespace, epoch: int, *, send_inval: SendInval,
                 kernel_inval: KernelInval, is_open_here: Callable[[int], bool],
                 invalidate_timeout: float) -> None:
        self.me = me
        self.local = local
        self.ws = local.ws
        self.epoch = epoch
        self._send = send_inval
        self._kernel = kernel_inval
        self._is_open_here = is_open_here
        self.invalidate_timeout = invalidate_timeout
        self.attr_cb: dict[int, set[str]] = {}
        self.dir_cb: dict[int, set[str]] = {}
        self.open_by: dict[int, set[str]] = {}
        self.cbgen: dict[str, int] = {}
        self.evictions = 0
        self.invalidations = 0

    def is_open(self, ino: int) -> bool:
        return self._is_open_here(ino) or bool(self.open_by.get(ino))

    # -- callbacks ----------------------------------------------------------------------------
    def _hold_attr(self, peer: str, ino: int) -> None:
        _hold(self.attr_cb, peer, ino)

    def _hold_dir(self, peer: str, ino: int) -> None:
        _hold(self.dir_cb, peer, ino)

    def evict(self, peer: str) -> None:
        for table in (self.attr_cb, self.dir_cb):
            for s in table.values():
                s.discard(peer)
        self.cbgen[peer] = self.cbgen.get(peer, 0) + 1
        self.evictions += 1
        log.warning("event=follower_evicted ws=%s peer=%s cbgen=%d", self.ws, peer, self.cbgen[peer])

    async def _break(self, origin: str, aff: Affected) -> None:
        """Tell every other holder of a callback on what changed; wait for their acks (bounded)."""
        attrs, data, entries = aff
        targets: dict[str, tuple[set[int], set[int], set[tuple[int, bytes]]]] = {}

        def target(p: str) -> tuple[set[int], set[int], set[tuple[int, bytes]]]:
            t = targets.get(p)
            if t is None:
                t = targets[p] = (set(), set(), set())
            return t
        for ino in attrs:
            for p in self.attr_cb.get(ino, ()):
                if p != origin:
                    target(p)[0].add(ino)
        for ino in data:
            for p in self.attr_cb.get(ino, ()):
                if p != origin:
                    target(p)[1].add(ino)
        for parent, name in entries:
            for p in self.dir_cb.get(parent, ()):
                if p != origin:
                    target(p)[2].add((parent, name))
        kernel = origin != self.me     # our own kernel saw its own change; others' it did not
        targets.pop(self.me, None)
        if not targets and not kernel:
            return
        async with trio.open_nursery() as n:
            if kernel:
                n.start_soon(self._kernel_bounded, attrs, data, entries)
            for p, (a, d, e) in targets.items():
                n.start_soon(self._inval_one, p, {"ws": self.ws, "e": self.epoch, "a": sorted(a | d),
                                                  "d": sorted(d), "n": [list(x) for x in e]})

    async def _kernel_bounded(self, attrs: list[int], data: list[int], entries: list[tuple[int, bytes]]) -> None:
        with trio.move_on_after(self.invalidate_timeout):
            await self._kernel(attrs, data, entries)

    async def _inval_one(self, peer: str, body: dict) -> None:
        self.invalidations += 1
        try:
            await self._send(peer, body)
        except (PeerError, trio.TooSlowError) as e:
            log.warning("event=invalidate_failed ws=%s peer=%s error=%s", self.ws, peer, e)
            self.evict(peer)
            # It trusts what it cached for at most invalidate_timeout after a ping it sent
            # before the eviction: the change is not done until that trust has run out.
            await trio.sleep(self.invalidate_timeout)

    # -- changes ----------------------------------------------------------------------------
    async def mutate(self, origin: str, op: str, a: list, rid: bytes | None,
                     actor: list | None = None) -> tuple[Any, Affected]:
        """Apply one change for `origin` (at most once per request id; None: a change no one
        can retry); returns (result, affected)."""
        local = self.local
        done = local.outcome(rid) if rid is not None else None
        pre = None
        if op == "rename":
            pre = (local.cached_entry(a[0], a[1]), local.cached_entry(a[2], a[3]))
        if done is not None:
            result = self._replayed(op, a, done)
        else:
            local.current_rid = rid
            local.current_actor = [origin] + list(actor[:2]) if actor else [origin, None, None]
            try:
                result = await self._apply(op, a)
            finally:
                local.current_rid = None
                local.current_actor = None
        aff = self._affected(op, a, result, pre)
        if op in ("free",) and a[0] not in local.state.inodes:
            for table in (self.attr_cb, self.open_by):
                table.pop(a[0], None)
        await self._break(origin, aff)
        return result, aff

    async def _apply(self, op: str, a: list) -> Any:
        local = self.local
        if op == "mknod":
            return await local.mknod(*a)
        if op == "link":
            return await local.link(*a)
        if op == "unlink":
            return await local.unlink(a[0], a[1], a[2], self.is_open)
        if op == "rename":
            return await local.rename(a[0], a[1], a[2], a[3], a[4], self.is_open)
        if op == "setattr":
            return await local.setattr(a[0], a[1])
        if op == "setxattr":
            return await local.setxattr(*a)
        if op == "removexattr":
            return await local.removexattr(*a)
        if op == "commit_write":
            ino, slices, end, mtime, inline, closing = a
            return await local.commit_write(ino, slices, end, mtime, inline, closing=closing)
        if op == "written":
            return await local.written(a[0])
        if op == "compact":
            return await local.compact(*a)
        if op == "free":
            return await local.free(a[0])
        raise FsError(errno.ENOSYS, f"unknown change {op!r}")

    def _replayed(self, op: str, a: list, done: tuple[int, int]) -> Any:
        seq, ino = done
        st = self.local.state
        if op in ("mknod", "link", "setattr", "unlink"):
            node = st.inodes.get(a[0] if op in ("setattr", "link") else ino)
            if op == "unlink" and node is None:
                return gone(ino)
            if node is None:
                raise FsError(errno.ENOENT)
            return node
        if op in ("commit_write", "compact", "written"):
            return seq
        return None

    def _affected(self, op: str, a: list, result: Any, pre: tuple | None) -> Affected:
        if op == "mknod":
            return [a[0]], [], [(a[0], a[1])]
        if op == "link":
            return [a[0], a[1]], [], [(a[1], a[2])]
        if op == "unlink":
            return [a[0], result.ino], [], [(a[0], a[1])]
        if op == "rename":
            inos = [a[0], a[2]] + [i for i in (pre or ()) if i is not None]
            return inos, [], [(a[0], a[1]), (a[2], a[3])]
        if op == "setattr":
            return [a[0]], ([a[0]] if "size" in a[1] else []), []
        if op in ("setxattr", "removexattr"):
            return [a[0]], [], []
        if op in ("commit_write", "compact"):
            return [a[0]], [a[0]], []
        if op == "free":
            return [a[0]], [], []
        return [], [], []

    # -- serving followers ------------------------------------------------------------------
    async def serve(self, sender: str, op: str, body: dict) -> Any:
        """One `ns.<op>` request of follower `sender` (the lease was checked by the caller)."""
        a = body.get("a") or []
        local = self.local
        if op == "getattr" or op == "open":
            node = await local.getattr(a[0])
            self._hold_attr(sender, node.ino)
            if op == "open":
                self.open_by.setdefault(node.ino, set()).add(sender)
            return attr_list(node)
        if op == "lookup":
            self._hold_dir(sender, a[0])     # also for a miss: the kernel caches "no such name"
            node = await local.lookup(a[0], a[1])
            self._hold_attr(sender, node.ino)
            return attr_list(node)
        if op == "readdir":
            ents = await local.readdir(a[0])
            self._hold_dir(sender, a[0])
            out = []
            for name, ino in ents:
                node = local.cached(ino)
                if node is not None:
                    self._hold_attr(sender, ino)
                    out.append([name, ino, attr_list(node)])
            return out
        if op == "slices":
            self._hold_attr(sender, a[0])
            return [s.to_tuple() for s in await local.slices(a[0], a[1])]
        if op == "sync":
            seq = a[0] if a and a[0] is not None else None
            await local.sync(min(seq, local.journal.last_seq) if seq is not None else None)
            return None
        if op == "close":
            await self.release(sender, a[0])
            return None
        if op == "reopen":
            for ino in a[0]:
                if ino in local.state.inodes:
                    self.open_by.setdefault(ino, set()).add(sender)
            return None
        rid = body.get("rid")
        if not isinstance(rid, bytes):
            raise RemoteError("bad_request", "a change needs a request id")
        args = self._decode(op, a)
        act = body.get("act")
        result, aff = await self.mutate(sender, op, args, rid,
                                        act if isinstance(act, list) and len(act) == 2 else None)
        if op == "mknod" and body.get("open") and isinstance(result, Inode):
            self.open_by.setdefault(result.ino, set()).add(sender)
        for parent, _ in aff[2]:
            self._hold_dir(sender, parent)   # it caches the names it just made
        # A follower's change is durable before it is answered: its peer may outlive us, and
        # must never have been told of a change a failover then loses.
        await local.sync(result if op in ("commit_write", "compact", "written") else local.journal.last_seq)
        out: dict[str, Any] = {"aff": [aff[0], aff[1], [list(x) for x in aff[2]]]}
        if isinstance(result, Inode):
            self._hold_attr(sender, result.ino)
            result = attr_list(result)
        elif op in ("commit_write", "compact", "setxattr", "removexattr"):
            node = local.cached(args[0])
            if node is not None:   # the changed inode as it is now: the follower need not ask
                self._hold_attr(sender, node.ino)
                out["n"] = attr_list(node)
        out["r"] = result
        return out

    def _decode(self, op: str, a: list) -> list:
        if op == "commit_write":
            ino, slices, end, mtime, inline = a[:5]
            closing = bool(a[5]) if len(a) > 5 else False
            return [ino, [(i, Slice.from_tuple(t)) for i, t in slices], end, mtime, inline or None, closing]
        if op == "compact":
            ino, chunk, old, new, drop = a
            return [ino, chunk, [Slice.from_tuple(t) for t in old], [Slice.from_tuple(t) for t in new],
                    [Slice.from_tuple(t) for t in drop]]
        return list(a)

    async def release(self, peer: str, ino: int) -> None:
        """`peer` closed its last handle on `ino`: free it if it is an orphan nobody uses."""
        s = self.open_by.get(ino)
        if s is not None:
            s.discard(peer)
            if not s:
                del self.open_by[ino]
        node = self.local.cached(ino)
        if node is not None and node.nlink == 0 and not self.is_open(ino):
            try:
                await self.mutate(self.me, "free", [ino], b"free-" + ino.to_bytes(8, "big") + b"-"
                                  + node.version.to_bytes(8, "big"))
            except Deposed:
                pass

    def stats(self) -> dict:
        return {"followers_with_callbacks": len({p for s in self.attr_cb.values() for p in s}),
                "open_elsewhere": len(self.open_by), "invalidations_sent": self.invalidations,
                "evictions": self.evictions}
