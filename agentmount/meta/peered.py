"""A workspace's namespace on a peer that may lead it or follow its leader.

`PeeredNamespace` is the `NamespaceService` the VFS uses for every workspace,
with or without other peers. It campaigns for the workspace's lease; while
this peer leads (`LEADER`) it holds the `LocalNamespace` (loaded from the
stores at the lease's epoch, which it stamps on the journal with an `epoch`
marker record) and serves followers through a `LeaderRole`. Otherwise
(`FOLLOWER`) every operation is one RPC to the leader, except what its
attribute/entry cache answers: that cache is trusted only while the leader
is heard from (pings) at the epoch and callback generation it was filled
under, and entries are dropped when the leader says so (`ns.inval`) — which
it does before the changing call returns. A follower's kernel is given no
cache timeouts (so nothing stale can outlive a daemon-side invalidation).

Failover: a change carries a request id; if the leader dies or is deposed
the call is retried, same id, at whichever peer leads next (a replayed id
gets its first outcome there, see `RequestIds`) until
`failover_timeout_s` has passed, then EIO — never a hang.

With no other peers the lease is taken at once and never lapses: the same
code, and every read goes straight to the local state.
"""
from __future__ import annotations

import enum
import errno
import logging
from typing import Any, Awaitable, Callable

import trio

from agentmount.chunks.layout import Slice
from agentmount.config import Config
from agentmount.errors import Deposed, FsError
from agentmount.locks.leader import LockLeader
from agentmount.meta import actor
from agentmount.meta import journal as jr
from agentmount.meta import reqids as rids
from agentmount.meta import workspaces as wsreg
from agentmount.meta.leader import LeaderRole, attr_list
from agentmount.meta.service import LocalNamespace, NamespaceService
from agentmount.meta.state import Inode
from agentmount.peer.lease import Leadership, NotLeader
from agentmount.peer.node import PeerNode
from agentmount.peer.rpc import PeerError, PeerUnavailable, RemoteError
from agentmount.peer.wire import new_id
from backend.store import ObjectStore

log = logging.getLogger("agentmount.meta")

CACHE_MAX = 200_000
# How long a follower's acknowledgement of an invalidation waits for its kernel. Dropping a
# dentry takes the directory's lock, which an operation of ours may hold while it waits for
# the very leader that waits for this ack: past this, we ack and the kernel catches up as
# soon as that operation ends (the waiting invalidation is next in line for the lock).
KERNEL_INVAL_WAIT = 0.2


class Role(enum.Enum):
    ELECTING = "electing"
    LEADER = "leader"
    FOLLOWER = "follower"


class KernelHooks:
    """What the namespace asks of the FUSE side (set by the VFS); local inode numbers."""

    async def inval(self, attrs: list[int], data: list[int], entries: list[tuple[int, bytes]]) -> None:
        return None

    async def reset(self) -> None:
        return None

    def open_inodes(self) -> list[int]:
        return []

    def pending_sids(self) -> list[str]:
        """Ids of blocks stored here for writes not committed yet (the leader's sweep spares them)."""
        return []

    def attrs_stale(self, ino: int) -> None:
        """Drop the kernel's attributes of `ino` now (never blocks)."""

    def is_open(self, ino: int) -> bool:
        return False


LeadHook = Callable[[LocalNamespace, jr.Loaded], Awaitable[None]]


class PeeredNamespace(NamespaceService):
    """See module docstring."""

    def __init__(self, cfg: Config, store: ObjectStore, node: PeerNode, name: str, info: dict,
                 kernel: KernelHooks, on_lead: LeadHook) -> None:
        self.cfg = cfg
        self.store = store
        self.node = node
        self.ws = name
        self.info = info
        self.chunk_size = info.get("chunk_size", cfg.chunk_size)
        self.kernel = kernel
        self.on_lead = on_lead
        self.me = node.name
        self.multi = node.multi
        self.failover_timeout = cfg.lease.failover_timeout_s
        # Set by the VFS: this peer's lock state of an inode (an object with `.fenced`) while it
        # holds locks there or has fenced them, else None. A call about such an inode that finds
        # no leader gives up as soon as it is fenced, instead of at the failover bound.
        self.lock_state: Callable[[int], Any] | None = None
        self.invalidate_timeout = cfg.lease.invalidate_timeout_s
        self.role = Role.ELECTING
        self.locks: LockLeader | None = None   # the lock table, while leading
        self.lead: Leadership | None = None
        self.local: LocalNamespace | None = None
        self.leader: LeaderRole | None = None
        self._changed = trio.Event()
        self._ready = trio.Event()
        self.load_error: BaseException | None = None
        # follower state
        self.epoch = 0                   # highest epoch heard of
        self.cbgen = 0                   # our callback generation at the leader (evictions)
        self.leader_name: str | None = None
        self.gen = 0                     # bumped by every invalidation (a fetch racing one is not cached)
        self.attrs: dict[int, Inode] = {}
        self.entries: dict[tuple[int, bytes], int] = {}
        self.slice_cache: dict[int, dict[int, list[Slice]]] = {}   # ino -> chunk -> slices
        self.rpcs = 0
        self.failovers = 0
        self._fresh: dict[int, Inode] = {}   # created here with the open noted by the leader
        self._lost_changes = False           # deposed with changes of ours not durable
        self.closing = False                 # shutting down: no more serving other peers
        self.on_gc: Callable[[str], object] | None = None
        self.before_snapshot = None
        # Locks: the lock service's hooks (a grant pushed to us; the leader changed, so
        # requests waiting at the old one are void), and the lock TTL (a lock call gives up
        # with ENOLCK after twice it).
        self.on_lock_grant: Callable[[int, dict], None] | None = None
        self.on_lock_leader_change: Callable[[], None] | None = None
        self.lock_ttl = cfg.lease.lock_ttl_s
        # Runs while this peer leads (cancelled when the leadership ends): event delivery.
        self.while_leading: Callable[[LocalNamespace], Awaitable[None]] | None = None

    # -- roles ---------------------------------------------------------------------------------
    def _set_role(self, role: Role) -> None:
        self.role = role
        ev, self._changed = self._changed, trio.Event()
        ev.set()

    @property
    def kernel_cacheable(self) -> bool:
        """Whether the kernel may cache attributes and entries of this workspace now: while
        leading, or following a leader that will tell us of changes (see `_trusted`)."""
        return self.kernel_ttl() > 0

    def _leading(self) -> LeaderRole | None:
        lead = self.lead
        if self.role is Role.LEADER and lead is not None and lead.valid():
            return self.leader
        return None

    async def run(self) -> None:
        """Campaign for the lease and serve while leading, until cancelled."""
        leases = self.node.leases
        got = trio.Event()
        self.node.ns_handlers[self.ws] = self._serve

        def listener(event: str, lead: Leadership) -> None:
            if lead.workspace == self.ws and event == "acquired":
                got.set()
        leases.add_listener(listener)
        if not self.multi:
            # A lone peer leads at once; the mount serves only once it has loaded (or failed).
            await leases.acquire(self.ws)
        leases.campaign(self.ws)
        try:
            while True:
                lead = leases.leadership(self.ws)
                if lead is None:
                    if self.role is not Role.FOLLOWER:
                        self._set_role(Role.FOLLOWER)
                    self._ready.set()
                    got = trio.Event()
                    await got.wait()
                    continue
                await self._lead(lead)
                if self.load_error is not None:
                    return
        finally:
            self.node.ns_handlers.pop(self.ws, None)
            leases.stop_campaign(self.ws)

    async def wait_ready(self) -> None:
        """Until the first role is known (single peer: loaded and leading, or the load error)."""
        await self._ready.wait()
        if self.load_error is not None:
            raise self.load_error

    async def _lead(self, lead: Leadership) -> None:
        """Load the workspace at `lead`'s epoch and serve it until the lease is lost."""
        cfg = self.cfg
        try:
            # A retry reaches the next leader within the failover bound of its first try:
            # request ids are remembered that long, plus a margin for clock skew between peers.
            loaded = await wsreg.recover(self.store, self.ws, self.info, cfg.chunk_size,
                                         rid_seconds=self.failover_timeout + rids.SKEW_SECONDS)
        except Exception as e:
            await self._takeover_failed(lead, e)
            return
        if loaded.epoch >= lead.epoch:
            # The stores hold a newer epoch than our lease (peers or data dirs changed): take a
            # lease above it so the fencing token keeps growing.
            log.warning("event=epoch_behind_store ws=%s lease_epoch=%d store_epoch=%d", self.ws, lead.epoch,
                        loaded.epoch)
            self.node.leases.observe_epoch(self.ws, loaded.epoch)
            await self.node.leases.release(self.ws)
            self.node.leases.campaign(self.ws)
            return
        journal = jr.Journal(self.store, self.ws, lead.epoch, loaded.state.seq,
                             window=cfg.fs.commit_window_ms / 1000, timeout=cfg.fs.store_timeout_s)
        journal.fence = lead.valid
        local = LocalNamespace(self.store, loaded.state, journal, snapshot_records=cfg.fs.snapshot_records,
                               gc_grace=cfg.fs.gc_grace_s)

        def fence() -> None:
            if not lead.valid():
                raise Deposed(self.ws)
        local.fence = fence
        local.strict_inodes = self.multi
        local.on_gc = self.on_gc
        local.before_snapshot = self.before_snapshot
        role = LeaderRole(self.me, local, lead.epoch, send_inval=self._send_inval, kernel_inval=self.kernel.inval,
                          is_open_here=self.kernel.is_open, invalidate_timeout=self.invalidate_timeout)
        failed: Exception | None = None
        async with trio.open_nursery() as n:
            # Peers alive now re-assert their locks before anything new is granted (grace).
            expected = {self.me} | self._may_hold_locks() if self.multi else ()
            locks = LockLeader(self.me, self.ws, self.lock_ttl,
                               lambda peer, w, err: self._notify_grant(n, peer, lead.epoch, w, err),
                               self._heard_from, epoch=lead.epoch, expected=expected)
            locks.on_event = lambda what, ino, owner, details: local.lock_event(what, ino, owner[0], details)
            n.start_soon(local.run)
            try:
                local._commit({"op": "epoch", "gap": self.multi})
                await journal.wait_durable()
                self.local = local
                await self.on_lead(local, loaded)
                if self.multi:
                    await self._reset_followers(lead.epoch, role)
            except Deposed:
                n.cancel_scope.cancel()
                return
            except Exception as e:
                failed = e
                journal._depose()
                n.cancel_scope.cancel()
            else:
                self.lead, self.leader, self.epoch = lead, role, lead.epoch
                self.locks = locks
                self.leader_name = self.me
                self._drop_all()
                self._lock_leader_changed()
                self._set_role(Role.LEADER)
                n.start_soon(locks.run)     # the grace period runs from now
                if self.while_leading is not None:
                    n.start_soon(self.while_leading, local)
                self._ready.set()
                log.warning("event=leading ws=%s epoch=%d seq=%d replayed=%d", self.ws, lead.epoch,
                            loaded.state.seq, loaded.replayed)
                await lead.lost.wait()
                log.warning("event=deposed ws=%s epoch=%d reason=%s", self.ws, lead.epoch, lead.lost_reason)
                if journal.durable_seq < journal.last_seq:
                    # Changes made through our own mount were answered before they were durable
                    # and are gone with our epoch: the next sync here must not report success.
                    self._lost_changes = True
                journal._depose()
                self.leader = None
                self.locks = None
                self.leader_name = None
                self._lock_leader_changed()
                self._set_role(Role.ELECTING)
                n.cancel_scope.cancel()
        if failed is not None:
            self.local = None
            await self._takeover_failed(lead, failed)
            return
        self.failovers += 1
        # Our kernel cached entries and pages while we led: from now on only the new leader
        # knows, so they go before we answer as a follower.
        with trio.move_on_after(self.invalidate_timeout):
            await self.kernel.reset()
        self._set_role(Role.FOLLOWER)

    async def _takeover_failed(self, lead: Leadership, e: Exception) -> None:
        """Loading or starting a leadership failed. A single peer cannot mount; with peers, a
        store outage during a takeover must not take the daemon down: give the lease back
        (another peer may fare better) and campaign again a little later."""
        if not self.multi:
            self.load_error = e      # wait_ready raises it: the mount fails with its reason
            self._ready.set()
            return
        log.error("event=takeover_failed ws=%s epoch=%d error=%s", self.ws, lead.epoch, e)
        with trio.move_on_after(self.invalidate_timeout):
            await self.node.leases.release(self.ws)
        await trio.sleep(1.0)
        self.node.leases.campaign(self.ws)

    async def _reset_followers(self, epoch: int, role: LeaderRole) -> None:
        """Before serving as a new leader: every reachable peer drops what it cached and tells
        which inodes it holds open (bounded; the others re-register when they find us)."""
        with trio.move_on_after(self.invalidate_timeout):
            async with trio.open_nursery() as n:
                for peer in self.node.clients:
                    # A peer not heard from lately trusts no cache of its own (its pings to
                    # the old leader fail too): waiting for it would only delay the takeover.
                    seen = self.node.seen.get(peer)
                    if seen is not None and trio.current_time() - seen[0] < self.invalidate_timeout + 1.0:
                        n.start_soon(self._reset_one, peer, epoch, role)

    async def _reset_one(self, peer: str, epoch: int, role: LeaderRole) -> None:
        try:
            reply = await self.node.call(peer, "ns.reset", {"ws": self.ws, "e": epoch},
                                         timeout=self.invalidate_timeout, retries=1)
        except (PeerUnavailable, RemoteError):
            return
        if isinstance(reply, dict):
            for ino in reply.get("open") or ():
                if isinstance(ino, int) and ino in role.local.state.inodes:
                    role.open_by.setdefault(ino, set()).add(peer)

    @property
    def leading(self) -> bool:
        return self._leading() is not None

    async def pending_elsewhere(self) -> set[str] | None:
        """Block ids the other peers hold for uncommitted writes; None unless every one answered."""
        if not self.multi:
            return set()
        out: set[str] = set()
        missing: list[str] = []

        async def ask(peer: str) -> None:
            try:
                r = await self.node.call(peer, "ns.pending", {"ws": self.ws}, timeout=self.invalidate_timeout,
                                         retries=1)
            except (PeerUnavailable, RemoteError):
                missing.append(peer)
                return
            if not isinstance(r, list):
                missing.append(peer)
                return
            out.update(x for x in r if isinstance(x, str))
        async with trio.open_nursery() as n:
            for peer in self.node.clients:
                n.start_soon(ask, peer)
        return None if missing else out

    async def _send_inval(self, peer: str, body: dict) -> Any:
        return await self.node.call(peer, "ns.inval", body, timeout=self.invalidate_timeout, retries=2)

    # -- serving RPCs --------------------------------------------------------------------------
    async def _serve(self, sender: str, op: str, body: dict) -> Any:
        if op == "inval":
            return await self._on_inval(sender, body)
        if op == "reset":
            return await self._on_reset(sender, body)
        if op == "pending":
            return self.kernel.pending_sids()
        if op == "lkgrant":
            return self._on_lock_grant(sender, body)
        role = self._leading()
        if role is None or self.closing:
            raise RemoteError("not_leader", f"{self.me} does not lead {self.ws}")
        try:
            if op == "lk":
                locks = self.locks
                inc, a = body.get("inc"), body.get("a")
                if locks is None or not isinstance(inc, bytes) or not isinstance(a, list) or not a:
                    raise RemoteError("bad_request", "a lock request needs inc and a")
                try:
                    out = await locks.serve(sender, inc, a)
                    if a[0] == "list":
                        out = self._with_paths(out)
                except (ValueError, TypeError) as e:
                    raise RemoteError("bad_request", f"lock request: {e}") from None
            else:
                out = await role.serve(sender, op, body)
        except FsError as e:
            raise RemoteError("fs", str(e.errno)) from None
        except (Deposed, NotLeader):
            raise RemoteError("not_leader", f"{self.me} no longer leads {self.ws}") from None
        if self._leading() is not role:
            raise RemoteError("not_leader", f"{self.me} no longer leads {self.ws}")
        return {"r": out, "e": role.epoch, "g": role.cbgen.get(sender, 0)}

    # -- locks ---------------------------------------------------------------------------------
    def lock_leader(self) -> LockLeader | None:
        """The workspace's lock table when this peer leads it (requests go there directly)."""
        return self.locks if self._leading() is not None else None

    async def lock_rpc(self, a: list, inc: bytes) -> Any:
        """One lock request at the workspace's leader, wherever it is; ENOLCK when no leader
        answers within twice `lock_ttl_s`: a new leader holds requests through its grace
        period, which alone may last `lock_ttl_s` from when it starts serving."""
        rid = new_id()

        async def local() -> tuple[bool, Any]:
            leader = self.lock_leader()
            if leader is None:
                return False, None
            out = await leader.serve(self.me, inc, a)
            return True, self._with_paths(out) if a[0] == "list" else out

        target, reply = await self._at_leader("ns.lk", {"ws": self.ws, "a": a, "inc": inc},
                                              trio.current_time() + 2 * self.lock_ttl, err=errno.ENOLCK,
                                              per_try=1.0, request_id=lambda: rid, local=local)
        return reply if target is None else reply["r"]

    def lock_contact(self) -> float | None:
        """When this peer last knew the workspace's lock table to be reachable (trio clock):
        now while leading, else the send time of the last ping the leader answered."""
        if self._leading() is not None:
            return trio.current_time()
        if self.leader_name is not None and self.leader_name != self.me:
            seen = self.node.seen.get(self.leader_name)
            return seen[0] if seen is not None else None
        return None

    async def lock_listing(self, inc: bytes) -> dict:
        """The leader's held locks and waiters, each with the file's path."""
        out = await self.lock_rpc(["list"], inc)
        if not isinstance(out, dict):
            raise FsError(errno.EIO, "malformed lock listing")
        return out

    def _with_paths(self, listing: dict) -> dict:
        local = self.local
        if local is None:
            return listing
        paths = local.annotator.paths        # kept current by every record the leader applies
        for e in listing["held"] + listing["waiting"]:
            e["path"] = paths.path(e["ino"]) or None
        return listing

    def _may_hold_locks(self) -> set[str]:
        """The peers whose lock sessions may still live: every one heard from within the lock
        TTL (a dead leader too: if it is only cut off, its processes keep their locks until it
        fences itself), and, while this peer is younger than the TTL, those never heard from."""
        now = trio.current_time()
        young = now - self.node.started_at < self.lock_ttl
        return {p for p in self.node.clients
                if (p in self.node.seen and now - self.node.seen[p][0] < self.lock_ttl)
                or (p not in self.node.seen and young)}

    def _heard_from(self, peer: str) -> float | None:
        seen = self.node.seen.get(peer)
        return seen[0] if seen is not None else None

    def _notify_grant(self, nursery: trio.Nursery, peer: str, epoch: int, w, err: int) -> None:
        body = {"ws": self.ws, "e": epoch, "t": w.ident[1], "i": w.ino, "o": w.owner[1], "f": w.flock, "err": err}
        if peer == self.me:
            self._on_lock_grant(peer, body)
        else:
            nursery.start_soon(self._push_grant, peer, epoch, body)

    async def _push_grant(self, peer: str, epoch: int, body: dict) -> None:
        """Tell `peer` its waiting request was granted (retried while our leadership lasts)."""
        for attempt in range(20):
            try:
                await self.node.call(peer, "ns.lkgrant", body, timeout=max(1.0, self.invalidate_timeout),
                                     retries=1)
                return
            except (PeerError, trio.TooSlowError) as e:
                if self.lead is None or self.lead.epoch != epoch or self._leading() is None:
                    return      # our leadership ended: the new leader's table decides
                log.warning("event=lock_grant_push_failed ws=%s peer=%s try=%d error=%s", self.ws, peer,
                            attempt + 1, e)
                await trio.sleep(min(0.1 * 2 ** attempt, 1.0))

    def _on_lock_grant(self, sender: str, body: dict) -> bool:
        e = body.get("e")
        if not isinstance(e, int) or e < self.epoch or not isinstance(body.get("t"), int):
            return True     # from a deposed leader: its grants are void
        if self.on_lock_grant is not None:
            self.on_lock_grant(body["t"], body)
        return True

    def _lock_leader_changed(self) -> None:
        if self.on_lock_leader_change is not None:
            self.on_lock_leader_change()

    async def _on_inval(self, sender: str, body: dict) -> bool:
        e = body.get("e")
        if not isinstance(e, int) or e < self.epoch:
            return True     # from a deposed leader: nothing to apply
        self._adopt(sender, e)
        attrs = [i for i in body.get("a") or [] if isinstance(i, int)]
        data = [i for i in body.get("d") or [] if isinstance(i, int)]
        entries = [(x[0], x[1]) for x in body.get("n") or [] if isinstance(x, list) and len(x) == 2]
        self._drop(attrs, entries)
        with trio.move_on_after(KERNEL_INVAL_WAIT):
            await self.kernel.inval(attrs, data, entries)
        return True

    async def _on_reset(self, sender: str, body: dict) -> dict:
        e = body.get("e")
        if isinstance(e, int) and e >= self.epoch:
            self._adopt(sender, e)
            self._forget_all()
        return {"open": self.kernel.open_inodes()}

    def _forget_all(self) -> None:
        """Drop the daemon cache and (in the background) whatever the kernel cached."""
        self._drop_all()
        if self.role is not Role.LEADER:
            trio.lowlevel.spawn_system_task(self._kernel_reset)

    async def _kernel_reset(self) -> None:
        with trio.move_on_after(self.invalidate_timeout):
            await self.kernel.reset()

    def _adopt(self, leader: str, epoch: int) -> None:
        if epoch > self.epoch or leader != self.leader_name:
            new = epoch > self.epoch
            if new:
                self._lock_leader_changed()
            self.epoch = max(self.epoch, epoch)
            self.leader_name = leader
            self.cbgen = 0
            self._forget_all()
            if new and self.role is not Role.LEADER and self.multi:
                self.node.leases.observe_epoch(self.ws, epoch)
                trio.lowlevel.spawn_system_task(self._reopen, epoch)

    async def _reopen(self, epoch: int) -> None:
        """After a failover: tell the new leader which inodes we hold open."""
        inos = self.kernel.open_inodes()
        if not inos:
            return
        try:
            await self._rpc("reopen", [inos])
        except FsError as e:
            log.warning("event=reopen_failed ws=%s epoch=%d error=%s", self.ws, epoch, e)

    # -- follower cache --------------------------------------------------------------------------
    def _drop(self, inos: list[int], entries: list[tuple[int, bytes]]) -> None:
        self.gen += 1
        for ino in inos:
            self.attrs.pop(ino, None)
            self.slice_cache.pop(ino, None)
        for ent in entries:
            self.entries.pop(ent, None)

    def _drop_all(self) -> None:
        self.gen += 1
        self.attrs.clear()
        self.entries.clear()
        self.slice_cache.clear()
        self._fresh.clear()

    def _trust_left(self) -> float:
        """For how long cached answers may still be used (0: not now).

        Trust runs `invalidate_timeout_s` from the sending of the last ping the leader
        answered at our epoch and callback generation: a leader that evicts us waits that
        long before it goes on, so whatever it did not tell us about is never used."""
        if self.role is not Role.FOLLOWER:
            return 0.0
        if self.leader_name is None:
            self._learn_leader()
            return 0.0
        seen = self.node.seen.get(self.leader_name)
        if seen is None:
            return 0.0
        left = seen[0] + self.invalidate_timeout - trio.current_time()
        if left <= 0:
            return 0.0
        info = (seen[2].get("leads") or {}).get(self.ws)
        if not (isinstance(info, list) and len(info) == 2 and all(isinstance(x, int) for x in info)):
            return 0.0
        epoch, cbgen = info
        if epoch > self.epoch:
            self._adopt(self.leader_name, epoch)       # forgets everything, once
            return 0.0
        if epoch < self.epoch:
            return 0.0
        if cbgen > self.cbgen:
            self._forget_all()
            self.cbgen = cbgen
            return 0.0
        return left if cbgen == self.cbgen else 0.0

    def _trusted(self) -> bool:
        return self._trust_left() > 0

    def _learn_leader(self) -> None:
        """Adopt the leader (and epoch) that the peers' ping answers name, if any."""
        hint = self._leader_hint()
        seen = self.node.seen.get(hint) if hint is not None else None
        info = (seen[2].get("leads") or {}).get(self.ws) if seen is not None else None
        if isinstance(info, list) and info and isinstance(info[0], int) and info[0] >= self.epoch:
            self._adopt(hint, info[0])

    def kernel_ttl(self) -> float:
        """The longest the kernel may cache attributes and entries of this workspace now."""
        if self.role is Role.LEADER:
            return float("inf")
        return self._trust_left()

    def _keep(self, node: Inode, gen: int) -> None:
        if gen == self.gen and self.role is Role.FOLLOWER:
            if len(self.attrs) >= CACHE_MAX:
                self._drop_all()
                return
            self.attrs[node.ino] = node

    def _leader_hint(self) -> str | None:
        hint = self.node.leases.leader_of(self.ws)
        if hint is not None:
            return hint
        best, best_epoch = None, -1
        for peer, (_, _, info) in self.node.seen.items():
            v = (info.get("leads") or {}).get(self.ws)
            if v and self.node.alive(peer) and v[0] > best_epoch:
                best, best_epoch = peer, v[0]
        return best

    async def _at_leader(self, kind: str, body: dict, deadline: float, *, err: int, per_try: float,
                         request_id: Callable[[], bytes], local: Callable[[], Awaitable[tuple[bool, Any]]],
                         give_up: Callable[[], bool] | None = None) -> tuple[str | None, Any]:
        """Send `kind` to the workspace's leader, wherever it is, retrying across failovers until
        `deadline` (then FsError `err`), or until `give_up()` holds after a failed try (then
        EIO). While this peer leads, `local()` answers instead: it returns (done, result), done
        False to try again. Returns (leader, its reply dict), or (None, result) when answered
        locally."""
        delay = 0.02
        bound = deadline - trio.current_time()
        first = True
        while True:
            now = trio.current_time()
            if now >= deadline:
                raise FsError(err, f"workspace {self.ws}: no leader answered within {bound:.3g}s")
            if not first and give_up is not None and give_up():
                raise FsError(errno.EIO, f"workspace {self.ws}: no leader answered, and the locks held on "
                                         "this file were given up")
            first = False
            if self._leading() is not None:
                done, result = await local()
                if done:
                    return None, result
                continue
            target = self._leader_hint()
            if target is None or target == self.me:
                with trio.move_on_at(min(deadline, now + 0.1)):
                    await self._changed.wait()
                continue
            try:
                self.rpcs += 1
                reply = await self.node.call(target, kind, body, timeout=min(per_try, deadline - now),
                                             request_id=request_id(), retries=1)
            except RemoteError as e:
                if e.code == "fs":
                    try:
                        raise FsError(int(e.message)) from None
                    except ValueError:
                        raise FsError(err, e.message) from None
                if e.code == "not_leader":
                    await trio.sleep(min(delay, max(0.0, deadline - trio.current_time())))
                    delay = min(delay * 2, 0.5)
                    continue
                raise FsError(err, f"leader {target}: {e.code}: {e.message}") from None
            except PeerUnavailable:
                await trio.sleep(0.01)   # a checkpoint: the failure may have been immediate
                continue
            if not isinstance(reply, dict) or not isinstance(reply.get("e"), int):
                raise FsError(err, f"leader {target}: malformed reply")
            if reply["e"] < self.epoch:
                continue      # a deposed leader's late answer: ask the current one
            self._adopt(target, reply["e"])
            return target, reply

    async def _rpc(self, op: str, a: list, *, change: bool = False, durable: bool = False,
                   rid: bytes | None = None, opening: bool = False, deadline: float | None = None) -> Any:
        """One operation at the leader, wherever it is; retried across failovers until the bound.

        A change keeps its request id across tries (applied once, wherever). A read gets a
        fresh id per try, so no try can be answered from a reply cached before an invalidation;
        and what it returns is cached only if no invalidation came since the first try."""
        rid = rid or new_id()
        if deadline is None:
            deadline = trio.current_time() + self.failover_timeout
        body: dict[str, Any] = {"ws": self.ws, "a": a}
        if change:
            body["rid"] = rid
            act = actor.current()
            if act is not None:
                body["act"] = list(act)
        if durable:
            body["durable"] = True
        if opening:
            body["open"] = True
        gen = self.gen

        async def local() -> tuple[bool, Any]:
            # We became the leader while retrying.
            role = self._leading()
            if role is None:
                return False, None
            if change:
                return True, await self._as_leader(role, op, role._decode(op, a), rid, durable, deadline)
            try:
                if op == "open":     # our own opens are known to the leader role directly
                    return True, await role.local.getattr(a[0])
                return True, self._result(op, await role.serve(self.me, op, body), -1, False)
            except (Deposed, NotLeader):
                return False, None

        give_up, per_try = None, 1.0
        held = self.lock_state(a[0]) if self.lock_state is not None and a and type(a[0]) is int else None
        if held is not None:
            give_up, per_try = (lambda: held.fenced), 0.25
        # per try 1 s: re-sends to the same leader join the first (same id): cheap, and a dead one is left sooner
        target, reply = await self._at_leader("ns." + op, body, deadline, err=errno.EIO, per_try=per_try,
                                              request_id=lambda: rid if change else new_id(), local=local,
                                              give_up=give_up)
        if target is None:
            return reply
        if isinstance(reply.get("g"), int) and reply["g"] > self.cbgen:
            self._forget_all()        # the leader evicted us: what we cached is suspect
            self.cbgen = reply["g"]
            gen = -1
        elif isinstance(reply.get("g"), int) and reply["g"] < self.cbgen:
            gen = -1                  # an answer from before our eviction: use, do not cache
        return self._result(op, reply["r"], gen, change, a)

    def _result(self, op: str, r: Any, gen: int, change: bool, a: list | None = None) -> Any:
        if change:
            aff = r["aff"]
            keep = gen == self.gen
            self._drop(list(aff[0]) + list(aff[1]), [tuple(x) for x in aff[2]])
            if keep and isinstance(r.get("n"), list):
                self._keep(Inode.from_list(r["n"]), self.gen)
            r = r["r"]
            if isinstance(r, list):
                node = Inode.from_list(r)
                if keep:
                    self._keep(node, self.gen)
                    if a is not None and op in ("mknod", "link") and node.ino in self.attrs:
                        # The name we just made: later lookups of it are answered here.
                        where = (a[0], a[1]) if op == "mknod" else (a[1], a[2])
                        self.entries[where] = node.ino
                return node
            return r
        if op in ("getattr", "lookup", "open"):
            node = Inode.from_list(r)
            self._keep(node, gen)
            return node
        if op == "readdir":
            out = []
            for name, ino, al in r:
                node = Inode.from_list(al)
                self._keep(node, gen)
                out.append((name, ino, node))
            return out
        if op == "slices":
            return [Slice.from_tuple(t) for t in r]
        return r

    async def _as_leader(self, role: LeaderRole, op: str, a: list, rid: bytes | None, durable: bool,
                         deadline: float | None = None) -> Any:
        """A change made through our own mount while we lead (reads never get here)."""
        try:
            act = actor.current()
            result, _ = await role.mutate(self.me, op, a, rid, list(act) if act else None)
            if durable:
                await role.local.sync(result)
            return result
        except (Deposed, NotLeader):
            pass
        # Deposed mid-call: retry (same request id) at the new leader.
        with trio.move_on_after(self.invalidate_timeout):
            while self._leading() is role:
                await self._changed.wait()
        return await self._rpc(op, self._wire(op, a), change=True, durable=durable, rid=rid, deadline=deadline)

    @staticmethod
    def _wire(op: str, a: list) -> list:
        if op == "commit_write":
            ino, slices, end, mtime, inline, closing = a
            return [ino, [(i, s.to_tuple()) for i, s in slices], end, mtime, inline, closing]
        if op == "compact":
            ino, chunk, old, new, drop = a
            return [ino, chunk, [s.to_tuple() for s in old], [s.to_tuple() for s in new],
                    [s.to_tuple() for s in drop]]
        return list(a)

    async def _change(self, op: str, a: list, durable: bool = False) -> Any:
        role = self._leading()
        if role is not None:
            # Alone, no other leader can ever take a retry: no request id to remember.
            return await self._as_leader(role, op, a, new_id() if self.multi else None, durable)
        return await self._rpc(op, self._wire(op, a), change=True, durable=durable)

    # -- NamespaceService: queries ----------------------------------------------------------------
    def cached(self, ino: int) -> Inode | None:
        if self.role is Role.LEADER and self.local is not None:
            return self.local.cached(ino)
        return self.attrs.get(ino)

    def cached_entry(self, parent: int, name: bytes) -> int | None:
        if self.role is Role.LEADER and self.local is not None:
            return self.local.cached_entry(parent, name)
        return self.entries.get((parent, name))

    def orphans(self) -> list[int]:
        return self.local.orphans() if self._leading() is not None and self.local is not None else []

    def stats(self) -> dict:
        if self.role is Role.FOLLOWER:
            self._trust_left()     # learns a leader and epoch from pings, if not yet known
        out: dict[str, Any] = {}
        if self.role is Role.LEADER and self.local is not None:
            out.update(self.local.stats())
            if self.leader is not None:
                out.update(self.leader.stats())
        out.update({"role": self.role.value, "leader": self.me if self.role is Role.LEADER else self._leader_hint(),
                    "epoch": self.lead.epoch if self.role is Role.LEADER and self.lead else self.epoch,
                    "rpcs": self.rpcs, "failovers": self.failovers, "cached_inodes": len(self.attrs)})
        return out

    async def close(self) -> None:
        self.closing = True      # followers now wait for the next leader instead of us
        if self._leading() is not None and self.local is not None:
            await self.local.close()

    async def snapshot(self) -> None:
        if self._leading() is not None and self.local is not None:
            await self.local.snapshot()

    async def collect_garbage(self, *, force: bool = False) -> int:
        if self._leading() is not None and self.local is not None:
            return await self.local.collect_garbage(force=force)
        return 0

    def referenced_sids(self) -> set[str]:
        return self.local.referenced_sids() if self.local is not None else set()

    async def lookup(self, parent: int, name: bytes) -> Inode:
        role = self._leading()
        if role is not None:
            return await role.local.lookup(parent, name)
        if len(name) > 255:
            raise FsError(errno.ENAMETOOLONG)
        if self._trusted():
            ino = self.entries.get((parent, name))
            if ino is not None:
                node = self.attrs.get(ino)
                if node is not None:
                    return node
        gen = self.gen
        node = await self._rpc("lookup", [parent, name])
        if gen == self.gen and name not in (b".", b".."):
            self.entries[(parent, name)] = node.ino
        return node

    async def getattr(self, ino: int) -> Inode:
        role = self._leading()
        if role is not None:
            return await role.local.getattr(ino)
        if self._trusted():
            node = self.attrs.get(ino)
            if node is not None:
                return node
        return await self._rpc("getattr", [ino])

    async def open(self, ino: int) -> Inode:
        role = self._leading()
        if role is not None:
            return await role.local.getattr(ino)
        node = self._fresh.pop(ino, None)
        if node is not None:
            return node
        node = await self._rpc("open", [ino])
        # Close-to-open: whatever attributes the kernel holds, the open's answer is newer.
        self.kernel.attrs_stale(ino)
        return node

    async def closed(self, ino: int) -> None:
        if self._leading() is None and self.multi:
            try:
                await self._rpc("close", [ino])
            except FsError as e:
                log.info("event=close_unregistered ws=%s ino=%d error=%s", self.ws, ino, e)

    async def readdir(self, ino: int) -> list[tuple[bytes, int]]:
        return [(n, i) for n, i, _ in await self.readdir_plus(ino)]

    async def readdir_plus(self, ino: int) -> list[tuple[bytes, int, Inode | None]]:
        role = self._leading()
        if role is not None:
            return await role.local.readdir_plus(ino)
        return await self._rpc("readdir", [ino])

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        role = self._leading()
        if role is not None:
            return await role.local.getxattr(ino, name)
        v = (await self.getattr(ino)).xattrs.get(name)
        if v is None:
            raise FsError(errno.ENODATA)
        return v

    async def listxattr(self, ino: int) -> list[bytes]:
        role = self._leading()
        if role is not None:
            return await role.local.listxattr(ino)
        return list((await self.getattr(ino)).xattrs)

    async def slices(self, ino: int, chunk: int) -> list[Slice]:
        role = self._leading()
        if role is not None:
            return await role.local.slices(ino, chunk)
        if self._trusted():
            s = self.slice_cache.get(ino, {}).get(chunk)
            if s is not None:
                return list(s)
        gen = self.gen
        out = await self._rpc("slices", [ino, chunk])
        if gen == self.gen and self.role is Role.FOLLOWER:
            self.slice_cache.setdefault(ino, {})[chunk] = out
        return list(out)

    async def sync(self, seq: int | None = None) -> None:
        role = self._leading()
        if role is not None:
            try:
                await role.local.sync(seq)
                return
            except (Deposed, NotLeader):
                raise FsError(errno.EIO, f"workspace {self.ws}: deposed before changes made here were "
                                         "durable") from None
        # A follower's changes are durable when the leader answers them: nothing to wait for,
        # unless we led before and lost some of ours when deposed (reported once).
        if self._lost_changes:
            self._lost_changes = False
            raise FsError(errno.EIO, f"workspace {self.ws}: changes made here were lost when this peer "
                                     "stopped leading it")

    # -- NamespaceService: changes ----------------------------------------------------------------
    async def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
                    target: bytes | None = None, opening: bool = False) -> Inode:
        role = self._leading()
        if role is not None or not opening:
            return await self._change("mknod", [parent, name, mode, uid, gid, rdev, target])
        # create: the leader notes the open with the make, so the open that follows is free
        node = await self._rpc("mknod", [parent, name, mode, uid, gid, rdev, target], change=True, opening=True)
        self._fresh[node.ino] = node
        return node

    async def link(self, ino: int, parent: int, name: bytes) -> Inode:
        return await self._change("link", [ino, parent, name])

    async def unlink(self, parent: int, name: bytes, is_dir: bool, is_open: Callable[[int], bool]) -> Inode:
        return await self._change("unlink", [parent, name, is_dir])

    async def rename(self, sp: int, sn: bytes, dp: int, dn: bytes, flags: int,
                     is_open: Callable[[int], bool]) -> None:
        await self._change("rename", [sp, sn, dp, dn, flags])

    async def setattr(self, ino: int, changes: dict) -> Inode:
        return await self._change("setattr", [ino, changes])

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        await self._change("setxattr", [ino, name, value])

    async def removexattr(self, ino: int, name: bytes) -> None:
        await self._change("removexattr", [ino, name])

    async def commit_write(self, ino: int, slices: list[tuple[int, Slice]], end: int, mtime: int,
                           inline: dict[str, bytes] | None = None, durable: bool = False,
                           closing: bool = False) -> int:
        return await self._change("commit_write", [ino, slices, end, mtime, inline, closing], durable=durable)

    async def written(self, ino: int) -> int:
        return await self._change("written", [ino])

    async def compact(self, ino: int, chunk: int, old: list[Slice], new: list[Slice], drop: list[Slice]) -> int:
        return await self._change("compact", [ino, chunk, old, new, drop])

    async def free(self, ino: int) -> None:
        role = self._leading()
        if role is not None:
            await role.release(self.me, ino)
            return
        await self.closed(ino)


def leads_info(namespaces: dict[str, PeeredNamespace], sender: str) -> dict:
    """What `peer.ping` answers: the workspaces this peer leads, with epoch and the sender's
    callback generation."""
    out = {}
    for ws, ns in namespaces.items():
        role = ns._leading()
        if role is not None:
            out[ws] = [role.epoch, role.cbgen.get(sender, 0)]
    return {"leads": out}

