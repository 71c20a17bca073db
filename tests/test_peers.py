"""Several peers mounting the same workspaces over one shared store (acceptance tests).

Real `agentmount mount` daemons (tests/peers.py: PeerCluster) on 127.0.0.1 with their own
Curve keys, mountpoints and data dirs, over one shared local store. One peer leads a
workspace; followers forward to it; the leader pushes invalidations before a mutating call
returns, so other peers see a change as soon as the call returns (close-to-open for data).
Failover after SIGKILL/SIGSTOP of the leader, an intruder key, bad network input and
disagreeing peer lists are covered; figures (rounds/s, takeover time, op rates) are printed
(run with -s). Waits are on conditions with deadlines; anything that might block on a sick
mount runs under a deadline (`within`/`attempt`), so a hang fails the test instead of
stalling the suite. Most clusters use short leases (SHORT_LEASE) to keep the suite fast; the
SIGKILL test uses the shipped defaults.
"""
from __future__ import annotations

import errno
import os
import random
import socket
import threading
import time
import tomllib

import msgpack
import pytest
import zmq

from agentmount import config as config_mod
from agentmount.peer import keys
from agentmount.procs import pid_alive
from tests.peers import (MARGIN_S, SHORT_LEASE, WS, PeerCluster, attempt, clusters, report, sha, verify_files,
                         wait_until, within, write_file)


@pytest.fixture
def peer_cluster(tmp_path):
    """Factory: peer_cluster(names=("a", "b", "c"), **PeerCluster options) -> PeerCluster (not
    mounted yet); all are cleaned up at the end of the test, also when it fails."""
    yield from clusters(tmp_path)


def _missing(path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    return False


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _brief(st: dict | None) -> dict | None:
    return {k: st.get(k) for k in ("role", "leader", "epoch")} if st else None


# -- the harness itself ----------------------------------------------------------------------------

def test_cluster_configs_are_valid(tmp_path):
    """Generated configs: valid TOML, the right peers/keys/ports, one shared store; the intruder
    lists the real peers, nobody lists it; agentmount's config loader accepts every one."""
    c = PeerCluster(tmp_path / "c", lease=SHORT_LEASE, lease_overrides={"x": {"failover_timeout_s": 3.0}},
                    fs={"attr_timeout_s": 30.0, "entry_timeout_s": 30.0}, extra={"a": '[log]\nlevel = "info"'},
                    peers_of={"c": ["a"]}, intruder=True)
    try:
        assert [p.name for p in c.real] == ["a", "b", "c"] and c.intruder.name == "x"
        assert len({i.port for i in c.idents.values()}) == 4
        assert len({i.public for i in c.idents.values()}) == 4
        confs = {n: tomllib.loads(p.conf.read_text()) for n, p in c.peers.items()}
        expected_lists = {"a": ["b", "c"], "b": ["a", "c"], "c": ["a"], "x": ["a", "b", "c"]}
        dirs = set()
        for n, conf in confs.items():
            node = conf["node"]
            assert node["name"] == n and node["listen"] == c[n].endpoint
            assert keys.load_pair(node["public_key"], node["secret_key"]) == (c[n].public, c[n].secret)
            assert conf["store"] == [{"name": "shared", "kind": "local", "path": str(c.store)}]
            assert conf["workspace"] == [{"name": "default"}]
            assert conf["fs"] == {"attr_timeout_s": 30.0, "entry_timeout_s": 30.0}
            assert [p["name"] for p in conf.get("peer", [])] == expected_lists[n]
            for p in conf.get("peer", []):
                assert (p["endpoint"], p["public_key"]) == (c[p["name"]].endpoint, c[p["name"]].public)
            assert c.intruder.public not in c[n].conf.read_text() or n == "x"
            dirs |= {node["data_dir"], conf["cache"]["dir"]}
        assert len(dirs) == 8
        assert confs["a"]["lease"] == SHORT_LEASE and confs["a"]["log"] == {"level": "info"}
        assert confs["x"]["lease"] == {**SHORT_LEASE, "failover_timeout_s": 3.0} and c.intruder.failover_s == 3.0
        d = PeerCluster(tmp_path / "d", lease=None)
        assert "lease" not in tomllib.loads(d["a"].conf.read_text()) and d["a"].failover_s == 30.0
        d.cleanup()
        for p in c.peers.values():
            cfg = config_mod.load(str(p.conf))
            assert cfg.node.name == p.name
    finally:
        c.cleanup()
    assert not any(p.pid for p in c.peers.values())


def test_status_reports_peers_and_roles(peer_cluster):
    c = peer_cluster()
    c.mount_all()
    leader, epoch = c.wait_leader(timeout=30)
    last = {}

    def settled():
        last.update({p.name: p.cli_status() for p in c.real})
        return all(st and len(st.get("peers", [])) == 2 and all(q.get("alive") for q in st["peers"])
                   and all(q.get("leads") == ([WS] if q["name"] == leader else []) for q in st["peers"])
                   for st in last.values()) and dict(last)

    # `alive`, `rtt_ms` and `leads` come from periodic pings: wait until they have caught up
    sts = wait_until(settled, 30, f"every peer to report the others alive and {leader} leading",
                     describe=lambda: {n: (s or {}).get("peers") for n, s in last.items()})
    for n, st in sts.items():
        assert st["node"] == n
        assert sorted(q["name"] for q in st["peers"]) == sorted(m for m in c.names if m != n)
        for q in st["peers"]:
            assert q["endpoint"] == c[q["name"]].endpoint, q
            assert isinstance(q["rtt_ms"], (int, float)) and 0 <= q["rtt_ms"] < 5000, q
            assert q["leads"] == ([WS] if q["name"] == leader else []), (n, q)
        w = st["workspaces"][WS]
        assert (w["role"], w["leader"], w["epoch"]) == ("leader" if n == leader else "follower", leader, epoch), (n, w)
    c.umount_all()


# -- 1. close-to-open -----------------------------------------------------------------------------

@pytest.mark.slow
def test_close_to_open_across_peers(peer_cluster):
    """1,000 rounds: write+close on a random peer, then open+read on another returns exactly the
    new bytes (small and ~100 KiB files, shrinking overwrites with O_TRUNC, rereads of files
    the reader has in its kernel cache)."""
    c = peer_cluster()
    peers = c.mount_all()
    c.wait_leader(timeout=30)
    seed = int(os.environ.get("PEERS_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    (peers[0].ws / "cto").mkdir()
    names = [f"f{i:02d}" for i in range(24)]
    last: dict[str, bytes] = {}
    read_by: dict[str, set[str]] = {p.name: set() for p in peers}
    bad: list[str] = []
    kinds = {"small": 0, "large": 0, "shrink": 0, "cached_reread": 0}
    rounds = 1000

    def run() -> None:
        for r in range(rounds):
            w, rd = rng.sample(peers, 2)
            if r % 4 == 0 and read_by[rd.name]:
                name = rng.choice(sorted(read_by[rd.name]))     # the reader's kernel has read it before
                kinds["cached_reread"] += 1
            else:
                name = rng.choice(names)
            prev = last.get(name)
            roll = rng.random()
            if prev and len(prev) > 1 and roll < 0.25:
                size = rng.randrange(0, len(prev))              # shorter: only O_TRUNC makes it so
                kinds["shrink"] += 1
            elif roll < 0.45:
                size = rng.randrange(90 << 10, 110 << 10)
                kinds["large"] += 1
            else:
                size = rng.randrange(1, 4096)
                kinds["small"] += 1
            data = (f"<{r}:{w.name}>".encode() + rng.randbytes(size))[:size]
            write_file(w.ws / "cto" / name, data)
            last[name] = data
            with open(rd.ws / "cto" / name, "rb") as f:
                got = f.read()
                fsize = os.fstat(f.fileno()).st_size
            read_by[rd.name].add(name)
            if got != data or fsize != len(data):
                how = ("the previous content" if got == prev else
                       "a prefix of the new content" if data.startswith(got) else
                       "the new content plus stale bytes" if got.startswith(data) else "other bytes")
                bad.append(f"round {r}: {name} written on {w.name} ({len(data)} B), read on {rd.name}: "
                           f"{len(got)} B, fstat {fsize}, {how}")

    t0 = time.monotonic()
    within(270, run, what=f"{rounds} close-to-open rounds")
    dt = time.monotonic() - t0
    report(f"close-to-open: {rounds} rounds in {dt:.1f} s = {rounds / dt:.0f} rounds/s "
           f"(seed {seed}; {kinds})")
    assert not bad, f"{len(bad)} stale reads (seed {seed}):\n" + "\n".join(bad[:20])
    c.umount_all()


# -- 2. namespace changes are pushed ---------------------------------------------------------------

def _pushes(actor, observers, tag: str) -> list[str]:
    """Mutate on `actor` after warming the observers' kernel caches; check each change on every
    observer immediately after the call returns. Returns the problems found."""
    d = actor.ws / f"inv-{tag}"
    d.mkdir()
    (d / "sub").mkdir()
    (d / "rmme").mkdir()
    for n, data in [("src", b"source bytes"), ("dst", b"old destination"), ("mv", b"moved"), ("gone", b"x" * 5000),
                    ("mode", b"m"), ("xa", b"x")]:
        write_file(d / n, data)
    os.chmod(d / "mode", 0o644)
    os.setxattr(d / "xa", "user.x", b"1")
    os.setxattr(d / "xa", "user.gone", b"bye")
    problems: list[str] = []

    def od(o):
        return o.ws / f"inv-{tag}"

    # warm every observer: positive and negative entries, attributes, data, xattrs
    for o in observers:
        base = od(o)
        assert sorted(os.listdir(base)) == sorted(["sub", "rmme", "src", "dst", "mv", "gone", "mode", "xa"]), o.name
        assert _missing(base / "newdir") and _missing(base / "sub" / "mv2")
        assert _read(base / "src") == b"source bytes" and _read(base / "dst") == b"old destination"
        os.stat(base / "mv")
        os.stat(base / "rmme")
        assert os.listdir(base / "sub") == []
        assert _read(base / "gone") == b"x" * 5000
        assert os.stat(base / "mode").st_mode & 0o777 == 0o644
        assert os.getxattr(base / "xa", "user.x") == b"1" and os.getxattr(base / "xa", "user.gone") == b"bye"

    def check(what: str, fn) -> None:
        for o in observers:
            try:
                ok = fn(od(o))
            except OSError as e:
                ok = e
            if ok is not True:
                problems.append(f"{tag}: {what} on {actor.name}, not seen on {o.name}: {ok!r}")

    os.mkdir(d / "newdir")
    check("mkdir", lambda b: os.path.isdir(b / "newdir") and "newdir" in os.listdir(b))
    os.rmdir(d / "rmme")
    check("rmdir", lambda b: _missing(b / "rmme") and "rmme" not in os.listdir(b))
    os.rename(d / "src", d / "dst")
    check("rename over an existing file",
          lambda b: _missing(b / "src") and _read(b / "dst") == b"source bytes" and "src" not in os.listdir(b))
    os.rename(d / "mv", d / "sub" / "mv2")
    check("rename into another directory",
          lambda b: _missing(b / "mv") and _read(b / "sub" / "mv2") == b"moved" and os.listdir(b / "sub") == ["mv2"])
    os.unlink(d / "gone")
    check("unlink", lambda b: _missing(b / "gone") and "gone" not in os.listdir(b))
    os.chmod(d / "mode", 0o600)
    check("chmod", lambda b: os.stat(b / "mode").st_mode & 0o777 == 0o600)
    os.setxattr(d / "xa", "user.x", b"2")
    check("setxattr", lambda b: os.getxattr(b / "xa", "user.x") == b"2")
    os.removexattr(d / "xa", "user.gone")
    check("removexattr", lambda b: "user.gone" not in os.listxattr(b / "xa"))
    return problems


def test_namespace_changes_visible_on_other_peers_at_once(peer_cluster):
    """mkdir/rmdir/rename/unlink/chmod/xattr changes on one peer are seen on the others as soon as
    the call returns, with 30 s kernel attr/entry timeouts (only pushed invalidations can make
    this pass). Done from a follower, then from the leader."""
    c = peer_cluster(fs={"attr_timeout_s": 30.0, "entry_timeout_s": 30.0})
    c.mount_all()
    leader, _ = c.wait_leader(timeout=30)
    lp = c[leader]
    f1, f2 = [p for p in c.real if p.name != leader]
    problems = within(120, _pushes, f1, [lp, f2], "from-follower", what="changes from a follower")
    problems += within(120, _pushes, lp, [f1, f2], "from-leader", what="changes from the leader")
    assert not problems, "\n".join(problems)
    c.umount_all()


# -- 3. SIGKILL of the leader ----------------------------------------------------------------------

@pytest.mark.slow
def test_leader_sigkill_followers_take_over(peer_cluster):
    """Default lease settings. SIGKILL the leader while both followers create+write+close files:
    the followers serve the workspace again within 10 s; every file whose close succeeded is
    intact on both; failed calls failed with EIO and nothing hung; the restarted peer sees all."""
    c = peer_cluster(lease=None)
    c.mount_all()
    leader, epoch = c.wait_leader(timeout=60)
    followers = [p for p in c.real if p.name != leader]
    bound = c[leader].failover_s + MARGIN_S
    (c[leader].ws / "load").mkdir()
    # two writers per follower: some call is nearly always in flight at the leader when it dies
    writers = [c.writer(f, f.ws / "load", prefix=f"{f.name}{k}") for f in followers for k in (1, 2)]
    by_peer = {f.name: [w for w in writers if w.prefix.startswith(f.name)] for f in followers}
    wait_until(lambda: all(len(w.successes()) >= 10 for w in writers), 60, "writes before the kill",
               describe=lambda: [(w.prefix, len(w.successes()), len(w.failures())) for w in writers])
    t_kill = c.kill(leader)

    def served_again() -> dict | None:
        """follower -> the first create+write+close started after the kill that succeeded."""
        out = {}
        for name, ws in by_peer.items():
            ops = [o for o in (w.first_success_after(t_kill) for w in ws) if o]
            if not ops:
                return None
            out[name] = min(ops, key=lambda o: o.t_end)
        return out

    try:
        firsts = wait_until(served_again, bound, "both followers to complete a create+close again after the kill",
                            describe=lambda: [(w.prefix, w.current, [str(o) for o in w.failures()[-3:]])
                                              for w in writers])
        took = max(o.t_end for o in firsts.values()) - t_kill
        new, new_epoch = c.wait_leader(not_name=leader, min_epoch=epoch, timeout=bound)
        # keep the workload going past the takeover, then stop it
        wait_until(lambda: all(len(w.successes(started_after=t_kill + took)) >= 5 for w in writers), 60,
                   "writes after the takeover")
    finally:
        for w in writers:
            w.stop()
    for w in writers:
        w.finish(bound)
    report(f"SIGKILL of leader {leader} (epoch {epoch}): followers served again after {took:.2f} s "
           f"(per follower: {', '.join(f'{n} {o.t_end - t_kill:.2f} s' for n, o in firsts.items())}); "
           f"new leader {new} epoch {new_epoch}; files closed: "
           + ", ".join(f"{w.prefix} {len(w.files())} ({len(w.failures())} failed)" for w in writers)
           + "".join(f"\n  failed on {w.prefix}: {o}, started {o.t_start - t_kill:+.2f} s from the kill"
                     for w in writers for o in w.failures()))
    fails = [(w.prefix, o) for w in writers for o in w.failures()]
    assert all(isinstance(o.error, OSError) and o.error.errno == errno.EIO for _, o in fails), \
        [(p, o.name, repr(o.error), round(o.seconds, 2)) for p, o in fails]
    slow = [(w.prefix, o.name, round(o.seconds, 2)) for w in writers for o in w.snapshot() if o.seconds > bound]
    assert not slow, f"calls took longer than failover_timeout_s + {MARGIN_S:g} s: {slow}"
    assert took < 10.0, f"followers served again only {took:.2f} s after the kill (target < 10 s)"
    assert new != leader and new_epoch > epoch
    expected = {k: v for w in writers for k, v in w.files().items()}
    for f in followers:
        bad = verify_files(f.ws / "load", expected)
        assert not bad, f"on {f.name}: {len(bad)} of {len(expected)} closed files not intact: {bad[:10]}"
    # the killed peer comes back (same config) as a follower and sees every file
    c.mount(leader)
    seen = []

    def follows():
        seen.append(_brief(c[leader].ws_status()))
        return seen[-1] and (seen[-1]["role"], seen[-1]["leader"]) == ("follower", new)

    wait_until(follows, 30, f"the restarted {leader} to follow {new}", describe=lambda: seen[-3:])
    bad = verify_files(c[leader].ws / "load", expected)
    assert not bad, f"on the restarted {leader}: {bad[:10]}"
    c.umount_all()
    r = c.fsck()
    assert r.returncode == 0, r.stdout + r.stderr
    # Contract: in-flight calls on followers are retried and succeed unless the outage exceeds
    # failover_timeout_s; the outage here was `took` seconds, so nothing should have failed.
    failover = c[leader].failover_s
    early = [f"{p}: {o}, started {o.t_start - t_kill:+.2f} s from the kill" for p, o in fails if o.seconds < failover]
    assert not early, (f"calls failed although the outage ({took:.1f} s) was shorter than failover_timeout_s "
                       f"({failover:g} s); they should have been retried:\n  " + "\n  ".join(early))


# -- 4. SIGSTOP of the leader ----------------------------------------------------------------------

@pytest.mark.slow
def test_stopped_leader_resumes_as_follower(peer_cluster):
    """SIGSTOP the leader (with a writer running on its own mount) until another peer leads with a
    higher epoch, write and rename through a follower, SIGCONT: the resumed peer follows the new
    epoch within seconds and never acts as leader, what it writes is seen by the others, every
    file closed successfully anywhere is intact on all three, nothing hangs."""
    # 30 s kernel timeouts: what the leader's kernel cached before the stop must not survive
    # its demotion
    c = peer_cluster(fs={"attr_timeout_s": 30.0, "entry_timeout_s": 30.0})
    c.mount_all()
    old, e0 = c.wait_leader(timeout=30)
    lp = c[old]
    bound = lp.failover_s + MARGIN_S
    (lp.ws / "stop").mkdir()
    (lp.ws / "warm").mkdir()
    for n in ("shrink", "grow", "gone", "ren", "mode"):
        write_file(lp.ws / "warm" / n, b"before the stop " * 1000)
    for n in ("shrink", "grow", "gone", "ren", "mode"):       # cached by the leader's kernel
        assert _read(lp.ws / "warm" / n) == b"before the stop " * 1000
        os.stat(lp.ws / "warm" / n)
    assert _missing(lp.ws / "warm" / "ren2")
    wl = c.writer(lp, lp.ws / "stop", prefix="old")
    wait_until(lambda: len(wl.successes()) >= 10, 60, "writes on the leader's mount")
    t_stop = c.stop(old)
    written: dict[str, bytes] = {}
    try:
        new, e1 = c.wait_leader(not_name=old, min_epoch=e0, timeout=lp.lease["duration_s"] * 3 + MARGIN_S)
        t_new = time.monotonic()
        f = next(p for p in c.real if p.name not in (old, new))

        def during():
            w = f.ws / "warm"
            write_file(w / "shrink", b"short")
            write_file(w / "grow", b"after the stop " * 3000)
            os.unlink(w / "gone")
            os.rename(w / "ren", w / "ren2")
            os.chmod(w / "mode", 0o600)
            times = []
            for i in range(5):
                data = os.urandom(random.randrange(100, 150_000))
                t = time.monotonic()
                write_file(f.ws / "stop" / f"during-{i}", data)
                times.append(time.monotonic() - t)
                written[f"during-{i}"] = data
            for i in range(3):
                data = os.urandom(3000 + i)
                write_file(f.ws / "stop" / f"tmp-{i}", data)
                os.rename(f.ws / "stop" / f"tmp-{i}", f.ws / "stop" / f"renamed-{i}")
                written[f"renamed-{i}"] = data
            os.rename(f.ws / "stop" / "during-0", f.ws / "stop" / "during-0-moved")
            written["during-0-moved"] = written.pop("during-0")
            return times

        times = within(bound * 2, during, what=f"writes through {f.name} while {old} is stopped")
    finally:
        t_cont = c.cont(old)
    roles_seen = []

    def follows():
        st = lp.ws_status()
        roles_seen.append(_brief(st))
        return st and st.get("role") == "follower" and st.get("leader") == new and st.get("epoch") == e1

    wait_until(follows, 10, f"{old} to report follower of {new} at epoch {e1} after SIGCONT",
               describe=lambda: roles_seen[-3:])
    t_follow = time.monotonic()

    def demoted_cache() -> list[str]:
        w, bad = lp.ws / "warm", []
        checks = [("shrink", lambda: _read(w / "shrink") == b"short" and os.stat(w / "shrink").st_size == 5),
                  ("grow", lambda: _read(w / "grow") == b"after the stop " * 3000),
                  ("gone", lambda: _missing(w / "gone")),
                  ("ren", lambda: _missing(w / "ren") and _read(w / "ren2") == b"before the stop " * 1000),
                  ("mode", lambda: os.stat(w / "mode").st_mode & 0o777 == 0o600)]
        for what, fn in checks:
            try:
                ok = fn()
            except OSError as e:
                ok = e
            if ok is not True:
                bad.append(f"{what}: {ok!r}")
        return bad

    stale = within(bound, demoted_cache, what=f"reading on {old} what changed while it was stopped")
    assert not stale, f"{old} still serves what its kernel cached as leader: {stale}"
    assert not any(r and r.get("role") == "leader" for r in roles_seen), roles_seen
    assert c.wait_leader(timeout=10, among=c.real) == (new, e1)
    # a file written through the resumed peer is seen by the others as soon as close returns
    data = os.urandom(20_000)
    within(bound, write_file, lp.ws / "stop" / "after-cont", data, what=f"a write through {old} after SIGCONT")
    written["after-cont"] = data
    for p in c.real:
        assert within(bound, _read, p.ws / "stop" / "after-cont") == data, p.name
    wl.finish(bound)
    report(f"SIGSTOP of leader {old}: {new} led (epoch {e1}) {t_new - t_stop:.2f} s after the stop; writes "
           f"through {f.name} meanwhile took {', '.join(f'{t * 1000:.0f}' for t in times)} ms; {old} reported "
           f"follower {t_follow - t_cont:.2f} s after SIGCONT; its writer closed {len(wl.files())} files, "
           f"{len(wl.failures())} calls failed"
           + "".join(f"\n  failed: {o}, started {o.t_start - t_stop:+.2f} s from the stop" for o in wl.failures()))
    fails = wl.failures()
    assert all(isinstance(o.error, OSError) for o in fails), [repr(o.error) for o in fails]
    stalled = [(o.name, round(o.seconds, 2)) for o in wl.snapshot() if o.seconds > (t_cont - t_stop) + bound]
    assert not stalled, stalled
    expected = {**wl.files(), **{n: (sha(d), len(d)) for n, d in written.items()}}
    for p in c.real:
        bad = verify_files(p.ws / "stop", expected)
        assert not bad, f"as seen from {p.name}: {bad[:10]}"
    for p in c.real:
        names = set(within(30, os.listdir, p.ws / "stop"))
        assert not {"during-0", "tmp-0", "tmp-1", "tmp-2"} & names, (p.name, sorted(names))
    assert c.wait_leader(timeout=10, among=c.real) == (new, e1)
    c.umount_all()
    r = c.fsck()
    assert r.returncode == 0, r.stdout + r.stderr


# -- 5. a peer whose key nobody lists --------------------------------------------------------------

@pytest.mark.slow
def test_intruder_is_refused(peer_cluster):
    c = peer_cluster(intruder=True, lease_overrides={"x": {"failover_timeout_s": 3.0}})
    c.mount_all()
    leader, epoch = c.wait_leader(timeout=30)
    f = next(p for p in c.real if p.name != leader)
    secret = os.urandom(5000)
    within(30, write_file, f.ws / "secret", secret)
    x = c.intruder
    r, dt = x.mount_cmd(timeout=60)
    assert r is not None, f"the intruder's mount did not return within 60 s\n{x.log_tail()}"
    if r.returncode != 0:
        reason = r.stderr.strip()
        report(f"intruder: mount refused after {dt:.1f} s (exit {r.returncode}): {reason}")
        assert reason and "\n" not in reason and "Traceback" not in reason, r.stderr
        assert x.pid is None or not pid_alive(x.pid)
    else:
        bound = x.failover_s + MARGIN_S
        outcomes: dict = {}

        def run_all():   # one after the other: concurrent lookups of one name queue in the kernel
            for what, fn, *args in [("listdir", os.listdir, x.ws), ("read", _read, x.ws / "secret"),
                                    ("stat", os.stat, x.ws / "secret"),
                                    ("create", write_file, x.ws / "intruded", b"intruder")]:
                try:
                    outcomes[what] = attempt(bound, fn, *args, what=f"intruder {what}")
                except BaseException as e:  # noqa: BLE001 - a hang or a wrong exception type
                    outcomes[what] = e
                    return

        calls = threading.Thread(target=run_all, daemon=True)
        calls.start()
        # meanwhile, for a few lease durations: it never leads and no real peer names it
        t_end = time.monotonic() + 3 * c[leader].lease["duration_s"]
        while time.monotonic() < t_end or calls.is_alive():
            xs = x.ws_status()
            assert not xs or (xs.get("role") != "leader" and xs.get("leader") != "x"), xs
            for n, st in c.statuses(among=c.real).items():
                assert st and st.get("leader") in c.names, (n, _brief(st))
            assert time.monotonic() < t_end + 4 * bound, f"intruder calls still running: {outcomes}"
            time.sleep(0.2)   # the sampling period of an invariant watched over a window (not a wait)
        for what, res in outcomes.items():
            if isinstance(res, BaseException):
                raise res
            ok, val, secs = res
            assert not ok and isinstance(val, OSError), f"intruder {what} succeeded: {val!r}"
            assert secs <= x.failover_s + 5, f"intruder {what} failed only after {secs:.1f} s"
        assert len(outcomes) == 4, outcomes
        report(f"intruder: mount succeeded in {dt:.1f} s; " + ", ".join(
            f"{w} failed with {errno.errorcode.get(v.errno, v.errno)} after {s:.1f} s"
            for w, (_, v, s) in sorted(outcomes.items())))
    # the real peers keep working (normally under the same leader) and never list the intruder
    now = c.wait_leader(timeout=30, among=c.real)
    if now != (leader, epoch):
        report(f"intruder: leadership moved from {leader} (epoch {epoch}) to {now[0]} (epoch {now[1]})")
    for p in c.real:
        assert within(30, _read, p.ws / "secret") == secret
        assert within(30, _missing, p.ws / "intruded")
        st = p.cli_status()
        assert "x" not in [q["name"] for q in st["peers"]], st["peers"]
    data = os.urandom(10_000)
    within(30, write_file, f.ws / "after", data)
    assert all(within(30, _read, p.ws / "after") == data for p in c.real)
    c.umount_all()


# -- 6. bad input ----------------------------------------------------------------------------------

def test_one_peer_down_at_start(peer_cluster):
    """Two of three peers mounted: they elect a leader and serve; the third joins later."""
    c = peer_cluster()
    c.mount_all(["a", "b"])
    leader, epoch = c.wait_leader(timeout=30, among=["a", "b"])
    follower = c["b" if leader == "a" else "a"]
    files = {}
    for i, (w, r) in enumerate([(follower, c[leader]), (c[leader], follower)]):
        data = os.urandom(7000 + i)
        within(30, write_file, w.ws / f"two-{i}", data)
        assert within(30, _read, r.ws / f"two-{i}") == data
        files[f"two-{i}"] = data
    st = c["a"].cli_status()
    down = [q for q in st["peers"] if q["name"] == "c"]
    assert down and down[0]["alive"] is False and down[0]["leads"] == [], st["peers"]
    c.mount("c")
    assert c.wait_leader(timeout=30) == (leader, epoch)
    for n, d in files.items():
        assert within(30, _read, c["c"].ws / n) == d
    c.umount_all()


def _garbage(target, impersonate, stop: threading.Event, counts: dict) -> None:
    """Throw garbage at `target`'s listen port until `stop`: raw TCP bytes; a DEALER without
    Curve; one with a random unlisted Curve key; one authenticated with `impersonate`'s real key
    sending malformed and nonsensical envelopes (and one frame above the message size limit)."""
    rng = random.Random(7)
    blobs = [rng.randbytes(n) for n in (0, 1, 7, 64, 300, 4096, 70_000, 256 << 10)]
    ctx = zmq.Context()
    socks = []
    try:
        plain = ctx.socket(zmq.DEALER)
        unlisted = ctx.socket(zmq.DEALER)
        pub, sec = zmq.curve_keypair()
        unlisted.curve_serverkey = target.public.encode()
        unlisted.curve_publickey, unlisted.curve_secretkey = pub, sec
        listed = ctx.socket(zmq.DEALER)
        listed.curve_serverkey = target.public.encode()
        listed.curve_publickey, listed.curve_secretkey = impersonate.public.encode(), impersonate.secret.encode()
        socks = [plain, unlisted, listed]
        for s in socks:
            s.linger = 0
            s.sndhwm = 20          # the refused sockets only queue: keep that small
            s.connect(target.endpoint)
        env = {"v": 1, "kind": "lease.prepare", "id": b"0123456789abcdef", "epoch": None, "sender": impersonate.name}
        shapes = [
            lambda: rng.choice(blobs),
            lambda: msgpack.packb([1, 2, 3]),
            lambda: msgpack.packb({**env, "v": 99}),
            lambda: msgpack.packb({**env, "sender": "zz"}),
            lambda: msgpack.packb({**env, "id": rng.randbytes(16),
                                   "body": rng.choice([None, "x", [1], {"workspace": 5}, {"ballot": -1}])}),
            lambda: msgpack.packb({**env, "id": rng.randbytes(16), "kind": "no.such.kind", "body": blobs[4]}),
            lambda: msgpack.packb({**env, "kind": "$reply"}),
            lambda: msgpack.packb({**env, "epoch": -5, "kind": "x" * 500}),
            lambda: b"\xc1" * 10,                                  # a never-used msgpack byte
            lambda: b"\xdf\xff\xff\xff\xff",                       # a map claiming 4 G entries
        ]
        big = b"\x00" * (20 << 20)                                 # above the 16 MiB message limit
        while not stop.is_set():
            for s in socks:
                frames = [shape() for shape in rng.sample(shapes, rng.randrange(1, 3))]
                if big is not None and s is listed:
                    frames, big = [big], None
                try:
                    s.send_multipart(frames, flags=zmq.NOBLOCK)
                    counts["zmq"] += 1
                except zmq.Again:
                    pass
            try:
                with socket.create_connection(("127.0.0.1", target.ident.port), timeout=1) as raw:
                    raw.sendall(rng.choice(blobs[1:7]))
                    counts["tcp"] += 1
            except OSError:
                pass
            stop.wait(0.02)
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()


def test_garbage_on_peer_ports_does_not_stop_serving(peer_cluster):
    c = peer_cluster()
    c.mount_all()
    leader, epoch = c.wait_leader(timeout=30)
    follower = next(p for p in c.real if p.name != leader)
    other = next(p for p in c.real if p.name not in (leader, follower.name))
    stop = threading.Event()
    counts = {"zmq": 0, "tcp": 0}
    # garbage at the leader (impersonating a follower) and at a follower (impersonating the leader)
    throwers = [threading.Thread(target=_garbage, args=(c[leader], follower, stop, counts), daemon=True),
                threading.Thread(target=_garbage, args=(follower, c[leader], stop, counts), daemon=True)]
    for t in throwers:
        t.start()
    try:
        t_end = time.monotonic() + 4.0
        i = 0
        while time.monotonic() < t_end or counts["zmq"] < 20:
            for p in (c[leader], follower, other):
                data = os.urandom(2000 + i)
                within(10, os.stat, p.ws, what=f"stat on {p.name} under garbage")
                within(10, write_file, p.ws / f"g-{p.name}-{i}", data, what=f"write on {p.name} under garbage")
                q = c[leader] if p is not c[leader] else follower
                assert within(10, _read, q.ws / f"g-{p.name}-{i}") == data
            i += 1
            assert time.monotonic() < t_end + 60, counts
    finally:
        stop.set()
        for t in throwers:
            t.join(30)
    assert not any(t.is_alive() for t in throwers)
    report(f"garbage: {counts['zmq']} zmq messages and {counts['tcp']} raw TCP payloads thrown at {leader} and "
           f"{follower.name}; {i} rounds of stat/write/read on all three meanwhile")
    assert all(pid_alive(p.pid) for p in c.real)
    assert c.wait_leader(timeout=30)[0]
    data = os.urandom(3000)
    within(30, write_file, follower.ws / "after-garbage", data)
    assert all(within(30, _read, p.ws / "after-garbage") == data for p in c.real)
    c.umount_all()


@pytest.mark.slow
def test_disagreeing_peer_lists_never_hang(peer_cluster):
    """c lists only a; a and b list all three. Every mount returns within 60 s (mounted or a clear
    error) and file calls on the mounted peers succeed or fail with OSError, never hang."""
    c = peer_cluster(peers_of={"c": ["a"]}, lease={**SHORT_LEASE, "failover_timeout_s": 5.0})
    outcomes = {}
    for p in c.real:
        r, dt = p.mount_cmd(timeout=60)
        assert r is not None, f"mount of {p.name} did not return within 60 s\n{p.log_tail()}"
        if r.returncode != 0:
            reason = r.stderr.strip()
            assert reason and "\n" not in reason and "Traceback" not in reason, (p.name, r.stderr)
        outcomes[p.name] = (r.returncode, round(dt, 1), r.stderr.strip())
    mounted = [p for p in c.real if p.pid is not None]
    results = {}
    for p in mounted:
        bound = p.failover_s + MARGIN_S
        data = os.urandom(4000)
        ok_w, v_w, s_w = attempt(bound, write_file, p.ws / f"from-{p.name}", data, what=f"write on {p.name}")
        ok_r, v_r, s_r = attempt(bound, _read, p.ws / f"from-{p.name}", what=f"read on {p.name}")
        ok_l, v_l, s_l = attempt(bound, os.listdir, p.ws, what=f"listdir on {p.name}")
        if ok_w and ok_r:
            assert v_r == data, p.name
        results[p.name] = {"write": ok_w or repr(v_w), "read": ok_r or repr(v_r), "listdir": ok_l or repr(v_l),
                           "seconds": round(max(s_w, s_r, s_l), 1)}
    sts = {p.name: _brief(p.ws_status()) for p in mounted}
    leaders = [(n, s["epoch"]) for n, s in sts.items() if s and s.get("role") == "leader"]
    report(f"disagreeing peer lists: mount {outcomes}; file calls {results}; status {sts}")
    assert len({e for _, e in leaders}) == len(leaders), f"two leaders with one epoch: {leaders}"
    c.umount_all()


def test_replayed_change_is_not_applied_twice(peer_cluster):
    """A change message captured and sent again (same request id) — at once, and after the
    name was removed — is answered with its first outcome and never applied a second time."""
    import stat as st

    import trio

    from agentmount.peer import RpcClient
    from agentmount.peer.wire import new_id

    c = peer_cluster()
    c.mount_all()
    leader, epoch = c.wait_leader(timeout=30)
    f = next(p for p in c.real if p.name != leader)
    me, lead = c.idents[f.name], c.idents[leader]
    rid = new_id()
    body = {"ws": WS, "a": [1, b"replayed", st.S_IFREG | 0o644, 0, 0, 0, None], "rid": rid}

    async def send(request_id: bytes):
        client = RpcClient(lead.endpoint, name=f.name, peer=leader, server_public_key=lead.public,
                           public_key=me.public, secret_key=me.secret, timeout=10)
        async with trio.open_nursery() as n:
            await n.start(client.run)
            try:
                return await client.call("ns.mknod", body, request_id=request_id)
            finally:
                n.cancel_scope.cancel()

    first = trio.run(send, rid)
    ino = first["r"]["r"][0]
    assert (c[leader].ws / "replayed").exists()
    assert c[leader].ws_status()["request_ids"] >= 1   # with peers, ids are remembered
    again = trio.run(send, rid)                       # the same message: the RPC layer's answer
    assert again["r"]["r"][0] == ino
    os.unlink(f.ws / "replayed")
    from agentmount.peer import RemoteError
    try:                                              # same change id in a new envelope
        late = trio.run(send, new_id())
        assert late["r"]["r"][0] == ino
    except BaseExceptionGroup as g:                   # or: the inode it made is gone (ENOENT)
        e = g.exceptions[0]
        assert isinstance(e, RemoteError) and (e.code, e.message) == ("fs", str(errno.ENOENT)), g
    for p in c.real:
        assert _missing(p.ws / "replayed"), p.name      # not made again
    c.umount_all()


def _sweep(peer) -> int:
    from agentmount import control
    resp = control.request(str(peer.data), {"cmd": "sweep", "workspace": WS}, timeout=60)
    assert resp and resp.get("ok"), resp
    return resp["result"]


@pytest.mark.slow
def test_leader_sweep_spares_followers_writes_and_collects_crash_leftovers(peer_cluster):
    """The leader's sweep of unreferenced blocks never deletes blocks a follower uploaded for a
    file it has not closed yet (even past the grace period), skips a round while a peer is
    down, and collects what a SIGKILLed follower left once every peer answers again."""
    c = peer_cluster(fs={"block_size_kb": 64, "gc_grace_s": 0})
    c.mount_all()
    leader, _ = c.wait_leader(timeout=30)
    f1, f2 = [p for p in c.real if p.name != leader]
    keep = os.urandom(300_000)
    write_file(f1.ws / "keep", keep)
    data = os.urandom(2 << 20)
    with open(f1.ws / "open-long", "wb") as f:
        f.write(data)          # full blocks upload at once, uncommitted until close
        f.flush()
        store_blocks = c.store / "ws" / WS / "blocks"
        wait_until(lambda: sum(len(fs) for _, _, fs in os.walk(store_blocks)) >= 30, 30, "uploads in flight")
        assert _sweep(c[leader]) == 0
    assert _read(f2.ws / "open-long") == data
    # a follower dies mid-write: its blocks are garbage, but only once it can be asked again
    g = open(f2.ws / "unclosed", "wb")
    g.write(os.urandom(2 << 20))
    g.flush()
    wait_until(lambda: sum(len(fs) for _, _, fs in os.walk(store_blocks)) >= 60, 30, "more uploads")
    c.kill(f2.name)
    try:
        g.close()
    except OSError:
        pass
    assert _sweep(c[leader]) == 0          # a peer is down: no round
    c.mount(f2.name)
    wait_until(lambda: _sweep(c[leader]) >= 1, 30, "a sweep after the follower is back")
    for p in c.real:
        assert _read(p.ws / "keep") == keep and _read(p.ws / "open-long") == data, p.name
    c.umount_all()
    r = c.fsck()
    assert r.returncode == 0 and "unreferenced" not in r.stdout, r.stdout


# -- 7. performance --------------------------------------------------------------------------------

@pytest.mark.slow
def test_metadata_rates_leader_vs_follower(peer_cluster):
    c = peer_cluster()
    c.mount_all()
    leader, _ = c.wait_leader(timeout=30)
    follower = next(p for p in c.real if p.name != leader)
    n = 500
    rates: dict[str, dict[str, float]] = {}

    def run(p) -> dict[str, float]:
        d = p.ws / f"perf-{p.name}"
        d.mkdir()
        out = {}
        t = time.perf_counter()
        for i in range(n):
            os.close(os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644))
        out["create"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(n):
            os.stat(d / f"f{i}")
        out["stat"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(n):
            os.rename(d / f"f{i}", d / f"r{i}")
        out["rename"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(n):
            os.unlink(d / f"r{i}")
        out["unlink"] = n / (time.perf_counter() - t)
        assert os.listdir(d) == []
        return out

    for role, p in (("leader", c[leader]), ("follower", follower)):
        rates[role] = within(240, run, p, what=f"metadata ops on the {role}")
    lines = [f"metadata rates, {n} files each (ops/s)", f"{'op':<8}{'leader ' + leader:>14}"
             f"{'follower ' + follower.name:>16}{'ratio':>8}"]
    for op in ("create", "stat", "rename", "unlink"):
        lr, fr = rates["leader"][op], rates["follower"][op]
        lines.append(f"{op:<8}{lr:>14,.0f}{fr:>16,.0f}{fr / lr:>8.2f}")
    report("\n".join(lines))
    assert all(v > 0 for r in rates.values() for v in r.values())
    c.umount_all()
