"""Quorum leases for workspace leadership (PaxosLease / Chubby style).

Owns: `LeaseConfig` (the timings), `Voter` (the acceptor side: the RPC kinds
``lease.prepare``, ``lease.accept``, ``lease.release``) and `LeaseManager`
(the candidate/leader side: acquire, renew, release, campaign, and the
queries the namespace layer asks before serving: `is_leader`,
`current_epoch`, `leader_of`). Every peer runs one of each; the peer's
RpcServer handler hands the `LEASE_KINDS` to `Voter.handle`. The durable
voter state lives in `promises.PromiseStore`.

Protocol (per workspace). Two numbers: the *ballot* orders voting rounds
(Paxos proposal numbers), the *epoch* names one continuous leadership and is
the fencing token. A leadership's epoch is the ballot that established it.
- A candidate picks ballot = highest seen + 1 and sends PREPARE(ballot) to
  every peer, itself included (its own voter is called in-process). A voter
  promises the ballot if it is above its promise (or equal and promised to the
  same candidate: a retry) and it holds no live lease for *another* leader.
- On a majority of promises the candidate sends ACCEPT(ballot, epoch=ballot).
  A voter accepts a ballot not below its promise (equal only for the
  candidate it promised) and an epoch not below the last one it accepted,
  records the lease and holds it for the voter lease (`lease_s +
  voter_extra_s`) from the moment it replies.
- On a majority of accepts the candidate is leader until its own timer runs
  out: `prepare_sent + lease_s`.
- Renewals are ACCEPT rounds of the same ballot and epoch (no PREPARE, no disk
  write: nothing changes but the voters' timers); each one that reaches a
  majority moves the deadline to `round_sent + lease_s`. If a voter refused
  because it promised a higher ballot (to a candidate that then lost), the
  next renewal first re-PREPAREs at a fresh ballot (granted by voters whose
  live lease is ours or expired), then ACCEPTs it with the *same* epoch, so
  that voter rejoins without the fencing token changing. Renewals start
  `renew_s` after the previous success and are retried until the deadline.
- RELEASE(epoch) from the leader clears the voters' lease (not the promise).

Invariants:
- No two leases overlap in time. ACCEPT(b) is only sent after a majority
  promised b, and a voter that promised b refuses lower ballots, so a later
  leader's promise majority intersects the old leader's last renewal
  majority in a voter that promised only after its own lease ran out; that
  voter lease started after the leader's round was sent and is longer than
  the leader lease by `voter_extra_s` (the margin for clock-rate drift), so
  the old leader's deadline passed first.
- The epoch is the fencing token: it never repeats for a workspace (ballots
  are promised to one candidate each and persisted before replying, see
  `promises`), it is constant for one continuous leadership, and a
  leadership that lapsed is never revived: the next one has a new, higher
  epoch. Stamp journal records with `current_epoch()` / `Leadership.check()`.
- `is_leader`, `Leadership.valid` and `current_epoch` compare the deadline
  with the clock on every call, so they turn False the instant the deadline
  passes even if every task is stuck or the process was stopped. A renewal
  reply that arrives after the deadline does not revive the lease. The
  `Leadership.lost` event and the `on_change("lost", ...)` callback fire at the
  first check or timer after the deadline.
- Durations only: all timing uses trio's monotonic clock (`trio.current_time`),
  never wall time. CLOCK_MONOTONIC stops while the host is suspended, so a
  leader also keeps its deadline on CLOCK_BOOTTIME (which does not) and
  `valid()` checks both: a leader that wakes from a suspend is not fooled.
  (Voters only hold longer across a suspend, which is safe.) After a restart a voter treats any lease it had granted
  as live for the full voter lease, counted from the moment it loaded its
  state (it cannot know how long it was down).
- A voter takes the candidate's name from the authenticated RPC sender, never
  from the message alone.
- With no other peers (single-peer mode, the embedded default) the same code
  runs, a majority is the local voter, and nobody can contest the lease, so
  it has no deadline (`Leadership.deadline == inf`) and needs no renewals.
- Candidates that lose a round back off with random jitter (doubling up to
  `lease_s / 2`); they wait for a known live lease of another leader (from
  their own voter or from refusals) to run out before trying again. A
  contested PREPARE round waits only a short grace for missing votes after
  the first refusal (a dead peer would otherwise hold it for the whole call
  timeout).
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Protocol

import trio

from .promises import MAX_EPOCH, Promise, PromiseStore, check_workspace
from .rpc import PeerError, RemoteError

log = logging.getLogger("agentmount.peer")

KIND_PREPARE = "lease.prepare"
KIND_ACCEPT = "lease.accept"
KIND_RELEASE = "lease.release"
LEASE_KINDS = frozenset({KIND_PREPARE, KIND_ACCEPT, KIND_RELEASE})

_CLOCK_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def _boottime() -> float:
    """Seconds on a clock that keeps counting while the host is suspended (Linux CLOCK_BOOTTIME)."""
    return time.clock_gettime(_CLOCK_BOOTTIME) if _CLOCK_BOOTTIME is not None else time.monotonic()


def _positive(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
    return float(v)


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    """Lease timings in seconds (config keys `[lease] duration_s`, `renew_s` map onto
    `lease_s`, `renew_s`).

    - `lease_s`: how long a leader may serve after sending a successful round.
    - `renew_s`: renewal period; at most `lease_s / 2`, so a failed renewal has
      at least one more try before the deadline.
    - `voter_extra_s`: voters hold a lease `lease_s + voter_extra_s`; the
      margin covers clock-rate drift between peers.
    - `rpc_timeout_s`: deadline of one vote call (default `min(renew_s, lease_s / 4)`).
    - `backoff_s`, `backoff_max_s`: candidate backoff after a lost round (random
      jitter in [0.5, 1.5) x the current value, doubling up to the max,
      default `lease_s / 2`).
    """
    lease_s: float = 5.0
    renew_s: float = 1.5
    voter_extra_s: float = 0.5
    rpc_timeout_s: float | None = None
    backoff_s: float = 0.05
    backoff_max_s: float | None = None

    def __post_init__(self) -> None:
        lease = _positive("lease_s", self.lease_s)
        renew = _positive("renew_s", self.renew_s)
        if renew > lease / 2:
            raise ValueError(f"renew_s ({renew:g}) must be at most half of lease_s ({lease:g})")
        extra = self.voter_extra_s
        if isinstance(extra, bool) or not isinstance(extra, (int, float)) or not math.isfinite(extra) or extra < 0:
            raise ValueError(f"voter_extra_s must be a non-negative number of seconds, got {extra!r}")
        if self.rpc_timeout_s is not None:
            _positive("rpc_timeout_s", self.rpc_timeout_s)
        _positive("backoff_s", self.backoff_s)
        if self.backoff_max_s is not None:
            _positive("backoff_max_s", self.backoff_max_s)

    @property
    def voter_lease_s(self) -> float:
        return self.lease_s + self.voter_extra_s

    @property
    def call_timeout_s(self) -> float:
        return self.rpc_timeout_s if self.rpc_timeout_s is not None else min(self.renew_s, self.lease_s / 4)

    @property
    def max_backoff_s(self) -> float:
        return self.backoff_max_s if self.backoff_max_s is not None else max(self.backoff_s, self.lease_s / 2)


class NotLeader(Exception):
    """This peer does not (or no longer) hold the lease of `workspace`; `leader` is a hint."""

    def __init__(self, workspace: str, leader: str | None = None, message: str = "") -> None:
        super().__init__(message or f"not the leader of workspace {workspace!r}"
                         + (f" (leader: {leader})" if leader else ""))
        self.workspace = workspace
        self.leader = leader


class LeaseUnavailable(NotLeader):
    """`acquire` timed out: another peer holds the lease, or no majority answered."""


# -- voter -----------------------------------------------------------------------------------

_BODY_KEYS = {KIND_PREPARE: ("workspace", "ballot", "candidate"),
              KIND_ACCEPT: ("workspace", "ballot", "epoch", "candidate"),
              KIND_RELEASE: ("workspace", "epoch", "candidate")}


def _parse_body(kind: str, body: Any) -> list[Any]:
    keys = _BODY_KEYS[kind]
    if not isinstance(body, dict) or set(body) != set(keys):
        raise RemoteError("bad_request", f"{kind} body must be {{{', '.join(keys)}}}")
    try:
        check_workspace(body["workspace"])
    except ValueError as e:
        raise RemoteError("bad_request", str(e)) from None
    for k in ("ballot", "epoch"):
        v = body.get(k, 1)
        if type(v) is not int or not 1 <= v <= MAX_EPOCH:
            raise RemoteError("bad_request", f"{k} must be a positive int, got {v!r}")
    cand = body["candidate"]
    if not isinstance(cand, str) or not cand:
        raise RemoteError("bad_request", "candidate must be a peer name")
    return [body[k] for k in keys]


class Voter:
    """The acceptor of one peer, for every workspace. Methods must run inside trio.

    Replies (the RPC reply bodies and the return values of `prepare`/`accept`/`release`)::

        {"ok": bool, "reason": "promised" | "accepted" | "released" | "stale" | "leased" | "not_holder",
         "promised": int, "promised_to": str | None, "accepted": int, "epoch": int,
         "leader": str | None, "remaining": float}

    `promised`/`accepted` are ballots; `epoch`/`leader`/`remaining` describe the
    last lease this voter granted (remaining 0 when it is not live). State
    changes are persisted before the reply is returned; operations on one
    workspace are serialized.
    """

    def __init__(self, store: PromiseStore | str | os.PathLike[str], config: LeaseConfig | None = None) -> None:
        """`store`: a `PromiseStore` or the peer's data dir (its `leases/` is opened and locked)."""
        self.store = store if isinstance(store, PromiseStore) else PromiseStore(store)
        self.config = config if config is not None else LeaseConfig()
        self._state: dict[str, Promise] = self.store.load_all()
        self._expires: dict[str, float] = {}   # trio clock; only for workspaces with a leader
        self._restored: list[str] | None = [ws for ws, p in self._state.items() if p.leader is not None]
        self._loaded_at = time.monotonic()
        self._locks: dict[str, trio.Lock] = {}
        self.writes = 0
        if self._state:
            log.info("event=voter_loaded dir=%s workspaces=%d holding=%s", self.store.dir, len(self._state),
                     ",".join(self._restored) or "-")

    def _materialize(self) -> None:
        """Start the restored lease windows (full voter lease from load time), on first use in trio."""
        restored, self._restored = self._restored, None
        if not restored:
            return
        start = trio.current_time() - max(0.0, time.monotonic() - self._loaded_at)
        for ws in restored:
            p = self._state[ws]
            self._expires[ws] = start + max(p.lease_s, self.config.voter_lease_s)

    def _lock(self, ws: str) -> trio.Lock:
        lock = self._locks.get(ws)
        if lock is None:
            lock = self._locks[ws] = trio.Lock()
        return lock

    def promise(self, workspace: str) -> Promise:
        """The current (durable) state of `workspace`."""
        return self._state.get(workspace) or Promise(workspace)

    def live_lease(self, workspace: str) -> tuple[str, int, float] | None:
        """(leader, epoch, expiry on the trio clock) of the lease this voter holds, if live."""
        self._materialize()
        p = self._state.get(workspace)
        if p is None or p.leader is None:
            return None
        exp = self._expires.get(workspace, 0.0)
        if exp <= trio.current_time():
            return None
        return p.leader, p.epoch, exp

    def _reply(self, ws: str, ok: bool, reason: str) -> dict[str, Any]:
        p = self.promise(ws)
        live = self.live_lease(ws)
        return {"ok": ok, "reason": reason, "promised": p.promised, "promised_to": p.promised_to,
                "accepted": p.accepted, "epoch": p.epoch, "leader": p.leader,
                "remaining": max(0.0, live[2] - trio.current_time()) if live else 0.0}

    async def _commit(self, new: Promise) -> None:
        if new != self.promise(new.workspace):
            await trio.to_thread.run_sync(self.store.save, new)
            self._state[new.workspace] = new   # no checkpoint between the durable write and this
            self.writes += 1

    @staticmethod
    def _stale(p: Promise, ballot: int, candidate: str) -> bool:
        return ballot < p.promised or (ballot == p.promised and p.promised_to != candidate)

    async def prepare(self, workspace: str, ballot: int, candidate: str) -> dict[str, Any]:
        check_workspace(workspace)
        async with self._lock(workspace):
            self._materialize()
            p = self.promise(workspace)
            if self._stale(p, ballot, candidate):
                return self._reply(workspace, False, "stale")
            live = self.live_lease(workspace)
            if live is not None and live[0] != candidate:
                return self._reply(workspace, False, "leased")
            await self._commit(replace(p, promised=ballot, promised_to=candidate))
            log.debug("event=lease_promised ws=%s ballot=%d candidate=%s", workspace, ballot, candidate)
            return self._reply(workspace, True, "promised")

    async def accept(self, workspace: str, ballot: int, epoch: int, candidate: str) -> dict[str, Any]:
        check_workspace(workspace)
        if not 1 <= epoch <= ballot:
            raise ValueError(f"epoch {epoch} must be in 1..ballot ({ballot})")
        async with self._lock(workspace):
            self._materialize()
            p = self.promise(workspace)
            if self._stale(p, ballot, candidate) or epoch < p.epoch \
                    or (epoch == p.epoch and p.leader not in (None, candidate)):
                return self._reply(workspace, False, "stale")
            # ballot >= promise: a majority promised it to `candidate`, so any other lease this
            # voter may still hold (necessarily of a lower ballot) is over at its leader.
            await self._commit(replace(p, promised=ballot, promised_to=candidate, accepted=ballot, epoch=epoch,
                                       leader=candidate, lease_s=self.config.voter_lease_s))
            self._expires[workspace] = trio.current_time() + self.config.voter_lease_s
            return self._reply(workspace, True, "accepted")

    async def release(self, workspace: str, epoch: int, candidate: str) -> dict[str, Any]:
        check_workspace(workspace)
        async with self._lock(workspace):
            self._materialize()
            p = self.promise(workspace)
            if p.leader != candidate or p.epoch != epoch:
                return self._reply(workspace, False, "not_holder")
            await self._commit(replace(p, leader=None))
            self._expires.pop(workspace, None)
            log.info("event=lease_released ws=%s epoch=%d leader=%s", workspace, epoch, candidate)
            return self._reply(workspace, True, "released")

    async def handle(self, sender: str, kind: str, body: Any, epoch: int | None) -> dict[str, Any]:
        """RpcServer handler for the `LEASE_KINDS`; the candidate must be the authenticated sender."""
        if kind not in LEASE_KINDS:
            raise RemoteError("unknown_kind", kind)
        args = _parse_body(kind, body)
        if args[-1] != sender:
            raise RemoteError("bad_request", f"candidate {args[-1]!r} is not the sender {sender!r}")
        if kind == KIND_PREPARE:
            return await self.prepare(*args)
        if kind == KIND_ACCEPT:
            if args[2] > args[1]:
                raise RemoteError("bad_request", "epoch must not exceed ballot")
            return await self.accept(*args)
        return await self.release(*args)

    def close(self) -> None:
        self.store.close()


def _valid_reply(r: Any) -> bool:
    if not isinstance(r, dict) or not isinstance(r.get("ok"), bool) or not isinstance(r.get("reason"), str):
        return False
    if any(type(r.get(k)) is not int for k in ("promised", "accepted", "epoch")):
        return False
    if not isinstance(r.get("leader"), (str, type(None))) or not isinstance(r.get("promised_to"), (str, type(None))):
        return False
    rem = r.get("remaining")
    return isinstance(rem, (int, float)) and not isinstance(rem, bool) and math.isfinite(rem) and rem >= 0


# -- leader side -----------------------------------------------------------------------------

class PeerCaller(Protocol):
    """What the manager needs of a remote peer: `RpcClient.call`."""

    async def call(self, kind: str, body: Any = None, *, epoch: int | None = None,
                   timeout: float | None = None, retries: int | None = None,
                   request_id: bytes | None = None) -> Any: ...


class Leadership:
    """One continuous leadership of a workspace by this peer, under one epoch.

    Times are on trio's clock. `deadline` only grows (renewals) and is checked
    on every `valid()`; once invalid, a Leadership never becomes valid again.
    """

    def __init__(self, manager: "LeaseManager", workspace: str, epoch: int, prepared_at: float,
                 acquired_at: float, deadline: float) -> None:
        self._manager = manager
        self.workspace = workspace
        self.epoch = epoch
        self.ballot = epoch          # the ballot renewals use; moves up when a voter must rejoin
        self.reprepare = False       # a voter promised a higher ballot: PREPARE before the next ACCEPT
        self.prepared_at = prepared_at
        self.acquired_at = acquired_at
        self.deadline = deadline
        self.renewals = 0
        self.lost = trio.Event()
        self.lost_reason: str | None = None   # "expired" | "superseded" | "released" | "stopped"
        self.lost_at: float | None = None
        self._boot_deadline = deadline - trio.current_time() + _boottime()   # the same instant on CLOCK_BOOTTIME

    def _extend(self, trio_sent: float, boot_sent: float, lease_s: float) -> None:
        self.deadline = max(self.deadline, trio_sent + lease_s)
        self._boot_deadline = max(self._boot_deadline, boot_sent + lease_s)

    def valid(self) -> bool:
        """True while this peer may act as leader (checks the clock now)."""
        if self.lost_reason is not None:
            return False
        if self.deadline == math.inf:      # alone: never lapses (and checked on every change)
            return True
        if trio.current_time() >= self.deadline or _boottime() >= self._boot_deadline:
            self._manager._lose(self, "expired")
            return False
        return True

    def remaining(self) -> float:
        """Seconds left before the deadline (0 when no longer valid)."""
        return max(0.0, self.deadline - trio.current_time()) if self.valid() else 0.0

    def check(self) -> int:
        """The epoch (fencing token) if still valid, else raise `NotLeader`."""
        if not self.valid():
            raise NotLeader(self.workspace, self._manager.leader_of(self.workspace))
        return self.epoch

    def __repr__(self) -> str:
        return (f"Leadership(ws={self.workspace!r}, epoch={self.epoch}, deadline={self.deadline:.3f}, "
                f"lost={self.lost_reason!r})")


class _Round:
    """Votes of one broadcast; `decided` is set once the outcome is known."""

    def __init__(self, need: int, total: int, grace: float | None) -> None:
        self.need = need
        self.total = total
        self.granted: list[str] = []
        self.refused: list[tuple[str, dict[str, Any]]] = []
        self.failed: list[str] = []
        self.decided = trio.Event()
        self.grace = grace
        self.scope: trio.CancelScope | None = None

    def add(self, peer: str, reply: dict[str, Any] | None) -> None:
        if reply is None:
            self.failed.append(peer)
        elif reply["ok"]:
            self.granted.append(peer)
        else:
            self.refused.append((peer, reply))
            if self.grace is not None and self.scope is not None:
                # Contested: another candidate or a live lease. Give the missing votes only a
                # short grace instead of the full call timeout (a dead peer would hold every
                # contested round for the whole timeout), then back off and retry.
                self.scope.deadline = min(self.scope.deadline, trio.current_time() + self.grace)
        no = len(self.refused) + len(self.failed)
        if len(self.granted) >= self.need or no > self.total - self.need or len(self.granted) + no >= self.total:
            self.decided.set()

    def __repr__(self) -> str:
        refused = ",".join(f"{p}:{x['reason']}@{x['promised']}" for p, x in self.refused)
        return f"granted={','.join(self.granted) or '-'} refused={refused or '-'} failed={','.join(self.failed) or '-'}"


class _Ws:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ballot = 0          # highest ballot seen (promised/accepted anywhere, or tried)
        self.epoch = 0           # highest epoch seen
        self.leadership: Leadership | None = None
        self.last: Leadership | None = None
        self.hint: tuple[str, int, float] | None = None   # (leader, epoch, expiry) from replies
        self.acquire_lock = trio.Lock()
        self.campaign_scope: trio.CancelScope | None = None
        self.released_epoch = 0


Listener = Callable[[str, Leadership], None]


class LeaseManager:
    """Candidate and leader side for one peer. Start with ``await nursery.start(mgr.run)``
    (or ``async with running(..., mgr)``), after the RpcClients in `peers`.

    `peers` maps the *other* peers' names to callers (`RpcClient`s); the local
    `voter` is the peer's own vote. `on_change(event, leadership)` is called
    synchronously for "acquired", "renewed" and "lost" (`leadership.lost_reason`
    says why); it must not block.
    """

    def __init__(self, name: str, voter: Voter, peers: Mapping[str, PeerCaller],
                 config: LeaseConfig | None = None, *, on_change: Listener | None = None,
                 rng: random.Random | None = None) -> None:
        if name in peers:
            raise ValueError(f"peers must not include this peer ({name!r})")
        self.name = name
        self.voter = voter
        self.peers = dict(peers)
        self.config = config if config is not None else voter.config
        if self.config.voter_lease_s != voter.config.voter_lease_s:
            raise ValueError("the voter and the manager must use the same LeaseConfig")
        self.quorum = (len(self.peers) + 1) // 2 + 1
        self._rng = rng if rng is not None else random.Random()
        self._listeners: list[Listener] = [on_change] if on_change is not None else []
        self._wss: dict[str, _Ws] = {}
        self._nursery: trio.Nursery | None = None

    # -- lifecycle --

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._nursery is not None:
            raise RuntimeError("LeaseManager.run can only be started once")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            for st in self._wss.values():
                if st.leadership is not None:
                    self._lose(st.leadership, "stopped")

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is None:
            raise RuntimeError("LeaseManager.run is not running")
        self._nursery.start_soon(fn, *args)

    def _ws(self, ws: str) -> _Ws:
        st = self._wss.get(ws)
        if st is None:
            st = self._wss[check_workspace(ws)] = _Ws(ws)
        return st

    def _emit(self, event: str, lead: Leadership) -> None:
        for cb in self._listeners:
            try:
                cb(event, lead)
            except Exception:
                log.exception("event=lease_listener_failed ws=%s listener_event=%s", lead.workspace, event)

    # -- queries (synchronous; each checks the clock) --

    def leadership(self, workspace: str) -> Leadership | None:
        """The live leadership of `workspace`, or None."""
        st = self._wss.get(workspace)
        lead = st.leadership if st is not None else None
        return lead if lead is not None and lead.valid() else None

    def is_leader(self, workspace: str) -> bool:
        return self.leadership(workspace) is not None

    def current_epoch(self, workspace: str) -> int | None:
        """The fencing token to stamp on records: our epoch while we lead, else None."""
        lead = self.leadership(workspace)
        return lead.epoch if lead is not None else None

    def highest_epoch(self, workspace: str) -> int:
        """The highest epoch this peer has seen for `workspace` (its voter's or in replies)."""
        st = self._wss.get(workspace)
        return max(st.epoch if st is not None else 0, self.voter.promise(workspace).epoch)

    def observe_epoch(self, workspace: str, epoch: int) -> None:
        """An epoch seen elsewhere (in the stores, or a leader's reply): the next ballot this
        peer tries is above it, so a leadership it wins has a higher fencing token."""
        st = self._ws(workspace)
        st.ballot = max(st.ballot, epoch)
        st.epoch = max(st.epoch, epoch)

    def _highest_ballot(self, st: _Ws) -> int:
        p = self.voter.promise(st.name)
        return max(st.ballot, p.promised, p.accepted)

    def leader_of(self, workspace: str) -> str | None:
        """The leader as far as this peer knows: itself, the holder of the lease its own
        voter granted, or a live lease reported by other voters. A hint, may be None."""
        if self.is_leader(workspace):
            return self.name
        live = self.voter.live_lease(workspace)
        if live is not None and live[0] != self.name:
            return live[0]
        st = self._wss.get(workspace)
        if st is not None and st.hint is not None and st.hint[0] != self.name \
                and st.hint[2] > trio.current_time():
            return st.hint[0]
        return None

    def campaigning(self, workspace: str) -> bool:
        st = self._wss.get(workspace)
        return st is not None and st.campaign_scope is not None

    # -- acquiring --

    async def try_acquire(self, workspace: str) -> Leadership | None:
        """One PREPARE/ACCEPT round at a fresh ballot; the Leadership, or None if refused."""
        st = self._ws(workspace)
        async with st.acquire_lock:
            lead = self.leadership(workspace)
            if lead is not None:
                return lead
            cfg = self.config
            ballot = st.ballot = self._highest_ballot(st) + 1
            t0, boot0 = trio.current_time(), _boottime()
            limit = t0 + cfg.lease_s
            r = await self._broadcast(st, KIND_PREPARE, ballot, 0, min(limit, t0 + cfg.call_timeout_s))
            if len(r.granted) < self.quorum:
                log.debug("event=lease_prepare_lost ws=%s ballot=%d %s", workspace, ballot, r)
                return None
            now = trio.current_time()
            r = await self._broadcast(st, KIND_ACCEPT, ballot, ballot, min(limit, now + cfg.call_timeout_s))
            if len(r.granted) < self.quorum:
                log.debug("event=lease_accept_lost ws=%s ballot=%d %s", workspace, ballot, r)
                return None
            now = trio.current_time()
            deadline = limit if self.peers else math.inf
            if now >= deadline:
                return None
            lead = Leadership(self, workspace, ballot, t0, now, deadline)
            if self.peers:
                lead._boot_deadline = boot0 + cfg.lease_s
            lead.reprepare = self._someone_ahead(r, ballot)
            st.leadership = st.last = lead
            st.hint = None
            st.epoch = max(st.epoch, ballot)
            self._spawn(self._keep, st, lead)
            log.info("event=lease_acquired ws=%s epoch=%d peer=%s round_ms=%.1f", workspace, ballot, self.name,
                     (now - t0) * 1000)
            self._emit("acquired", lead)
            return lead

    async def acquire(self, workspace: str, *, timeout: float | None = None) -> Leadership:
        """Become leader of `workspace` (or return the current leadership): waits out live
        leases of others, retries with jittered backoff; `LeaseUnavailable` after `timeout`."""
        st = self._ws(workspace)
        with trio.move_on_after(math.inf if timeout is None else timeout):
            lead = await self._pursue(st, forever=False)
            assert lead is not None
            return lead
        raise LeaseUnavailable(workspace, self.leader_of(workspace),
                               f"could not acquire workspace {workspace!r} within {timeout:g}s"
                               f" (leader: {self.leader_of(workspace)})")

    def campaign(self, workspace: str) -> None:
        """Keep trying to lead `workspace` in the background (until `stop_campaign`/`release`)."""
        st = self._ws(workspace)
        if st.campaign_scope is None:
            st.campaign_scope = trio.CancelScope()
            self._spawn(self._campaign, st, st.campaign_scope)

    def stop_campaign(self, workspace: str) -> None:
        st = self._wss.get(workspace)
        if st is not None and st.campaign_scope is not None:
            st.campaign_scope.cancel()
            st.campaign_scope = None

    async def _campaign(self, st: _Ws, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._pursue(st, forever=True)
        finally:
            if st.campaign_scope is scope:
                st.campaign_scope = None

    def _blocked_until(self, st: _Ws) -> float | None:
        """When the latest known live lease of another leader runs out, if any."""
        until = None
        live = self.voter.live_lease(st.name)
        if live is not None and live[0] != self.name:
            until = live[2]
        if st.hint is not None and st.hint[0] != self.name and st.hint[2] > trio.current_time():
            until = st.hint[2] if until is None else max(until, st.hint[2])
        return until

    async def _pursue(self, st: _Ws, *, forever: bool) -> Leadership | None:
        cfg = self.config
        backoff = cfg.backoff_s
        while True:
            lead = self.leadership(st.name)
            if lead is not None:
                if not forever:
                    return lead
                await lead.lost.wait()
                backoff = cfg.backoff_s
                continue
            until = self._blocked_until(st)
            if until is not None:
                await trio.sleep_until(until + self._rng.uniform(0, 2 * cfg.backoff_s))
                continue
            if await self.try_acquire(st.name) is not None:
                backoff = cfg.backoff_s
                continue
            await trio.sleep(backoff * self._rng.uniform(0.5, 1.5))
            backoff = min(backoff * 2, cfg.max_backoff_s)

    # -- keeping --

    async def _keep(self, st: _Ws, lead: Leadership) -> None:
        """Renew `lead` until it is lost; fire the loss at the deadline at the latest."""
        cfg = self.config
        if math.isinf(lead.deadline):
            await lead.lost.wait()
            return
        next_at = lead.prepared_at + cfg.renew_s
        while lead.valid():
            with trio.move_on_at(min(next_at, lead.deadline)):
                await lead.lost.wait()
            if not lead.valid():
                return
            now = trio.current_time()
            if now < next_at:
                continue
            if await self._renew(st, lead):
                next_at = now + cfg.renew_s
            else:
                next_at = trio.current_time() + cfg.renew_s / 3

    async def _renew(self, st: _Ws, lead: Leadership) -> bool:
        cfg = self.config
        sent, boot_sent = trio.current_time(), _boottime()
        limit = min(lead.deadline, sent + cfg.call_timeout_s)
        if lead.reprepare:
            ballot = st.ballot = self._highest_ballot(st) + 1
            r = await self._broadcast(st, KIND_PREPARE, ballot, 0, limit)
            if len(r.granted) < self.quorum:
                log.warning("event=lease_reprepare_failed ws=%s epoch=%d ballot=%d %s", st.name, lead.epoch,
                            ballot, r)
                return False
            lead.ballot = ballot
            lead.reprepare = False
        r = await self._broadcast(st, KIND_ACCEPT, lead.ballot, lead.epoch, limit)
        if self._someone_ahead(r, lead.ballot):
            lead.reprepare = True
        if len(r.granted) >= self.quorum:
            if not lead.valid():           # too late: a lapsed lease is never revived
                return False
            lead._extend(sent, boot_sent, cfg.lease_s)
            lead.renewals += 1
            self._emit("renewed", lead)
            return True
        log.warning("event=lease_renew_failed ws=%s epoch=%d ballot=%d remaining_ms=%.0f %s", st.name,
                    lead.epoch, lead.ballot, max(0.0, lead.deadline - trio.current_time()) * 1000, r)
        return False

    def _someone_ahead(self, r: "_Round", ballot: int) -> bool:
        """A voter refused because it promised a higher ballot (or promised ours to another)."""
        return any(x["reason"] == "stale" and x["promised"] >= ballot for _, x in r.refused)

    def _lose(self, lead: Leadership, reason: str) -> None:
        if lead.lost_reason is not None:
            return
        lead.lost_reason = reason
        lead.lost_at = trio.current_time()
        st = self._wss.get(lead.workspace)
        if st is not None and st.leadership is lead:
            st.leadership = None
        lead.lost.set()
        level = logging.INFO if reason in ("released", "stopped") else logging.WARNING
        log.log(level, "event=lease_lost ws=%s epoch=%d peer=%s reason=%s late_ms=%.1f", lead.workspace,
                lead.epoch, self.name, reason, max(0.0, lead.lost_at - lead.deadline) * 1000)
        self._emit("lost", lead)

    # -- releasing --

    async def release(self, workspace: str) -> None:
        """Stop campaigning, stop leading (at once), and tell the voters so others need not
        wait for the lease to run out."""
        st = self._wss.get(workspace)
        if st is None:
            return
        self.stop_campaign(workspace)
        lead = st.last
        if lead is None or st.released_epoch >= lead.epoch:
            return
        self._lose(lead, "released")
        st.released_epoch = lead.epoch
        now = trio.current_time()
        await self._broadcast(st, KIND_RELEASE, 0, lead.epoch, now + self.config.call_timeout_s)

    async def release_all(self) -> None:
        """`release` every workspace (for a clean shutdown: followers take over at once)."""
        async with trio.open_nursery() as n:
            for ws in list(self._wss):
                n.start_soon(self.release, ws)

    # -- voting rounds --

    async def _broadcast(self, st: _Ws, kind: str, ballot: int, epoch: int, deadline: float) -> _Round:
        """Send `kind` to every peer and the local voter; return once a majority granted, a
        majority is impossible, or `deadline` passed (for PREPARE: or a short grace after the
        first refusal). Stragglers finish in the background."""
        grace = 2 * self.config.backoff_s if kind == KIND_PREPARE else None
        r = _Round(self.quorum, len(self.peers) + 1, grace)
        timeout = max(0.001, deadline - trio.current_time())
        args: tuple[Any, ...] = {KIND_PREPARE: (ballot,), KIND_ACCEPT: (ballot, epoch),
                                 KIND_RELEASE: (epoch,)}[kind]
        body = dict(zip(_BODY_KEYS[kind], (st.name, *args, self.name)))
        self._spawn(self._call_local, st, r, kind, args)
        for name, peer in self.peers.items():
            self._spawn(self._call_remote, st, r, name, peer, kind, body, timeout)
        with trio.CancelScope(deadline=deadline) as r.scope:   # the votes run only once we wait
            await r.decided.wait()
        return r

    async def _call_local(self, st: _Ws, r: _Round, kind: str, args: tuple[Any, ...]) -> None:
        fn = {KIND_PREPARE: self.voter.prepare, KIND_ACCEPT: self.voter.accept,
              KIND_RELEASE: self.voter.release}[kind]
        try:
            reply = await fn(st.name, *args, self.name)
        except Exception:
            log.exception("event=lease_local_vote_failed ws=%s kind=%s", st.name, kind)
            r.add(self.name, None)
            return
        self._learn(st, reply)
        r.add(self.name, reply)

    async def _call_remote(self, st: _Ws, r: _Round, name: str, peer: PeerCaller, kind: str,
                           body: dict[str, Any], timeout: float) -> None:
        try:
            reply = await peer.call(kind, body, timeout=timeout, retries=1)
        except PeerError as e:
            log.debug("event=lease_vote_failed ws=%s kind=%s peer=%s error=%s", st.name, kind, name, e)
            r.add(name, None)
            return
        except Exception:
            log.exception("event=lease_vote_failed ws=%s kind=%s peer=%s", st.name, kind, name)
            r.add(name, None)
            return
        if not _valid_reply(reply):
            log.warning("event=lease_bad_reply ws=%s kind=%s peer=%s reply=%r", st.name, kind, name,
                        str(reply)[:200])
            r.add(name, None)
            return
        self._learn(st, reply)
        r.add(name, reply)

    def _learn(self, st: _Ws, reply: dict[str, Any]) -> None:
        st.ballot = max(st.ballot, reply["promised"], reply["accepted"])
        st.epoch = max(st.epoch, reply["epoch"])
        leader, rem = reply["leader"], reply["remaining"]
        if leader is not None and leader != self.name and rem > 0:
            now = trio.current_time()
            exp = now + rem
            h = st.hint
            if h is None or h[2] <= now or reply["epoch"] > h[1] or (reply["epoch"] == h[1] and exp > h[2]):
                st.hint = (leader, reply["epoch"], exp)
