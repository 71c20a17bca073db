"""This peer on the network: its RPC endpoint, clients to the other peers, votes and leases.

Owns: the ZAP `Authenticator` (only listed keys get in), the `RpcServer`
(ROUTER) and one `RpcClient` per listed peer, the lease `Voter` and
`LeaseManager`, and a liveness loop (``peer.ping`` every `PING_S`) whose
replies also carry what each peer leads. Requests are routed by kind:
``lease.*`` to the voter, ``peer.ping`` here, ``ns.*`` to the handler the
namespace layer registers for the workspace named in the body.

With no `[[peer]]` (single-peer mode) nothing listens and no client exists:
the lease manager's only voter is the local one, so this peer leads every
workspace at once and for good — the same code path as with peers.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Awaitable, Callable

import trio

from agentmount.config import Config
from agentmount.peer import keys as peer_keys
from agentmount.peer.lease import LEASE_KINDS, LeaseConfig, LeaseManager, Voter
from agentmount.peer.promises import PromiseStore
from agentmount.peer.rpc import PeerError, RemoteError, RpcClient, RpcServer

log = logging.getLogger("agentmount.peer")

PING_S = 0.5
NsHandler = Callable[[str, str, Any], Awaitable[Any]]   # (sender, op, body) -> reply body


class PeerNode:
    """See module docstring. Start with ``await nursery.start(node.run)``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.name = cfg.node.name
        self.multi = bool(cfg.peers)
        ls = cfg.lease
        self.lease_config = LeaseConfig(lease_s=ls.duration_s, renew_s=ls.renew_s,
                                        voter_extra_s=max(0.2, ls.duration_s / 10))
        self.voter = Voter(PromiseStore(os.path.join(cfg.node.data_dir, "lease")), self.lease_config)
        self.clients: dict[str, RpcClient] = {}
        self.endpoints = {p.name: p.endpoint for p in cfg.peers}
        if self.multi:
            assert cfg.node.public_key and cfg.node.secret_key
            for p in cfg.peers:
                self.clients[p.name] = RpcClient(
                    p.endpoint, name=self.name, peer=p.name, server_public_key=p.public_key,
                    public_key=cfg.node.public_key, secret_key=cfg.node.secret_key,
                    timeout=max(1.0, ls.invalidate_timeout_s), retries=2)
        self.leases = LeaseManager(self.name, self.voter, self.clients, self.lease_config)
        self.ns_handlers: dict[str, NsHandler] = {}
        self.ping_info: Callable[[str], dict] = lambda sender: {}
        # peer -> (last reply on the trio clock, round trip seconds, what it says it leads)
        self.seen: dict[str, tuple[float, float, dict]] = {}
        self.members = sorted([self.name] + [p.name for p in cfg.peers])
        self._disagree: dict[str, list] = {}
        self.server: RpcServer | None = None
        self.started_at = 0.0
        self.auth: peer_keys.Authenticator | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.started_at = trio.current_time()
        try:
            async with trio.open_nursery() as n:
                if self.multi:
                    cfg = self.cfg
                    self.auth = peer_keys.Authenticator({p.public_key: p.name for p in cfg.peers})
                    await n.start(self.auth.run)
                    assert cfg.node.listen and cfg.node.secret_key
                    # Namespace calls may wait for durability or a follower's ack; lease votes
                    # and pings must never queue behind them, hence the generous limit.
                    self.server = RpcServer(cfg.node.listen, self._handle, name=self.name,
                                            secret_key=cfg.node.secret_key, auth=self.auth,
                                            max_concurrency=4096)
                    await n.start(self.server.run)
                    for c in self.clients.values():
                        await n.start(c.run)
                    n.start_soon(self._pings)
                await n.start(self.leases.run)
                task_status.started()
        finally:
            self.voter.close()

    # -- requests ----------------------------------------------------------------------------
    async def _handle(self, sender: str, kind: str, body: Any, epoch: int | None) -> Any:
        if kind in LEASE_KINDS:
            return await self.voter.handle(sender, kind, body, epoch)
        if kind == "peer.ping":
            return {**self.ping_info(sender), "peers": self.members}
        if kind.startswith("ns.") and isinstance(body, dict):
            handler = self.ns_handlers.get(body.get("ws"))   # type: ignore[arg-type]
            if handler is None:
                raise RemoteError("not_leader", f"workspace {body.get('ws')!r} is not served here")
            return await handler(sender, kind[3:], body)
        raise RemoteError("unknown_kind", kind)

    async def call(self, peer: str, kind: str, body: Any, *, timeout: float,
                   request_id: bytes | None = None, retries: int | None = None) -> Any:
        client = self.clients.get(peer)
        if client is None:
            raise RemoteError("unknown_peer", f"peer {peer!r} is not listed in the config")
        return await client.call(kind, body, timeout=timeout, request_id=request_id, retries=retries)

    async def _pings(self) -> None:
        """One ping loop per peer (a dead one must not slow the others' rounds). `seen` keeps
        the time a ping was *sent*: what its answer says held at least from then on."""
        async with trio.open_nursery() as n:
            for name in self.clients:
                n.start_soon(self._ping_loop, name)

    async def _ping_loop(self, name: str) -> None:
        while True:
            t0 = trio.current_time()
            with trio.move_on_after(PING_S):    # never two pings in flight to one peer
                await self._ping(name, t0)
            await trio.sleep_until(t0 + PING_S)

    async def _ping(self, name: str, t0: float) -> None:
        try:
            reply = await self.call(name, "peer.ping", None, timeout=PING_S, retries=0)
        except PeerError:
            return
        if not isinstance(reply, dict):
            return
        now = trio.current_time()
        self.seen[name] = (t0, now - t0, reply)
        theirs = reply.get("peers")
        if isinstance(theirs, list) and theirs != self.members and self._disagree.get(name) != theirs:
            self._disagree[name] = theirs
            log.error("event=peer_list_mismatch peer=%s theirs=%s ours=%s reason=%r", name,
                      ",".join(map(str, theirs)), ",".join(self.members),
                      "the peers' [[peer]] lists differ: quorums are counted over different sets")

    # -- queries -----------------------------------------------------------------------------
    def alive(self, peer: str) -> bool:
        s = self.seen.get(peer)
        return s is not None and trio.current_time() - s[0] < 4 * PING_S + 1.0

    def status(self) -> list[dict]:
        out = []
        for p in self.cfg.peers:
            s = self.seen.get(p.name)
            leads = sorted(ws for ws, v in ((s[2].get("leads") or {}) if s else {}).items())
            epochs = {ws: v[0] for ws, v in ((s[2].get("leads") or {}) if s else {}).items()
                      if isinstance(v, list) and v}
            out.append({"name": p.name, "endpoint": p.endpoint, "alive": self.alive(p.name),
                        "epochs": epochs if self.alive(p.name) else {},
                        "peer_list_differs": p.name in self._disagree,
                        "rtt_ms": round(s[1] * 1000, 3) if s else None,
                        "last_seen_s": round(trio.current_time() - s[0], 3) if s else None,
                        "leads": leads if self.alive(p.name) else []})
        return out

    def refused(self) -> int:
        return self.auth.stats.refused if self.auth is not None else 0
