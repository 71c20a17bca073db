"""Test-only runner: one peer (Voter + LeaseManager over the real RpcServer/RpcClients, Curve
keys, ZAP allow list) in its own process, for tests/test_peer_lease.py.

Usage: ``python tests/lease_peer.py '<json config>'`` with keys name, data_dir, listen, public,
secret, peers [{name, endpoint, public}], probes {public_key: name}, lease {LeaseConfig kwargs},
campaign [workspaces].

Prints JSON lines on stdout, times on `time.monotonic()` (shared by all processes of the host):
- {"ev": "ready", "name", "pid", "mono", "loaded"}   (`loaded`: when the voter state was loaded)
- {"ev": "acquired" | "renewed" | "lost", "ws", "epoch", "prepared", "acquired", "deadline",
   "reason", "mono"}  (deadline null = unbounded)

Extra RPC kinds (besides the lease.* voter kinds), for the test's probe identities:
test.status, test.release {ws}, test.campaign {ws}, test.race {ws, at} (release, then
campaign at monotonic time `at`), test.renew_old {ws, epoch} (send the lease.accept of its last
leadership, which must have that epoch, as this peer to every other peer; return their replies).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import trio
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentmount.peer import Authenticator, PeerError, RpcClient, RpcServer, running  # noqa: E402
from agentmount.peer.lease import (KIND_ACCEPT, LEASE_KINDS, LeaseConfig, LeaseManager, Leadership,  # noqa: E402
                                   Voter)


def mono(t: float) -> float | None:
    """Trio clock -> time.monotonic()."""
    if math.isinf(t):
        return None
    return t - trio.current_time() + time.monotonic()


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(cfg: dict) -> None:
    name = cfg["name"]
    lease = LeaseConfig(**cfg["lease"])
    voter = Voter(cfg["data_dir"], lease)
    loaded = voter._loaded_at  # time.monotonic() when the durable state was read
    ctx = zmq.Context()
    allowed = {p["public"]: p["name"] for p in cfg["peers"]}
    allowed.update(cfg.get("probes", {}))
    auth = Authenticator(allowed, context=ctx)
    clients = {p["name"]: RpcClient(p["endpoint"], name=name, peer=p["name"], server_public_key=p["public"],
                                    public_key=cfg["public"], secret_key=cfg["secret"], context=ctx,
                                    timeout=1.0, retries=1)
               for p in cfg["peers"]}

    def on_change(event: str, lead: Leadership) -> None:
        emit({"ev": event, "ws": lead.workspace, "epoch": lead.epoch, "prepared": mono(lead.prepared_at),
              "acquired": mono(lead.acquired_at), "deadline": mono(lead.deadline), "reason": lead.lost_reason,
              "mono": time.monotonic()})

    mgr = LeaseManager(name, voter, clients, lease, on_change=on_change)

    def status() -> dict:
        wss = {}
        for ws in sorted(set(mgr._wss) | set(voter._state)):
            p = voter.promise(ws)
            live = voter.live_lease(ws)
            lead = mgr.leadership(ws)
            wss[ws] = {"is_leader": mgr.is_leader(ws), "epoch": mgr.current_epoch(ws),
                       "leader_of": mgr.leader_of(ws), "highest": mgr.highest_epoch(ws),
                       "deadline": mono(lead.deadline) if lead else None,
                       "campaigning": mgr.campaigning(ws),
                       "voter": {"promised": p.promised, "promised_to": p.promised_to, "accepted": p.accepted,
                                 "epoch": p.epoch,
                                 "leader": p.leader, "live": live is not None,
                                 "remaining": live[2] - trio.current_time() if live else 0.0}}
        return {"name": name, "pid": os.getpid(), "mono": time.monotonic(), "ws": wss}

    async def race(ws: str, at: float) -> None:
        await mgr.release(ws)
        await trio.sleep_until(trio.current_time() + (at - time.monotonic()))
        mgr.campaign(ws)

    async def handler(sender, kind, body, epoch):
        if kind in LEASE_KINDS:
            return await voter.handle(sender, kind, body, epoch)
        if kind == "test.status":
            return status()
        if kind == "test.release":
            await mgr.release(body["ws"])
            return status()
        if kind == "test.campaign":
            mgr.campaign(body["ws"])
            return True
        if kind == "test.race":
            nursery.start_soon(race, body["ws"], body["at"])
            return True
        if kind == "test.renew_old":
            last = mgr._wss[body["ws"]].last
            assert last is not None and last.epoch == body["epoch"]
            out = {}
            for peer, c in clients.items():
                try:
                    out[peer] = await c.call(KIND_ACCEPT, {"workspace": body["ws"], "ballot": last.ballot,
                                                           "epoch": last.epoch, "candidate": name}, timeout=1.0)
                except PeerError as e:
                    out[peer] = {"error": str(e)}
            return out
        raise ValueError(f"unknown kind {kind}")

    server = RpcServer(cfg["listen"], handler, name=name, secret_key=cfg["secret"], auth=auth)
    async with trio.open_nursery() as nursery:
        async with running(auth, server, *clients.values(), mgr):
            emit({"ev": "ready", "name": name, "pid": os.getpid(), "mono": time.monotonic(), "loaded": loaded,
                  "endpoint": server.endpoint})
            for ws in cfg.get("campaign", []):
                mgr.campaign(ws)
            await trio.sleep_forever()


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("LEASE_PEER_LOG", "WARNING"), stream=sys.stderr,
                        format=f"%(asctime)s {json.loads(sys.argv[1])['name']} %(levelname)s %(message)s")
    trio.run(main, json.loads(sys.argv[1]))
