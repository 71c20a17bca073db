"""Quorum leases (agentmount.peer.lease, agentmount.peer.promises).

Multi-peer tests run real peers as separate processes (tests/lease_peer.py: Voter +
LeaseManager over RpcServer/RpcClient with Curve keys) on 127.0.0.1, and read their
leadership events (JSON lines, times on the host's shared `time.monotonic()`). The test
process talks to them as the authenticated "probe"/"probe2" peers. Every multi-peer test
ends with `check_no_overlap`: one leader per epoch, no two leaderships overlapping in time.
Waits are on conditions with deadlines; the only sleep is the deliberate loop stall of
`test_is_leader_turns_false_at_deadline_even_when_loop_blocked`.
"""
from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import trio

from agentmount.peer import PeerUnavailable, RemoteError, RpcClient, keys, running
from agentmount.peer.lease import LeaseConfig, LeaseManager, LeaseUnavailable, NotLeader, Voter
from agentmount.peer.promises import Promise, PromiseError, PromiseStore

REPO = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "lease_peer.py"
LEASE = {"lease_s": 1.5, "renew_s": 0.3, "voter_extra_s": 0.3, "rpc_timeout_s": 0.5}
VOTER_LEASE = LEASE["lease_s"] + LEASE["voter_extra_s"]
PROBES = {"probe": keys.generate(), "probe2": keys.generate()}
WS = "w"


# -- helpers -------------------------------------------------------------------------------

async def wait_until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    with trio.move_on_after(timeout):
        while not (v := cond()):
            await trio.sleep(0.01)
        return v
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def wait_for(cond: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    with trio.move_on_after(timeout):
        while not (v := await cond()):
            await trio.sleep(0.02)
        return v
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """One peer process (restartable from the same data dir and port)."""

    def __init__(self, cluster: "Cluster", name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.public, self.secret = keys.generate()
        self.data_dir = cluster.tmp / name
        self.popen: subprocess.Popen | None = None
        self.inc = 0

    def start(self, campaign: bool) -> None:
        others = [p for p in self.cluster.procs.values() if p is not self]
        cfg = {"name": self.name, "data_dir": str(self.data_dir), "listen": self.endpoint,
               "public": self.public, "secret": self.secret,
               "peers": [{"name": p.name, "endpoint": p.endpoint, "public": p.public} for p in others],
               "probes": {pub: n for n, (pub, _) in PROBES.items()}, "lease": LEASE,
               "campaign": [WS] if campaign else []}
        self.inc += 1
        p = self.popen = subprocess.Popen([sys.executable, str(RUNNER), json.dumps(cfg)], cwd=REPO,
                                          stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, args=(p, self.inc), daemon=True).start()

    def _read(self, p: subprocess.Popen, inc: int) -> None:
        for line in p.stdout:
            ev = json.loads(line)
            ev["name"], ev["inc"] = self.name, inc
            self.cluster.events.append(ev)

    def ready(self) -> dict | None:
        return next((e for e in self.cluster.events
                     if e["ev"] == "ready" and e["name"] == self.name and e["inc"] == self.inc), None)

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def kill(self) -> None:
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.kill()
            self.popen.wait()


class Cluster:
    def __init__(self, tmp: Path, names: tuple[str, ...], nursery: trio.Nursery) -> None:
        self.tmp = tmp
        self.nursery = nursery
        self.events: list[dict] = []
        self.procs = {n: Proc(self, n) for n in names}
        self._clients: dict[tuple[str, str], RpcClient] = {}

    async def start(self, name: str, campaign: bool) -> dict:
        proc = self.procs[name]
        proc.start(campaign)
        return await wait_until(proc.ready, 20, f"{name} to start")

    async def call(self, peer: str, kind: str, body: Any = None, probe: str = "probe",
                   timeout: float = 3.0) -> Any:
        c = self._clients.get((probe, peer))
        if c is None:
            proc = self.procs[peer]
            pub, sec = PROBES[probe]
            c = self._clients[(probe, peer)] = RpcClient(proc.endpoint, name=probe, peer=peer,
                                                         server_public_key=proc.public, public_key=pub,
                                                         secret_key=sec, timeout=timeout, retries=3)
            await self.nursery.start(c.run)
        return await c.call(kind, body, timeout=timeout)

    async def status(self, peer: str) -> dict:
        st = await self.call(peer, "test.status")
        return st["ws"].get(WS, {})

    def acquired(self, pred: Callable[[dict], bool] = lambda e: True) -> dict | None:
        return next((e for e in list(self.events) if e["ev"] == "acquired" and pred(e)), None)

    def count(self, name: str, ev: str, epoch: int) -> int:
        return sum(1 for e in list(self.events) if e["name"] == name and e["ev"] == ev and e.get("epoch") == epoch)

    def last_deadline(self, name: str, epoch: int) -> float:
        return max(e["deadline"] for e in list(self.events)
                   if e["name"] == name and e.get("epoch") == epoch and e["ev"] in ("acquired", "renewed"))

    async def wait_acquired(self, pred: Callable[[dict], bool], timeout: float, what: str) -> dict:
        return await wait_until(lambda: self.acquired(pred), timeout, what)

    def kill_all(self) -> None:
        for p in self.procs.values():
            p.kill()


@asynccontextmanager
async def cluster(tmp_path: Path, campaign: tuple[str, ...] = ("a", "b", "c"), names: tuple[str, ...] = ("a", "b", "c")):
    async with trio.open_nursery() as nursery:
        cl = Cluster(tmp_path, names, nursery)
        try:
            async with trio.open_nursery() as n:   # start all at once
                for name in names:
                    n.start_soon(cl.start, name, name in campaign)
            yield cl
            check_no_overlap(cl.events)
        finally:
            cl.kill_all()
            nursery.cancel_scope.cancel()


def check_no_overlap(events: list[dict]) -> None:
    """One leader per epoch; leaderships (acquired .. min(last deadline, loss)) never overlap."""
    ivs: dict[tuple, dict] = {}
    for ev in list(events):
        if ev["ev"] not in ("acquired", "renewed", "lost") or ev["ws"] != WS:
            continue
        key = (ev["name"], ev["inc"], ev["epoch"])
        dl = math.inf if ev["deadline"] is None else ev["deadline"]
        iv = ivs.setdefault(key, {"start": ev["acquired"], "end": dl, "lost": math.inf})
        iv["end"] = max(iv["end"], dl)
        if ev["ev"] == "lost":
            iv["lost"] = ev["mono"]
    by_epoch: dict[int, set[str]] = {}
    for (name, _, epoch) in ivs:
        by_epoch.setdefault(epoch, set()).add(name)
    assert all(len(v) == 1 for v in by_epoch.values()), f"two leaders for one epoch: {by_epoch}"
    spans = sorted((iv["start"], min(iv["end"], iv["lost"]), key) for key, iv in ivs.items())
    for i, (s1, e1, k1) in enumerate(spans):
        for s2, e2, k2 in spans[i + 1:]:
            assert e1 <= s2, f"leaderships overlap: {k1} [{s1:.3f}, {e1:.3f}] and {k2} [{s2:.3f}, {e2:.3f}]"


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[lease] {text}")


# -- in-process: durable state, voter rules, deadlines ------------------------------------------

def test_config_validation():
    c = LeaseConfig()
    assert (c.lease_s, c.renew_s, c.voter_lease_s) == (5.0, 1.5, 5.5)
    for bad in [dict(lease_s=0), dict(renew_s=3.0), dict(voter_extra_s=-1), dict(lease_s=float("nan")),
                dict(rpc_timeout_s=0)]:
        with pytest.raises(ValueError):
            LeaseConfig(**bad)


async def test_voter_rules_persist_and_restart_window(tmp_path):
    cfg = LeaseConfig(lease_s=1.0, renew_s=0.3, voter_extra_s=0.2)
    v = Voter(tmp_path, cfg)
    assert (await v.prepare("w", 3, "a"))["ok"]
    assert (await v.prepare("w", 3, "a"))["ok"]                       # retry by the same candidate
    r = await v.prepare("w", 3, "b")
    assert (r["ok"], r["reason"], r["promised_to"]) == (False, "stale", "a")   # one candidate per ballot
    assert not (await v.accept("w", 3, 3, "b"))["ok"]
    assert not (await v.prepare("w", 2, "b"))["ok"]
    assert (await v.accept("w", 3, 3, "a"))["ok"]
    r = await v.prepare("w", 9, "b")
    assert (r["ok"], r["reason"], r["leader"], r["epoch"]) == (False, "leased", "a", 3) and 1.0 < r["remaining"] <= 1.2
    assert (await v.prepare("w", 4, "a"))["ok"]                       # the holder itself may re-prepare
    writes = v.writes
    assert (await v.accept("w", 4, 3, "a"))["ok"]                     # ... and keep its epoch
    assert (await v.accept("w", 4, 3, "a"))["ok"] and (await v.accept("w", 4, 3, "a"))["ok"]
    assert v.writes == writes + 1                                    # renewals of the same lease: no write
    assert not (await v.release("w", 4, "a"))["ok"]                  # release names the epoch
    with pytest.raises(PromiseError, match="in use"):                # one voter per data dir
        PromiseStore(tmp_path)
    v.close()
    # restart: the promise and the lease are back; the lease is live for a full voter lease
    v2 = Voter(tmp_path, cfg)
    assert v2.promise("w") == Promise("w", 4, "a", 4, 3, "a", 1.2)
    t0 = trio.current_time()
    r = await v2.prepare("w", 5, "b")
    assert (r["ok"], r["reason"]) == (False, "leased") and r["remaining"] > 1.1
    assert not (await v2.prepare("w", 4, "b"))["ok"]
    while not (r := await v2.prepare("w", 5, "b"))["ok"]:
        await trio.sleep(0.01)
    assert trio.current_time() - t0 >= 1.1
    assert not (await v2.accept("w", 5, 2, "b"))["ok"]               # epochs never go back
    assert (await v2.accept("w", 5, 5, "b"))["ok"]
    assert (await v2.release("w", 5, "b"))["ok"]
    assert v2.live_lease("w") is None
    assert (await v2.prepare("w", 6, "c"))["ok"]                      # released: no wait
    v2.close()
    assert json.loads((tmp_path / "leases" / "w.state").read_text())["promised"] == 6
    assert not list((tmp_path / "leases").glob(".*.tmp"))


async def test_corrupt_state_refuses_to_start_and_bad_requests(tmp_path):
    v = Voter(tmp_path)
    with pytest.raises(RemoteError, match="not the sender"):
        await v.handle("b", "lease.prepare", {"workspace": "w", "ballot": 1, "candidate": "a"}, None)
    for body in [None, {"workspace": "../x", "ballot": 1, "epoch": 1, "candidate": "a"},
                 {"workspace": "w", "ballot": 0, "epoch": 0, "candidate": "a"},
                 {"workspace": "w", "ballot": 1, "epoch": True, "candidate": "a"},
                 {"workspace": "w", "ballot": 1, "epoch": 2, "candidate": "a"},
                 {"workspace": "w", "epoch": 1, "candidate": "a"}]:
        with pytest.raises(RemoteError, match="bad_request"):
            await v.handle("a", "lease.accept", body, None)
    v.close()
    (tmp_path / "leases" / "w.state").write_text('{"v": 1, "promised": ')
    with pytest.raises(PromiseError, match="w.state"):
        Voter(tmp_path)


class LocalPeer:
    """In-process stand-in for an RpcClient to another peer's voter."""

    def __init__(self, voter: Voter, me: str) -> None:
        self.voter, self.me, self.hang = voter, me, False

    async def call(self, kind, body=None, *, epoch=None, timeout=None, retries=None, request_id=None):
        if self.hang:
            await trio.sleep(timeout)
            raise PeerUnavailable("x", kind, "hung")
        return await self.voter.handle(self.me, kind, body, epoch)


async def test_is_leader_turns_false_at_deadline_even_when_loop_blocked(tmp_path):
    # Voters hold a's lease 1 s past its own deadline: room for the refused attempt below
    # on a loaded machine (0.1 s was crossed once).
    cfg = LeaseConfig(lease_s=0.4, renew_s=0.1, voter_extra_s=1.0)
    voters = {n: Voter(tmp_path / n, cfg) for n in "abc"}
    links = {n: {m: LocalPeer(voters[m], n) for m in "abc" if m != n} for n in "abc"}
    events = []
    mgr = LeaseManager("a", voters["a"], links["a"], cfg, on_change=lambda ev, lead: events.append(ev))
    async with running(mgr):
        with trio.fail_after(5):
            lead = await mgr.acquire(WS)
            assert mgr.is_leader(WS) and mgr.current_epoch(WS) == lead.epoch == 1 and lead.check() == 1
            await wait_until(lambda: lead.renewals >= 3, 3, "renewals")
            for p in links["a"].values():
                p.hang = True
            time.sleep(cfg.lease_s + 0.05)          # the whole trio loop stalls past the deadline
            assert not mgr.is_leader(WS) and mgr.current_epoch(WS) is None
            with pytest.raises(NotLeader):
                lead.check()
            await lead.lost.wait()
            assert lead.lost_reason == "expired" and events[-1] == "lost"
            # another candidate takes over once the voters' leases ran out; epoch grows
            mgr_b = LeaseManager("b", voters["b"], links["b"], cfg)
            async with running(mgr_b):
                with pytest.raises(LeaseUnavailable):
                    await mgr_b.acquire(WS, timeout=0.05)   # b's own voter still holds a's lease
                lead_b = await mgr_b.acquire(WS, timeout=3)
                assert lead_b.epoch > lead.epoch and mgr.leader_of(WS) in ("b", None)


async def test_suspended_host_is_not_fooled_by_the_monotonic_clock(tmp_path, monkeypatch):
    """CLOCK_MONOTONIC stops during a host suspend; the leader also checks CLOCK_BOOTTIME."""
    from agentmount.peer import lease as lease_mod
    cfg = LeaseConfig(lease_s=2.0, renew_s=0.5)
    voters = {n: Voter(tmp_path / n, cfg) for n in "ab"}
    mgr = LeaseManager("a", voters["a"], {"b": LocalPeer(voters["b"], "a")}, cfg)
    async with running(mgr):
        lead = await mgr.acquire(WS, timeout=2)
        assert mgr.is_leader(WS)
        real = lease_mod._boottime
        monkeypatch.setattr(lease_mod, "_boottime", lambda: real() + 3600)   # woke from an hour's suspend
        assert not mgr.is_leader(WS) and lead.lost_reason == "expired"


async def test_voter_that_promised_a_higher_ballot_rejoins_with_the_same_epoch(tmp_path):
    """A voter cut off from the leader promises a higher ballot to a candidate that then gives
    up; the leader's fast renewals are stale there, so it re-prepares and the voter rejoins,
    while the epoch (fencing token) and the leadership stay the same."""
    cfg = LeaseConfig(lease_s=0.4, renew_s=0.1, voter_extra_s=0.1)
    voters = {n: Voter(tmp_path / n, cfg) for n in "abc"}
    links = {m: LocalPeer(voters[m], "a") for m in "bc"}
    events = []
    mgr = LeaseManager("a", voters["a"], links, cfg, on_change=lambda ev, lead: events.append(ev))
    async with running(mgr):
        with trio.fail_after(10):
            lead = await mgr.acquire(WS)
            await wait_until(lambda: voters["c"].live_lease(WS), 2, "c to grant the lease")
            links["c"].hang = True
            await wait_until(lambda: voters["c"].live_lease(WS) is None, 2, "c's lease to lapse")
            assert (r := await voters["c"].prepare(WS, 100, "x"))["ok"], r
            links["c"].hang = False
            await wait_until(lambda: (voters["c"].live_lease(WS) or ("",))[0] == "a", 2, "c to rejoin")
            assert voters["c"].promise(WS).epoch == lead.epoch == mgr.current_epoch(WS) == 1
            assert lead.ballot > 100 and lead.valid() and "lost" not in events


async def test_single_peer_leads_at_once(tmp_path, capsys):
    """A peer list of one: leader immediately, with no deadline; the epoch grows per restart."""
    epochs = []
    for _ in range(2):
        voter = Voter(tmp_path, LeaseConfig())
        mgr = LeaseManager("solo", voter, {})
        async with running(mgr):
            t0 = trio.current_time()
            lead = await mgr.acquire("default", timeout=1)
            dt = trio.current_time() - t0
            assert mgr.is_leader("default") and mgr.leader_of("default") == "solo"
            assert math.isinf(lead.deadline) and dt < 0.5
            epochs.append((mgr.current_epoch("default"), (await mgr.acquire("other")).epoch))
        assert not lead.valid() and lead.lost_reason == "stopped"
        voter.close()
    assert epochs == [(1, 1), (2, 2)]
    report(capsys, f"single peer: leader after {dt * 1000:.1f} ms")


# -- real peer processes ---------------------------------------------------------------------

async def test_three_peers_one_leader_keeps_lease(tmp_path):
    async with cluster(tmp_path) as cl:
        ev = await cl.wait_acquired(lambda e: True, 10, "a leader")
        leader, epoch = ev["name"], ev["epoch"]

        async def all_agree():
            sts = {n: await cl.status(n) for n in cl.procs}
            return all(s.get("leader_of") == leader for s in sts.values()) and sts
        await wait_for(all_agree, 10, "every peer to see the leader")
        n0 = cl.count(leader, "renewed", epoch)
        await wait_until(lambda: cl.count(leader, "renewed", epoch) >= n0 + 12, 12 * LEASE["renew_s"] + 5,
                         "12 more renewals")
        sts = await all_agree()
        assert sts, "leader changed"
        for n, s in sts.items():
            assert s["is_leader"] is (n == leader)
            assert s["voter"]["leader"] == leader and s["voter"]["epoch"] == epoch and s["voter"]["live"]
        assert sts[leader]["epoch"] == epoch
        assert [e for e in cl.events if e["ev"] == "lost"] == []
        assert {(e["name"], e["epoch"]) for e in cl.events if e["ev"] == "acquired"} == {(leader, epoch)}


async def test_leader_killed_another_takes_over(tmp_path, capsys):
    takeovers = []
    async with cluster(tmp_path) as cl:
        ev = await cl.wait_acquired(lambda e: True, 10, "a leader")
        for _ in range(2):
            leader, epoch = ev["name"], ev["epoch"]
            await wait_until(lambda: cl.count(leader, "renewed", epoch) >= 3, 5, "renewals")
            for n in cl.procs:   # everyone up and following
                await wait_for(lambda: _leader_is(cl, n, leader), 5, f"{n} to follow {leader}")
            t_kill = time.monotonic()
            cl.procs[leader].kill()
            new = await cl.wait_acquired(lambda e: e["epoch"] > epoch, VOTER_LEASE + 5, "a new leader")
            assert new["name"] != leader
            assert new["acquired"] >= cl.last_deadline(leader, epoch)
            takeovers.append(new["acquired"] - t_kill)
            await cl.start(leader, True)   # back as a follower, from the same data dir
            ev = new
    report(capsys, "takeover after SIGKILL of the leader: " + ", ".join(f"{t:.2f} s" for t in takeovers)
           + f" (voter lease {VOTER_LEASE:g} s, renew every {LEASE['renew_s']:g} s)")
    assert all(t <= VOTER_LEASE + 1.0 for t in takeovers), takeovers


async def _leader_is(cl: Cluster, n: str, leader: str) -> bool:
    return (await cl.status(n)).get("leader_of") == leader


async def test_stopped_leader_is_fenced_on_resume(tmp_path, capsys):
    async with cluster(tmp_path) as cl:
        ev = await cl.wait_acquired(lambda e: True, 10, "a leader")
        old, epoch = ev["name"], ev["epoch"]
        await wait_until(lambda: cl.count(old, "renewed", epoch) >= 3, 5, "renewals")
        t_stop = time.monotonic()
        cl.procs[old].signal(signal.SIGSTOP)
        try:
            new = await cl.wait_acquired(lambda e: e["epoch"] > epoch, VOTER_LEASE + 5, "a new leader")
            assert new["name"] != old and time.monotonic() > cl.last_deadline(old, epoch)
        finally:
            t_cont = time.monotonic()
            cl.procs[old].signal(signal.SIGCONT)
        st = await cl.status(old)     # the first thing it does after resuming
        assert st["is_leader"] is False and st["epoch"] is None
        t_status = time.monotonic()
        await wait_until(lambda: cl.count(old, "lost", epoch), 5, "the lost event")
        lost = next(e for e in cl.events if e["ev"] == "lost" and e["name"] == old)
        assert lost["reason"] == "expired" and lost["mono"] >= t_cont
        voters = [n for n in cl.procs if n != old]
        for n in voters:
            for kind, body in [("lease.prepare", {"ballot": epoch}), ("lease.accept", {"ballot": epoch, "epoch": epoch})]:
                r = await cl.call(n, kind, {"workspace": WS, **body, "candidate": "probe"})
                assert (r["ok"], r["reason"]) == (False, "stale") and r["promised"] >= new["epoch"], r
            # the old epoch is refused even at a ballot above every promise
            r = await cl.call(n, "lease.accept", {"workspace": WS, "ballot": r["promised"] + 1, "epoch": epoch,
                                                  "candidate": "probe"})
            assert (r["ok"], r["reason"], r["epoch"]) == (False, "stale", new["epoch"]), r
        replies = await cl.call(old, "test.renew_old", {"ws": WS, "epoch": epoch})
        assert all((r["ok"], r["reason"]) == (False, "stale") for r in replies.values()), replies
        assert (await cl.status(new["name"]))["is_leader"]
        await wait_for(lambda: _leader_is(cl, old, new["name"]), 5, "the old leader to follow")
    report(capsys, f"SIGSTOP of the leader: new leader {new['acquired'] - t_stop:.2f} s after the stop; "
                   f"old leader answered is_leader=False {1000 * (t_status - t_cont):.0f} ms after SIGCONT")


async def test_restarted_voter_keeps_promise_and_lease_window(tmp_path, capsys):
    async with cluster(tmp_path, campaign=("a",)) as cl:
        ev = await cl.wait_acquired(lambda e: True, 10, "a to lead")
        epoch = ev["epoch"]
        await wait_for(lambda: _leader_is(cl, "b", "a"), 5, "b to grant a's lease")
        cl.procs["a"].kill()
        cl.procs["b"].kill()
        ready = await cl.start("b", False)
        prep = {"workspace": WS, "ballot": epoch, "candidate": "probe"}
        for kind, body in [("lease.prepare", prep), ("lease.accept", {**prep, "epoch": epoch})]:
            r = await cl.call("b", kind, body)                    # equal ballot, another candidate
            assert (r["ok"], r["reason"], r["promised"], r["promised_to"]) == (False, "stale", epoch, "a")
        refusals = 0
        while True:                                                 # higher epoch: after the window only
            r = await cl.call("b", "lease.prepare", {**prep, "ballot": epoch + 1})
            t = time.monotonic()
            if r["ok"]:
                break
            assert (r["reason"], r["leader"]) == ("leased", "a"), r
            refusals += 1
            assert t - ready["loaded"] < VOTER_LEASE + 1.0, "window never closed"
            await trio.sleep(0.02)
        window = t - ready["loaded"]
        assert refusals > 0 and window >= VOTER_LEASE - 0.01
        cl.procs["b"].kill()                                       # the new promise survives a restart
        await cl.start("b", False)
        other = {**prep, "ballot": epoch + 1, "candidate": "probe2"}
        for kind, body in [("lease.prepare", other), ("lease.accept", {**other, "epoch": epoch + 1})]:
            r = await cl.call("b", kind, body, probe="probe2")
            assert (r["ok"], r["reason"], r["promised_to"]) == (False, "stale", "probe"), r
        st = (await cl.call("b", "test.status"))["ws"][WS]["voter"]
        assert (st["promised"], st["promised_to"], st["epoch"], st["leader"]) == (epoch + 1, "probe", epoch, "a")
    report(capsys, f"restarted voter refused other candidates for {window:.2f} s after loading its state "
                   f"(voter lease {VOTER_LEASE:g} s)")


async def test_racing_candidates_never_overlap(tmp_path, capsys):
    async with cluster(tmp_path, campaign=("a", "b")) as cl:
        ev = await cl.wait_acquired(lambda e: True, 10, "a leader")
        winners = [(ev["name"], ev["epoch"])]
        for _ in range(8):
            top = max(e["epoch"] for e in cl.events if e["ev"] == "acquired")
            at = time.monotonic() + 0.2
            async with trio.open_nursery() as n:
                for p in ("a", "b"):
                    n.start_soon(cl.call, p, "test.race", {"ws": WS, "at": at})
            new = await cl.wait_acquired(lambda e: e["epoch"] > top, 10, "a race winner")
            winners.append((new["name"], new["epoch"]))
        check_no_overlap(cl.events)
    report(capsys, "race winners (peer, epoch): " + " ".join(f"{n}{e}" for n, e in winners))
