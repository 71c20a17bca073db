"""Distributed locks across a leader failover and a partition, fencing tokens and `agentmount locks`.

Three real peers (separate daemons and mountpoints, lock_ttl_s = 4 s, short leases); lock
holders and waiters are real child processes (tests/test_locks_peers.py's Child). "Blocked" is
read from each peer's own count of waiting requests, never guessed with a sleep.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.peers import SHORT_LEASE, clusters, report, wait_until, write_file
from tests.test_locks_peers import Child, make_shared, roles, wait_blocked

# Longer than a failover with these short leases (4-8 s here when loaded) plus the fencing
# margin, so holders keep their locks across one.
LOCK_TTL_S = 12.0
LEASE = {**SHORT_LEASE, "lock_ttl_s": LOCK_TTL_S}
TOKEN = "user.agentmount.lock_token"


@pytest.fixture
def cluster(tmp_path):
    """Three mounted peers of their own (these tests kill and stop daemons)."""
    gen = clusters(tmp_path)
    factory = next(gen)
    c = factory(lease=LEASE)
    c.mount_all()
    c.wait_leader(timeout=30)
    yield c
    try:
        next(gen)
    except StopIteration:
        pass


@pytest.fixture
def made():
    kids: list[Child] = []
    yield kids
    for k in kids:
        k.close()


def child(made: list, peer, name: str) -> Child:
    c = Child(peer, peer.ws / name)
    made.append(c)
    return c


def flock_nb_fails(c: Child) -> bool:
    r = c.do("flock ex nb", timeout=LOCK_TTL_S + 20)
    if "err" not in r:
        c.ok("flock un")
        return False
    assert r["err"] == errno.EWOULDBLOCK, f"{c}: flock LOCK_NB gave {errno.errorcode.get(r['err'])}"
    return True


def test_leader_sigkill_keeps_held_locks_and_grants_waiters_in_order(cluster, made):
    """A follower's process holds flock LOCK_EX and a write lock [0,10); two waiters queue on
    two peers (B first, then A). SIGKILL of the leader: afterwards the holder still holds both
    (LOCK_NB and F_GETLK from elsewhere see it), nothing is granted before its unlock, then the
    waiters get the lock one at a time in their old order."""
    name = make_shared(cluster, "failover")
    leader, a, b = roles(cluster)
    holder = child(made, a, name)
    holder.ok("flock ex")
    holder.ok("setlk w 0 10")
    w1, w2 = child(made, b, name), child(made, a, name)
    w1.send("flock ex")
    wait_blocked(b, w1.answered)
    w2.send("flock ex")
    wait_blocked(a, w2.answered)

    t_kill = cluster.kill(leader.name)
    new, _ = cluster.wait_leader(not_name=leader.name, timeout=30)
    probe = child(made, b, name)
    t0 = time.monotonic()
    assert flock_nb_fails(probe), f"the flock held on {a.name} was granted to {probe} after the failover"
    t_served = time.monotonic()
    r = probe.do("getlk w 0 10")
    assert r["lock"][0] == 1, f"F_GETLK on {b.name} after the failover sees no write lock: {r}"
    assert w1.answered() is None and w2.answered() is None, "a waiter was granted while the lock is held"
    report(f"leader {leader.name} SIGKILLed: new leader {new} after {t0 - t_kill:.2f} s, lock table serving "
           f"(held locks re-asserted) {t_served - t_kill:.2f} s after the kill")

    holder.ok("flock un")
    first = w1.granted("flock ex", 10)
    assert w2.answered() is None, f"{w2} was granted while {w1} holds LOCK_EX"
    assert flock_nb_fails(probe), "LOCK_NB succeeded while a re-queued waiter holds the lock"
    w1.ok("flock un")
    second = w2.granted("flock ex", 10)
    assert first <= second
    w2.ok("flock un")
    cluster.mount(leader.name)
    cluster.wait_leader(timeout=30)


def test_tokens_and_listing_across_peers(cluster, made, tmp_path):
    """The fencing token of a grant is readable as an xattr from every peer and grows with each
    grant; `agentmount locks` on any peer lists holders and waiters with paths, peers and pids."""
    name = make_shared(cluster, "tokens")
    leader, a, b = roles(cluster)
    with pytest.raises(OSError) as e:
        os.getxattr(b.ws / name, TOKEN)
    assert e.value.errno == errno.ENODATA
    holder = child(made, a, name)
    holder.ok("flock ex")
    t1 = os.getxattr(b.ws / name, TOKEN).decode()
    assert os.getxattr(a.ws / name, TOKEN).decode() == t1 == os.getxattr(leader.ws / name, TOKEN).decode()
    epoch, n1 = map(int, t1.split("-"))
    waiter = child(made, b, name)
    waiter.send("flock ex")
    wait_blocked(b, waiter.answered)

    r = b.cli("locks", "--json")
    assert r.returncode == 0, r.stderr
    lst = json.loads(r.stdout)["default"]
    assert [(h["path"], h["peer"], h["pid"], h["kind"], h["type"]) for h in lst["held"]] == \
        [(f"/{name}", a.name, holder.pid, "flock", "write")], lst
    assert [(w["path"], w["peer"], w["pid"]) for w in lst["waiting"]] == [(f"/{name}", b.name, waiter.pid)], lst
    assert lst["held"][0]["token"] == t1
    text = leader.cli("locks").stdout
    assert f"/{name}" in text and "HELD" in text and "WAITING" in text, text

    holder.ok("flock un")
    waiter.granted("flock ex", 10)
    e2, n2 = map(int, os.getxattr(a.ws / name, TOKEN).decode().split("-"))
    assert (e2, n2) > (epoch, n1), f"token did not grow: {t1} then {e2}-{n2}"
    with pytest.raises(OSError) as e:
        os.setxattr(a.ws / name, TOKEN, b"1-1")
    assert e.value.errno == errno.EPERM


WRITER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
while True:
    try:
        os.pwrite(fd, b"x", 0)
    except OSError as e:
        print("error", e.errno, time.monotonic(), flush=True)
        break
    time.sleep(0.05)     # pacing: one small write every 50 ms
sys.stdin.readline()
"""


def test_cut_off_holder_fences_itself_before_its_lock_is_given_away(cluster, made):
    """Follower A holds a flock and keeps writing the file (B's LOCK_NB fails). The leader and
    B are stopped (SIGSTOP): A can reach no leader. A fences itself before lock_ttl_s: the
    holder's writes fail with EIO and A's new lock calls with ENOLCK. After SIGCONT, B gets the
    lock (A gave it up), and A works again once the fenced handle is closed."""
    name = make_shared(cluster, "fence")
    leader, a, b = roles(cluster)
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(a.ws / name)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert w.stdout.readline().strip() == "locked"
        waiter = child(made, b, name)
        waiter.fails("flock ex nb", errno.EWOULDBLOCK, f"the holder on {a.name} has it")
        other = child(made, a, name)      # another process on A, its file open before the cut
        other.ok("setlk u 0 1")           # (answered once its open is done; unlocking is a no-op)
        t_stop = cluster.stop(leader.name)
        cluster.stop(b.name)
        try:
            line = w.stdout.readline().split()
            assert line[:2] == ["error", str(errno.EIO)], f"the holder's write on {a.name} ended with {line}"
            t_fence = float(line[2])
            r = other.do("flock sh", timeout=LOCK_TTL_S + 20)
            assert r.get("err") == errno.ENOLCK, f"a lock call on the cut-off peer gave {r}"
            t_enolck = r["t"]
        finally:
            cluster.cont(b.name)
            cluster.cont(leader.name)
        # (B asks only now: a request left waiting on a peer frozen past the fencing point may be
        # failed with ENOLCK when that peer wakes.)
        t_grant = waiter.ok("flock ex", LOCK_TTL_S + 30)
        report(f"holder peer {a.name} cut off at 0 s: fenced (EIO) at {t_fence - t_stop:.2f} s, a lock call "
               f"then: ENOLCK at {t_enolck - t_stop:.2f} s, lock given to {b.name} at {t_grant - t_stop:.2f} s "
               f"(peers resumed; lock_ttl_s {LOCK_TTL_S:g})")
        assert t_fence - t_stop < LOCK_TTL_S, f"{a.name} fenced only {t_fence - t_stop:.2f} s after the cut"
        assert t_fence < t_grant
        assert t_enolck - t_fence < 1.0, "a lock call on the fenced peer did not fail at once"
    finally:
        w.stdin.close()
        w.kill()
        w.wait(10)
    for m in list(made):
        m.close()
        made.remove(m)
    # The fenced handles are closed: A reads, writes and locks again.
    again = child(made, a, name)
    wait_until(lambda: "err" not in again.do("flock ex nb"), LOCK_TTL_S + 20, f"a new lock on {a.name}")
    write_file(a.ws / name, b"after")
    assert Path(a.ws / name).read_bytes() == b"after"
