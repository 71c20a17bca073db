"""A lock table: flock and POSIX record locks of one lock namespace, as pure logic.

No I/O, no clock, no trio: every call returns at once with what happened, including the
waiters that it granted (the caller answers them). So the same table can serve one peer's
FUSE requests now and live in a workspace leader later, with owners qualified by session.

Keys are opaque and hashable: `ino` names a file, `owner` a lock owner, `ident` a waiting
request (a FUSE request token). Semantics follow Linux:

flock (owner = an open file description):
  - LOCK_SH / LOCK_EX / LOCK_UN, LOCK_NB fails with EAGAIN (== EWOULDBLOCK) instead of waiting;
  - converting SH <-> EX is not atomic (flock(2)): the old lock goes first, waiters may get in
    between, and a failed LOCK_NB conversion leaves the owner with no lock at all;
  - release_flock(): the last close of the file description.

POSIX record locks (owner = the kernel's lock_owner: a process's file table for fcntl
F_SETLK/F_SETLKW; the open file description for OFD locks, which FUSE delivers the same way):
  - byte ranges [start, end] inclusive, end = OFFSET_MAX for "to the end of the file";
  - an owner's own locks never conflict with each other: a new lock replaces the owner's
    overlapping ranges (splitting them), and adjacent or overlapping ranges of the same type
    merge; F_UNLCK splits; unlocking what is not held is a no-op;
  - F_SETLK fails with EAGAIN on conflict; F_SETLKW waits, or fails with EDEADLK when the
    owners it would wait for are (transitively) waiting for it (wait-for graph over all inodes
    of the table, like Linux's posix_locks_deadlock; OFD owners take part too, as FUSE does not
    tell them apart);
  - getlk() reports one conflicting lock (type, range, pid), the lowest-starting one;
  - release_posix(): any close by the owner (FUSE's flush carries its lock_owner).

Waiters are kept in arrival order and granted in that order as soon as their request no longer
conflicts with a held lock (checked again after every release, downgrade and grant). A waiter
never blocks another waiter, so, as on Linux, no deadlock arises that the holders did not
create (and, as on Linux, a stream of shared lockers can keep an exclusive waiter waiting).
cancel() (the waiter's process got a signal: EINTR) leaves nothing behind.
"""
from __future__ import annotations

import errno
import fcntl
from dataclasses import dataclass, field
from typing import Hashable, NamedTuple

F_RDLCK = fcntl.F_RDLCK
F_WRLCK = fcntl.F_WRLCK
F_UNLCK = fcntl.F_UNLCK
LOCK_SH = fcntl.LOCK_SH
LOCK_EX = fcntl.LOCK_EX
LOCK_UN = fcntl.LOCK_UN
LOCK_NB = fcntl.LOCK_NB
OFFSET_MAX = (1 << 63) - 1


@dataclass(slots=True)
class Seg:
    """One POSIX lock of an owner: [start, end] inclusive."""
    start: int
    end: int
    type: int
    pid: int


@dataclass(eq=False, slots=True)
class Waiter:
    """A request waiting for its lock."""
    ident: Hashable
    ino: Hashable
    owner: Hashable
    flock: bool
    type: int        # F_RDLCK / F_WRLCK
    start: int
    end: int
    pid: int


class Result(NamedTuple):
    """What a request did: `error` (0 = done, or waiting if `waiter` is set), and the other
    waiters it let through, in grant order; the caller answers those with success."""
    error: int = 0
    waiter: Waiter | None = None
    granted: tuple[Waiter, ...] = ()


class Conflict(NamedTuple):
    type: int
    start: int
    end: int
    pid: int
    owner: Hashable


@dataclass(slots=True)
class _Inode:
    posix: dict = field(default_factory=dict)     # owner -> [Seg] sorted by start, disjoint, merged
    flocks: dict = field(default_factory=dict)    # owner -> (type, pid)
    waiters: list = field(default_factory=list)   # Waiter, arrival order

    def empty(self) -> bool:
        return not self.posix and not self.flocks and not self.waiters


def _conflicts(a: int, b: int) -> bool:
    return a == F_WRLCK or b == F_WRLCK


class LockTable:
    """See module docstring."""

    def __init__(self) -> None:
        self._inodes: dict[Hashable, _Inode] = {}
        self._waiters: dict[Hashable, Waiter] = {}
        self._posix_waiting: dict[Hashable, list[Waiter]] = {}   # owner -> its waiting POSIX requests

    # -- queries -------------------------------------------------------------------------
    def getlk(self, ino, owner, type: int, start: int, end: int) -> Conflict | None:
        """F_GETLK: a lock of another owner that a `type` lock on [start, end] would conflict with."""
        node = self._inodes.get(ino)
        if node is None or type == F_UNLCK:
            return None
        best: Conflict | None = None
        for o, s in _posix_conflicts(node, owner, type, start, end):
            if best is None or s.start < best.start:
                best = Conflict(s.type, s.start, s.end, s.pid, o)
        return best

    def posix_locks(self, ino, owner) -> list[tuple[int, int, int]]:
        """The owner's POSIX locks on `ino` as (start, end, type), sorted."""
        node = self._inodes.get(ino)
        return [(s.start, s.end, s.type) for s in node.posix.get(owner, ())] if node else []

    def flock_of(self, ino, owner) -> int | None:
        """The owner's flock type on `ino` (F_RDLCK / F_WRLCK), or None."""
        node = self._inodes.get(ino)
        held = node.flocks.get(owner) if node else None
        return held[0] if held else None

    def waiting(self, ino=None) -> list[Waiter]:
        if ino is None:
            return list(self._waiters.values())
        node = self._inodes.get(ino)
        return list(node.waiters) if node else []

    def is_waiting(self, ident) -> bool:
        return ident in self._waiters

    def inodes(self) -> list:
        """The inodes with any lock or waiter."""
        return list(self._inodes)

    def held(self, ino, owner) -> tuple[tuple[int, int] | None, list[tuple[int, int, int, int]]]:
        """What `owner` holds on `ino`: its flock as (type, pid) or None, and its POSIX locks as
        (start, end, type, pid), sorted."""
        node = self._inodes.get(ino)
        if node is None:
            return None, []
        return node.flocks.get(owner), [(s.start, s.end, s.type, s.pid) for s in node.posix.get(owner, ())]

    def owners(self) -> set:
        """Every owner that holds a lock or has a request waiting."""
        out = {w.owner for w in self._waiters.values()}
        for node in self._inodes.values():
            out.update(node.posix)
            out.update(node.flocks)
        return out

    def has_state(self, ino) -> bool:
        return ino in self._inodes

    def __len__(self) -> int:
        return len(self._inodes)

    # -- requests ------------------------------------------------------------------------
    def setlk(self, ino, owner, type: int, start: int, end: int, pid: int = 0, *, wait: bool = False,
              ident: Hashable = None) -> Result:
        """F_SETLK (wait=False) / F_SETLKW (wait=True) of `type` on [start, end]."""
        if start < 0 or end < start or type not in (F_RDLCK, F_WRLCK, F_UNLCK):
            return Result(errno.EINVAL)
        node = self._inodes.get(ino)
        if type == F_UNLCK:
            if node is None or not _set_range(node, owner, start, end, F_UNLCK, pid):
                return Result()
            return Result(granted=self._settle(ino, node))
        if node is None:
            node = self._inodes[ino] = _Inode()
        blockers = _posix_blockers(node, owner, type, start, end)
        if not blockers:
            _set_range(node, owner, start, end, type, pid)
            return Result(granted=self._settle(ino, node))
        if not wait:
            self._drop_if_empty(ino, node)
            return Result(errno.EAGAIN)
        if self._deadlock(owner, blockers):
            self._drop_if_empty(ino, node)
            return Result(errno.EDEADLK)
        w = self._enqueue(Waiter(ident, ino, owner, False, type, start, end, pid), node)
        self._posix_waiting.setdefault(owner, []).append(w)
        return Result(waiter=w)

    def flock(self, ino, owner, op: int, pid: int = 0, *, ident: Hashable = None) -> Result:
        """flock(2): op is LOCK_SH, LOCK_EX or LOCK_UN, optionally | LOCK_NB."""
        base = op & ~LOCK_NB
        if base not in (LOCK_SH, LOCK_EX, LOCK_UN):
            return Result(errno.EINVAL)
        node = self._inodes.get(ino)
        held = node.flocks.get(owner) if node else None
        if base == LOCK_UN:
            if held is None:
                return Result()
            del node.flocks[owner]
            return Result(granted=self._settle(ino, node))
        type = F_RDLCK if base == LOCK_SH else F_WRLCK
        if held is not None and held[0] == type:
            return Result()
        if node is None:
            node = self._inodes[ino] = _Inode()
        granted: tuple[Waiter, ...] = ()
        if held is not None:
            # A conversion drops the old lock first, and whoever waited for it may get in.
            del node.flocks[owner]
            granted = tuple(self._grant_waiters(node))
        if not _flock_blockers(node, owner, type):
            node.flocks[owner] = (type, pid)
            return Result(granted=granted + tuple(self._grant_waiters(node)))
        if op & LOCK_NB:
            self._drop_if_empty(ino, node)
            return Result(errno.EAGAIN, granted=granted)
        w = self._enqueue(Waiter(ident, ino, owner, True, type, 0, OFFSET_MAX, pid), node)
        return Result(waiter=w, granted=granted)

    def cancel(self, ident) -> Waiter | None:
        """Withdraw a waiting request (interrupted); returns it, or None if it was not waiting."""
        w = self._waiters.pop(ident, None)
        if w is None:
            return None
        node = self._inodes[w.ino]
        node.waiters.remove(w)
        self._forget_posix_waiter(w)
        self._drop_if_empty(w.ino, node)
        return w

    def release_posix(self, ino, owner) -> tuple[Waiter, ...]:
        """Drop all of the owner's POSIX locks on `ino` (close by the owner)."""
        node = self._inodes.get(ino)
        if node is None or node.posix.pop(owner, None) is None:
            return ()
        return self._settle(ino, node)

    def release_flock(self, ino, owner) -> tuple[Waiter, ...]:
        """Drop the owner's flock on `ino` (last close of the open file description)."""
        node = self._inodes.get(ino)
        if node is None or node.flocks.pop(owner, None) is None:
            return ()
        return self._settle(ino, node)

    def release_owner(self, owner) -> tuple[tuple[Waiter, ...], tuple[Waiter, ...]]:
        """Drop everything of `owner` on every inode (e.g. a dead session): (granted, cancelled)."""
        granted: list[Waiter] = []
        cancelled = [w for w in self._waiters.values() if w.owner == owner]
        for w in cancelled:
            self.cancel(w.ident)
        for ino, node in list(self._inodes.items()):
            a = node.posix.pop(owner, None)
            b = node.flocks.pop(owner, None)
            if a is not None or b is not None:
                granted.extend(self._settle(ino, node))
        return tuple(granted), tuple(cancelled)

    # -- internals -----------------------------------------------------------------------
    def _enqueue(self, w: Waiter, node: _Inode) -> Waiter:
        if w.ident is None or w.ident in self._waiters:
            raise ValueError(f"a waiting request needs a unique ident, got {w.ident!r}")
        node.waiters.append(w)
        self._waiters[w.ident] = w
        return w

    def _forget_posix_waiter(self, w: Waiter) -> None:
        if w.flock:
            return
        lst = self._posix_waiting.get(w.owner)
        if lst is not None:
            lst.remove(w)
            if not lst:
                del self._posix_waiting[w.owner]

    def _grant_waiters(self, node: _Inode) -> list[Waiter]:
        """Grant, in arrival order, every waiter that no held lock blocks any more."""
        granted: list[Waiter] = []
        again = True
        while again and node.waiters:
            again = False
            for w in list(node.waiters):
                if w.flock:
                    if _flock_blockers(node, w.owner, w.type):
                        continue
                    node.flocks[w.owner] = (w.type, w.pid)
                else:
                    if _posix_blockers(node, w.owner, w.type, w.start, w.end):
                        continue
                    # The owner's own ranges may be downgraded by this: look again afterwards.
                    again = _set_range(node, w.owner, w.start, w.end, w.type, w.pid)
                node.waiters.remove(w)
                del self._waiters[w.ident]
                self._forget_posix_waiter(w)
                granted.append(w)
        return granted

    def _settle(self, ino, node: _Inode) -> tuple[Waiter, ...]:
        granted = tuple(self._grant_waiters(node)) if node.waiters else ()
        self._drop_if_empty(ino, node)
        return granted

    def _drop_if_empty(self, ino, node: _Inode) -> None:
        if node.empty():
            self._inodes.pop(ino, None)

    def _deadlock(self, owner, blockers: set) -> bool:
        """Whether some owner in `blockers` waits, directly or through others, for `owner`."""
        stack = list(blockers)
        seen = set()
        while stack:
            o = stack.pop()
            if o == owner:
                return True
            if o in seen:
                continue
            seen.add(o)
            for w in self._posix_waiting.get(o, ()):
                stack.extend(_posix_blockers(self._inodes[w.ino], o, w.type, w.start, w.end))
        return False


def _posix_conflicts(node: _Inode, owner, type: int, start: int, end: int):
    """(owner, first segment) of every other owner with a lock conflicting with `type` on [start, end]."""
    for o, segs in node.posix.items():
        if o == owner:
            continue
        for s in segs:
            if s.start > end:
                break
            if s.end >= start and _conflicts(type, s.type):
                yield o, s
                break


def _posix_blockers(node: _Inode, owner, type: int, start: int, end: int) -> set:
    return {o for o, _ in _posix_conflicts(node, owner, type, start, end)}


def _flock_blockers(node: _Inode, owner, type: int) -> list:
    return [o for o, (t, _) in node.flocks.items() if o != owner and _conflicts(type, t)]


def _set_range(node: _Inode, owner, start: int, end: int, type: int, pid: int) -> bool:
    """Make the owner's locks on [start, end] exactly `type` (F_UNLCK: none): split what
    overlaps, then merge neighbours of the same type. Returns whether any range or type changed."""
    old: list[Seg] = node.posix.get(owner, [])
    out: list[Seg] = []
    for s in old:
        if s.end < start or s.start > end:
            out.append(s)
            continue
        if s.start < start:
            out.append(Seg(s.start, start - 1, s.type, s.pid))
        if s.end > end:
            out.append(Seg(end + 1, s.end, s.type, s.pid))
    new = Seg(start, end, type, pid)
    if type != F_UNLCK:
        out.append(new)
    out.sort(key=lambda s: s.start)
    merged: list[Seg] = []
    for s in out:
        last = merged[-1] if merged else None
        if last is not None and last.type == s.type and last.end + 1 >= s.start:
            last.end = max(last.end, s.end)
            if s is new:
                last.pid = pid   # the newest lock's pid wins
        else:
            merged.append(Seg(s.start, s.end, s.type, s.pid) if s is not new else new)
    changed = [(s.start, s.end, s.type) for s in merged] != [(s.start, s.end, s.type) for s in old]
    if merged:
        node.posix[owner] = merged
    else:
        node.posix.pop(owner, None)
    return changed
