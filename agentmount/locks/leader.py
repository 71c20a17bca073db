"""`LockLeader`: a workspace's lock table, held by the peer that leads the workspace.

Every peer's flock/fcntl requests on the workspace come here (the leader's own directly,
the others' as ``ns.lk`` RPCs). Owners and waiting requests are qualified by peer: owner
``(peer, kernel lock owner)``, request ``(peer, FUSE token)``, so one table decides between
processes anywhere. A request that has to wait is answered ``["wait", epoch, qseq]``; when it
is granted the grant is pushed to its peer (``ns.lkgrant``, or a local call for our own),
never polled.

Sessions: a peer's locks belong to its session, which lives while the peer answers this
leader's pings (``PeerNode.seen``: the send time of the last answered ping) and lapses
`ttl` seconds after that — never before, so a peer that is only slow keeps its locks, and a
crashed one loses them after the TTL. A peer that comes back as a new incarnation (its
requests carry an incarnation id) loses its old session's locks at once.

Every lock granted gets a fencing token, (epoch, counter), readable as the locked file's
`user.agentmount.lock_token` xattr (the newest grant among its holders), so an agent can hand
it to whatever it writes to. Grants, releases and revocations (a session that lapsed) are
logged as `event=lock_acquired/released/revoked` and kept in `events` (the newest
EVENTS_KEPT) for `agentmount locks` and event subscribers.

Failover: a new leader starts in a grace period. Each peer re-asserts what it holds and what
it is waiting for (``reassert``); held locks go back into the table as they were, and waiting
requests are queued again at the end of the grace period in the order the old leader had
them (epoch, qseq). Every other request waits until the grace period ends: when every peer
alive at its start has re-asserted, or after `ttl` (by then a silent peer's locks would have
lapsed anyway). So nothing is granted that conflicts with a lock held before the failover.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Iterable

import trio

from agentmount.locks.table import F_RDLCK, F_UNLCK, LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN, LockTable, Waiter

log = logging.getLogger("agentmount.locks")

Notify = Callable[[str, Waiter, int], None]   # (peer, its waiting request, 0 = granted or an errno): push it
LastSeen = Callable[[str], "float | None"]           # peer -> trio time it was last known alive

CHECK_S = 0.25
EVENTS_KEPT = 1000
_GRACE_FREE = ("reassert", "cancel", "token", "list")   # served during the grace period


class LockLeader:
    """See module docstring."""

    def __init__(self, me: str, ws: str, ttl: float, notify: Notify, last_seen: LastSeen, *, epoch: int = 0,
                 expected: Iterable[str] = ()) -> None:
        self.me = me
        self.ws = ws
        self.ttl = ttl
        self.epoch = epoch
        self.table = LockTable()
        self._notify = notify
        self._last_seen = last_seen
        self._started: float | None = None   # when this leadership began to serve locks
        self._incarnation: dict[str, bytes] = {}
        self._peers_with_state: set[str] = set()
        self._qseq = 0
        # grace period: peers still expected to re-assert, and their waiting requests
        self._expected = set(expected)
        self._grace = trio.Event()
        self._requeue: list[tuple[tuple[int, int, str, int], str, list]] = []
        if not self._expected:
            self._grace.set()
        self.grants_pushed = 0
        self.sessions_expired = 0
        self.reasserted = 0
        self._counter = 0
        self._since: dict[tuple, tuple[float, int]] = {}   # (ino, owner) -> (granted at, token counter)
        self._wait_since: dict[tuple, float] = {}          # waiting request -> queued at
        self.events: deque[dict] = deque(maxlen=EVENTS_KEPT)
        # Hears every event too (what, inode, owner, details): journals it for webhooks.
        self.on_event: Callable[[str, Any, tuple, dict], None] | None = None

    async def run(self) -> None:
        """End the grace period in time; expire sessions of silent peers; until cancelled."""
        self._started = trio.current_time()
        while True:
            await trio.sleep(CHECK_S)
            if not self._grace.is_set() and trio.current_time() - self._started >= self.ttl:
                log.warning("event=lock_grace_timeout ws=%s silent=%s", self.ws, ",".join(sorted(self._expected)))
                self._end_grace()
            self._expire()

    @property
    def in_grace(self) -> bool:
        return not self._grace.is_set()

    # -- requests ----------------------------------------------------------------------------
    async def serve(self, peer: str, inc: bytes, a: list) -> Any:
        """A request of `peer`; during the grace period only re-assertions and cancels are
        served at once, everything else after it."""
        if not self._grace.is_set() and a and a[0] not in _GRACE_FREE:
            await self._grace.wait()
        return self.request(peer, inc, a)

    def request(self, peer: str, inc: bytes, a: list) -> Any:
        """One lock request of `peer` (incarnation `inc`): see `_do` for the forms of `a`."""
        if self._incarnation.get(peer) != inc:
            if peer in self._incarnation:
                log.warning("event=lock_session_restarted ws=%s peer=%s", self.ws, peer)
                self._drop_peer(peer)
            self._incarnation[peer] = inc
        return self._do(peer, a)

    def _do(self, peer: str, a: list) -> Any:
        kind = a[0]
        t = self.table
        if kind == "getlk":
            _, ino, owner, type, start, end = a
            c = t.getlk(ino, (peer, owner), type, start, end)
            return None if c is None else [c.type, c.start, c.end, c.pid, c.owner[0]]
        if kind == "setlk":
            _, ino, owner, type, start, end, pid, wait, token = a
            if type != F_UNLCK:
                self._peers_with_state.add(peer)
            res = t.setlk(ino, (peer, owner), type, start, end, pid, wait=bool(wait), ident=(peer, token))
            return self._answer(res, ino, (peer, owner), type, "posix", pid)
        if kind == "flock":
            _, ino, owner, type, pid, wait, token = a
            op = LOCK_UN if type == F_UNLCK else LOCK_SH if type == F_RDLCK else LOCK_EX
            if type != F_UNLCK:
                self._peers_with_state.add(peer)
            res = t.flock(ino, (peer, owner), op | (0 if wait else LOCK_NB), pid, ident=(peer, token))
            return self._answer(res, ino, (peer, owner), type, "flock", pid)
        if kind == "cancel":
            token = a[1]
            before = len(self._requeue)
            self._requeue = [r for r in self._requeue if not (r[1] == peer and r[2][-1] == token)]
            self._wait_since.pop((peer, token), None)
            return len(self._requeue) < before or t.cancel((peer, token)) is not None
        if kind in ("release_posix", "release_flock"):
            ino, o = a[1], (peer, a[2])
            self._granted((t.release_posix if kind == "release_posix" else t.release_flock)(ino, o))
            self._maybe_released(ino, o, "released")
            return 0
        if kind == "reassert":
            return self._reassert(peer, a[1], a[2])
        if kind == "token":
            return self.token_of(a[1])
        if kind == "list":
            return self.listing()
        raise ValueError(f"unknown lock request {kind!r}")

    def _answer(self, res, ino, owner, type: int, kind: str, pid: int) -> Any:
        if res.waiter is not None:
            self._wait_since[res.waiter.ident] = time.monotonic()
        elif not res.error and type != F_UNLCK:
            self._acquired(ino, owner, kind, type, pid)
        elif type == F_UNLCK or (res.error and kind == "flock"):
            self._maybe_released(ino, owner, "released")   # (a failed flock conversion drops the lock)
        self._granted(res.granted)
        if res.waiter is not None:
            self._qseq += 1
            return ["wait", self.epoch, self._qseq]
        return res.error

    def _granted(self, granted: tuple[Waiter, ...]) -> None:
        for w in granted:
            self.grants_pushed += 1
            self._wait_since.pop(w.ident, None)
            self._acquired(w.ino, w.owner, "flock" if w.flock else "posix", w.type, w.pid)
            self._notify(w.ident[0], w, 0)

    # -- tokens and events -------------------------------------------------------------------
    def _acquired(self, ino, owner, kind: str, type: int, pid: int) -> None:
        self._counter += 1
        self._since[(ino, owner)] = (time.monotonic(), self._counter)
        self._event("acquired", ino, owner, kind=kind, type="read" if type == F_RDLCK else "write", pid=pid,
                    token=f"{self.epoch}-{self._counter}")

    def _maybe_released(self, ino, owner, what: str) -> None:
        fl, posix = self.table.held(ino, owner)
        if fl is None and not posix and self._since.pop((ino, owner), None) is not None:
            self._event(what, ino, owner)

    def _event(self, what: str, ino, owner, **extra) -> None:
        ev = {"event": f"fs.lock.{what}", "ws": self.ws, "ino": ino, "peer": owner[0], "owner": owner[1],
              "time": time.time(), **extra}
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(what, ino, owner, extra)
        log.info("event=lock_%s ws=%s ino=%s peer=%s owner=%s%s", what, self.ws, ino, owner[0], owner[1],
                 "".join(f" {k}={v}" for k, v in extra.items()))

    def token_of(self, ino) -> str | None:
        """The fencing token of the newest grant among the current holders of `ino`."""
        best = max((v[1] for (i, _), v in self._since.items() if i == ino), default=None)
        return None if best is None else f"{self.epoch}-{best}"

    def listing(self) -> dict:
        """Held locks and waiters, for `agentmount locks`."""
        now, mono = trio.current_time(), time.monotonic()
        held, waiting = [], []
        for ino in self.table.inodes():
            for owner in self.table.owners():
                fl, posix = self.table.held(ino, owner)
                if fl is None and not posix:
                    continue
                since, counter = self._since.get((ino, owner), (mono, 0))
                base = {"ino": ino, "peer": owner[0], "age_s": round(mono - since, 3),
                        "ttl_left_s": self._ttl_left(owner[0], now), "token": f"{self.epoch}-{counter}"}
                if fl is not None:
                    held.append({**base, "kind": "flock", "type": _tname(fl[0]), "pid": fl[1]})
                for start, end, typ, pid in posix:
                    held.append({**base, "kind": "posix", "type": _tname(typ), "start": start, "end": end,
                                 "pid": pid})
            for w in self.table.waiting(ino):
                waiting.append({"ino": ino, "peer": w.ident[0], "kind": "flock" if w.flock else "posix",
                                "type": _tname(w.type), "start": w.start, "end": w.end, "pid": w.pid,
                                "waiting_s": round(mono - self._wait_since.get(w.ident, mono), 3)})
        return {"held": held, "waiting": waiting, "in_grace": self.in_grace, "epoch": self.epoch}

    def _ttl_left(self, peer: str, now: float) -> float | None:
        if peer == self.me:
            return None       # the leader's own locks live as long as its leadership
        return round(max(0.0, self.ttl - (now - self._alive_at(peer, now))), 3)

    def _alive_at(self, peer: str, now: float) -> float:
        """When `peer` was last known alive, counting no earlier than this leadership's start."""
        started = self._started if self._started is not None else now
        seen = self._last_seen(peer)
        return max(seen if seen is not None else started, started)

    # -- failover ----------------------------------------------------------------------------
    def _reassert(self, peer: str, held: list, waiting: list) -> int:
        """`peer` holds `held` ([ino, owner, "flock", type, pid] or [ino, owner, "posix", type,
        start, end, pid]) since before this leadership, and waits for `waiting` ([epoch, qseq,
        request]); returns how many held locks conflicted (0 unless a lock was granted twice)."""
        conflicts = 0
        for h in held:
            ino, owner, kind = h[0], h[1], h[2]
            if kind == "flock":
                res = self.table.flock(ino, (peer, owner), (LOCK_SH if h[3] == F_RDLCK else LOCK_EX) | LOCK_NB, h[4])
            else:
                res = self.table.setlk(ino, (peer, owner), h[3], h[4], h[5], h[6])
            if res.error:
                conflicts += 1
                log.error("event=lock_reassert_conflict ws=%s peer=%s ino=%s owner=%s", self.ws, peer, ino, owner)
            else:
                self._peers_with_state.add(peer)
                self.reasserted += 1
                if (ino, (peer, owner)) not in self._since:
                    self._counter += 1
                    self._since[(ino, (peer, owner))] = (time.monotonic(), self._counter)
        for epoch, qseq, req in waiting:
            if self.table.is_waiting((peer, req[-1])) or any(r[1] == peer and r[2][-1] == req[-1]
                                                               for r in self._requeue):
                continue     # re-asserted twice
            if self._grace.is_set():
                self._enqueue_again(peer, req)
            else:
                self._requeue.append(((epoch, qseq, peer, req[-1]), peer, req))
        self._expected.discard(peer)
        if not self._grace.is_set() and not self._expected:
            self._end_grace()
        return conflicts

    def _end_grace(self) -> None:
        self._grace.set()
        for _, peer, req in sorted(self._requeue, key=lambda r: r[0]):
            self._enqueue_again(peer, req)
        self._requeue = []

    def _enqueue_again(self, peer: str, req: list) -> None:
        """Queue a request that waited at the old leader; it is answered by a pushed grant, or an
        error pushed the same way (the peer holds its token as waiting)."""
        r = self._do(peer, req)
        if isinstance(r, int):
            kind, ino, owner = req[0], req[1], req[2]
            self._notify(peer, Waiter((peer, req[-1]), ino, (peer, owner), kind == "flock", 0, 0, 0, 0), r)

    # -- sessions ----------------------------------------------------------------------------
    def _expire(self) -> None:
        now = trio.current_time()
        assert self._started is not None
        for peer in list(self._peers_with_state):
            if peer == self.me:
                continue
            alive_at = self._alive_at(peer, now)
            if now - alive_at > self.ttl:
                log.warning("event=lock_session_expired ws=%s peer=%s silent_s=%.1f", self.ws, peer, now - alive_at)
                self.sessions_expired += 1
                self._drop_peer(peer)

    def _drop_peer(self, peer: str) -> None:
        self._peers_with_state.discard(peer)
        self._requeue = [r for r in self._requeue if r[1] != peer]
        for owner in [o for o in self.table.owners() if o[0] == peer]:
            inos = [i for i in self.table.inodes() if self.table.held(i, owner) != (None, [])]
            granted, cancelled = self.table.release_owner(owner)
            for w in cancelled:
                self._wait_since.pop(w.ident, None)
            for ino in inos:
                self._maybe_released(ino, owner, "revoked")
            self._granted(granted)

    def stats(self) -> dict:
        return {"files": len(self.table), "grants_pushed": self.grants_pushed, "in_grace": self.in_grace,
                "sessions_expired": self.sessions_expired, "reasserted": self.reasserted}


def _tname(type: int) -> str:
    return "read" if type == F_RDLCK else "write"
