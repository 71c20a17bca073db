"""Change events and webhooks, end to end: a real mount, a real HTTP receiver process."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from agentmount import webhooks
from tests.helpers import Mount, wait_for
from tests.receiver import Receiver

SECRET = webhooks.generate_secret()


def _conf(url: str, *, events: list[str] | None = None, schedule: list[float] | None = None,
          extra: str = "") -> str:
    lines = ["[events]", "allow_private = true"]
    if schedule is not None:
        lines.append(f"retry_schedule_s = {schedule!r}")
        lines.append(f"retry_every_s = {schedule[-1]!r}")
    lines += ["", "[[webhook]]", 'workspace = "default"', f'url = "{url}"', f'secret = "{SECRET}"']
    if events:
        lines.append("events = [" + ", ".join(f'"{e}"' for e in events) + "]")
    return "\n".join(lines) + "\n" + extra


@pytest.fixture
def receiver(tmp_path):
    r = Receiver(tmp_path / "receiver").start()
    yield r
    r.stop()


def _summary(deliveries: list[dict]) -> list[tuple]:
    out = []
    for d in sorted(deliveries, key=lambda d: d["payload"]["data"]["seq"]):
        p = d["payload"]["data"]
        out.append((d["payload"]["type"], p["path"], p.get("old_path"), p["is_dir"]))
    return out


def test_each_operation_yields_its_events(tmp_path, receiver):
    m = Mount(tmp_path, extra=_conf(receiver.url)).mount()
    try:
        w = m.ws
        with open(w / "a.txt", "w") as f:
            f.write("hello")
        os.mkdir(w / "d")
        os.rename(w / "a.txt", w / "d" / "b.txt")
        os.chmod(w / "d" / "b.txt", 0o600)
        os.setxattr(w / "d" / "b.txt", "user.k", b"v")
        os.link(w / "d" / "b.txt", w / "h")
        os.symlink("d/b.txt", w / "s")
        os.unlink(w / "h")
        os.unlink(w / "d" / "b.txt")
        os.rmdir(w / "d")
        expected = [
            ("fs.entry.created", "/a.txt", None, False),
            ("fs.file.written", "/a.txt", None, False),
            ("fs.entry.created", "/d", None, True),
            ("fs.entry.moved", "/d/b.txt", "/a.txt", False),
            ("fs.entry.attrib", "/d/b.txt", None, False),
            ("fs.entry.attrib", "/d/b.txt", None, False),
            ("fs.entry.created", "/h", None, False),
            ("fs.entry.created", "/s", None, False),
            ("fs.entry.deleted", "/h", None, False),
            ("fs.entry.deleted", "/d/b.txt", None, False),
            ("fs.entry.deleted", "/d", None, True),
        ]
        receiver.wait_for(lambda r: len(r) >= len(expected), 20, what="the events of 11 operations")
        got = receiver.deliveries()
        assert _summary(got) == expected
        # Delivered in seq order (one request at a time by default), each signed and unique.
        by_arrival = [d["payload"]["data"]["seq"] for d in sorted(got, key=lambda d: d["t"])]
        assert by_arrival == sorted(by_arrival)
        assert len({d["headers"]["webhook-id"] for d in got}) == len(expected)
        for d in got:
            payload = webhooks.verify(d["headers"], d["body"].encode(), SECRET)
            data = payload["data"]
            assert d["headers"]["webhook-id"] == f"evt_default_{data['epoch']}_{data['seq']}"
            assert data["workspace"] == "default" and data["actor"]["pid"] > 0
            assert data["actor"]["peer"] == "test" and data["actor"]["uid"] == os.getuid()
        written = next(d["payload"]["data"] for d in got if d["payload"]["type"] == "fs.file.written")
        assert written["size"] == 5
        versions = [d["payload"]["data"]["version"] for d in got if d["payload"]["data"]["path"] == "/d/b.txt"]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
        moved = next(d["payload"]["data"] for d in got if d["payload"]["type"] == "fs.entry.moved")
        assert moved["cookie"] == moved["seq"]
        # A later truncating open and rewrite is one fs.file.written, not an attribute change.
        n = len(got)
        (w / "s2").write_text("x")            # created + written
        with open(w / "s2", "w") as f:      # O_TRUNC open of an existing file
            f.write("abc")
        receiver.wait_for(lambda r: len(r) >= n + 3, 20, what="events of a rewrite")
        tail = _summary(receiver.deliveries())[n:]
        assert tail == [("fs.entry.created", "/s2", None, False), ("fs.file.written", "/s2", None, False),
                        ("fs.file.written", "/s2", None, False)]
    finally:
        m.cleanup()


def test_concurrent_writers_one_event_per_file_and_latency(tmp_path, receiver):
    m = Mount(tmp_path, extra=_conf(receiver.url, events=["fs.file.written"])).mount()
    try:
        w = m.ws
        closed: dict[str, float] = {}

        def writer(k: int) -> None:
            os.mkdir(w / f"w{k}")
            for i in range(125):
                p = w / f"w{k}" / f"f{i}"
                with open(p, "wb") as f:
                    f.write(os.urandom(200))
                closed[f"/w{k}/f{i}"] = time.time()

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        receiver.wait_for(lambda r: len(r) >= 1000, 60, what="1000 fs.file.written events")
        got = receiver.deliveries()
        assert len(got) == 1000
        assert {d["payload"]["type"] for d in got} == {"fs.file.written"}
        assert len({d["headers"]["webhook-id"] for d in got}) == 1000
        assert {d["payload"]["data"]["path"] for d in got} == set(closed)
        for d in got:
            webhooks.verify(d["headers"], d["body"].encode(), SECRET)
        # Latency from close() returning to the receiver's arrival, a healthy receiver on loopback.
        n0 = len(receiver.requests())
        lat = []
        for i in range(100):
            with open(w / f"lat{i}", "wb") as f:
                f.write(b"x")
            t0 = time.time()
            receiver.wait_for(lambda r: len(r) >= n0 + i + 1, 10, f"event of lat{i}")
            lat.append(receiver.requests()[-1]["t"] - t0)
        lat.sort()
        p50, p95 = lat[49] * 1000, lat[94] * 1000
        print(f"\nclose() -> receiver: p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {lat[-1] * 1000:.1f} ms")
        assert p95 < 100, f"p95 {p95:.1f} ms"
    finally:
        m.cleanup()


def test_undelivered_events_survive_sigkill(tmp_path, receiver):
    receiver.set_mode("refuse")
    m = Mount(tmp_path, extra=_conf(receiver.url, events=["fs.file.written"], schedule=[0, 0.2])).mount()
    try:
        for i in range(20):
            (m.ws / f"f{i}").write_bytes(b"data %d" % i)
        m.kill()
        receiver.set_mode("ok")
        m.mount()
        receiver.wait_for(lambda r: len({x["headers"]["webhook-id"] for x in r if x["status"] == 200}) >= 20, 30,
                          "the 20 events after the restart")
        paths = {d["payload"]["data"]["path"] for d in receiver.deliveries()}
        assert paths == {f"/f{i}" for i in range(20)}
    finally:
        m.cleanup()


def _retry_log(m: Mount, event_id: str) -> list[float]:
    """Wall-clock times of the daemon's failed attempts at `event_id` (its info log lines)."""
    import calendar
    import re
    out = []
    for line in (m.data / "agentmount.log").read_text().splitlines():
        if "event=webhook_retry" in line and f"id={event_id} " in line:
            ts = re.search(r"ts=(\S+)Z", line).group(1)
            whole, ms = ts.split(".")
            out.append(calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000)
    return out


def test_retries_follow_the_schedule_through_an_outage(tmp_path, receiver):
    """The receiver refuses connections for 30 s, then answers 500 twice, then recovers: every
    event arrives, the attempts at the first one are spaced as the schedule says (measured from
    the daemon's log and the receiver's), and the ids of the retries match the originals."""
    schedule = [0, 1, 2, 4, 6]
    receiver.set_mode("refuse")
    m = Mount(tmp_path, extra=_conf(receiver.url, events=["fs.file.written"], schedule=schedule)
              + '[log]\nlevel = "info"\n').mount()
    try:
        t0 = time.monotonic()
        for i in range(5):
            (m.ws / f"f{i}").write_bytes(b"x")
        # Refused connections for 30 s (the daemon counts its failed attempts) ...
        wait_for(lambda: time.monotonic() - t0 >= 30 and _live(m).get("failed_attempts", 0) >= 5, 45, 0.2,
                 what="30 s of refused attempts")
        assert not receiver.requests()
        receiver.set_mode("500")            # ... then errors ...
        receiver.wait_for(lambda r: len(r) >= 2, 20, what="two answers of 500")
        receiver.set_mode("ok")             # ... then it recovers
        receiver.wait_for(lambda r: len({x["payload"]["data"]["path"] for x in _ok(r)}) >= 5, 30, what="all 5 events")
        reqs = receiver.requests()
        first_id = reqs[0]["headers"]["webhook-id"]
        failed = _retry_log(m, first_id)
        ok_at = [r["t"] for r in reqs if r["headers"]["webhook-id"] == first_id and r["status"] == 200]
        attempts = failed + ok_at[:1]
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        want = [schedule[n] if n < len(schedule) else schedule[-1] for n in range(1, len(attempts))]
        print(f"\n{first_id}: {len(failed)} failed attempts, then delivered; gaps {[round(g, 2) for g in gaps]} s,"
              f" schedule {want} s (jitter 10%)")
        assert len(failed) >= 8                   # 30 s of refusals and two 500s at the schedule's pace
        for g, w in zip(gaps, want):
            assert w * 0.85 - 0.05 <= g <= w * 1.15 + 0.3, (gaps, want)
        assert [r["status"] for r in reqs if r["headers"]["webhook-id"] == first_id] == [500, 500, 200]
        ok = _ok(reqs)
        assert len({r["headers"]["webhook-id"] for r in ok}) == 5
        failed_ids = {r["headers"]["webhook-id"] for r in reqs if r["status"] == 500}
        assert failed_ids <= {r["headers"]["webhook-id"] for r in ok}   # retried under the same id
    finally:
        m.cleanup()


def _subs(m: Mount) -> list[dict]:
    return json.loads(m.cli("webhook", "list", "default", "--json").stdout)


def _live(m: Mount) -> dict:
    """The running deliverer's figures for the (only) subscription."""
    subs = _subs(m)
    return subs[0].get("delivery") or {} if subs else {}


def _ok(reqs: list[dict]) -> list[dict]:
    out = []
    for r in reqs:
        if r["status"] == 200:
            r = dict(r)
            r["payload"] = json.loads(r["body"])
            out.append(r)
    return out


def test_webhook_cli_add_list_test_remove_and_tail(tmp_path, receiver):
    m = Mount(tmp_path, extra="[events]\nallow_private = true\n").mount()
    try:
        bad = m.cli("webhook", "add", "default", "ftp://example.com/x")
        assert bad.returncode == 2 and "scheme must be http or https" in bad.stderr, bad.stderr
        bad = m.cli("webhook", "add", "default", receiver.url, "--secret", "nope")
        assert bad.returncode == 2 and "secret" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        bad = m.cli("webhook", "add", "default", receiver.url, "--event", "fs.nothing")
        assert bad.returncode == 2 and "unknown event type" in bad.stderr
        r = m.cli("webhook", "add", "default", receiver.url, "--secret", SECRET, "--event", "fs.entry.created",
                  "--path", "/in/*")
        assert r.returncode == 0, r.stderr
        sid = r.stdout.split()[1]
        listed = m.cli("webhook", "list", "default")
        assert sid in listed.stdout and "fs.entry.created" in listed.stdout
        os.mkdir(m.ws / "in")
        (m.ws / "elsewhere").write_text("x")
        (m.ws / "in" / "job1").write_text("x")
        receiver.wait_for(lambda r: len(r) >= 1, 20, what="the created event of /in/job1")
        got = receiver.deliveries()
        assert [(d["payload"]["type"], d["payload"]["data"]["path"]) for d in got] == [("fs.entry.created", "/in/job1")]
        t = m.cli("webhook", "test", "default", sid)
        assert t.returncode == 0 and "delivered: status 200" in t.stdout, t.stdout + t.stderr
        assert receiver.deliveries()[-1]["payload"]["type"] == "webhook.test"
        tail = m.cli("events", "tail", "default", "--since", "0", "-n", "100")
        evs = [json.loads(line) for line in tail.stdout.splitlines()]
        assert [e["data"]["path"] for e in evs if e["type"] == "fs.entry.created"] == ["/in", "/elsewhere", "/in/job1"]
        assert [e["data"]["seq"] for e in evs] == sorted(e["data"]["seq"] for e in evs)
        rm = m.cli("webhook", "remove", "default", sid)
        assert rm.returncode == 0
        assert sid not in m.cli("webhook", "list", "default").stdout
        assert m.cli("webhook", "remove", "default", sid).returncode == 2
    finally:
        m.cleanup()


def test_dead_letters_are_replayed_and_410_disables(tmp_path, receiver):
    receiver.set_mode("500")
    extra = _conf(receiver.url, events=["fs.file.written"], schedule=[0, 0.2]) + ""
    extra = extra.replace("[events]\n", "[events]\nretry_budget_s = 0.5\n", 1)
    m = Mount(tmp_path, extra=extra).mount()
    try:
        (m.ws / "a").write_text("1")
        (m.ws / "b").write_text("2")
        receiver.wait_for(lambda r: len({x["headers"]["webhook-id"] for x in r}) >= 2, 20, what="attempts of both events")
        sub = wait_for(lambda: (x := _subs(m)[0])["dead_letters"] == 2 and x, 20, what="two dead letters",
                       describe=lambda: _subs(m))
        receiver.set_mode("ok")
        r = m.cli("webhook", "replay", "default", sub["id"])
        assert r.returncode == 0 and "2 delivered" in r.stdout, r.stdout + r.stderr
        assert {d["payload"]["data"]["path"] for d in receiver.deliveries()} == {"/a", "/b"}
        assert _subs(m)[0]["dead_letters"] == 0
        receiver.set_mode("410")
        (m.ws / "c").write_text("3")
        wait_for(lambda: _subs(m)[0].get("disabled"), 20, what="410 to disable the webhook")
        n = len(receiver.requests())
        (m.ws / "d").write_text("4")
        m.cli("events", "tail", "default")          # a round trip through the daemon
        assert len(receiver.requests()) == n
    finally:
        m.cleanup()


def test_invalid_webhook_in_config_is_refused_naming_the_key(tmp_path):
    for extra, key, words in [
        ('[[webhook]]\nworkspace = "default"\nurl = "http://127.0.0.1:9/x"\nsecret = "whsec_' + "A" * 40 + '"\n',
         "webhook[0].url", "allow_private"),
        ('[[webhook]]\nworkspace = "default"\nurl = "https://example.com/x"\nsecret = "plain"\n',
         "webhook[0].secret", "whsec_"),
        ('[[webhook]]\nworkspace = "default"\nurl = "https://example.com/x"\nsecret = "' + SECRET + '"\nfoo = 1\n',
         "webhook[0].foo", "unknown key"),
    ]:
        root = tmp_path / key.replace("[", "_").replace("]", "_").replace(".", "_")
        root.mkdir()
        m = Mount(root, extra=extra)
        r = m.cli("mount", str(m.mp))
        assert r.returncode == 2, r.stderr
        assert key in r.stderr and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_leader_sigkill_mid_stream_new_leader_resumes(tmp_path, receiver):
    from tests.peers import SHORT_LEASE, clusters
    gen = clusters(tmp_path / "cluster")
    factory = next(gen)
    try:
        c = factory(lease=SHORT_LEASE, extra=_conf(receiver.url, events=["fs.file.written"]))
        c.mount_all()
        leader, epoch = c.wait_leader(timeout=30)
        writer = c.followers()[0]
        closed: list[str] = []
        stop = threading.Event()

        def write() -> None:
            i = 0
            while not stop.is_set() and i < 5000:
                try:
                    (writer.ws / f"f{i}").write_bytes(b"x" * 100)
                    closed.append(f"/f{i}")
                except OSError:
                    pass      # EIO while no leader is reachable: not acknowledged, not required
                i += 1

        t = threading.Thread(target=write)
        t.start()
        try:
            receiver.wait_for(lambda r: len(r) >= 30, 60, what="events before the kill")
            c[leader].kill()
            c.wait_leader(not_name=leader, min_epoch=epoch, timeout=60)
            n = len(closed)
            wait_for(lambda: len(closed) >= n + 20, 60, what="20 acknowledged closes after the failover")
        finally:
            stop.set()
            t.join(120)
        want = set(closed)
        receiver.wait_for(lambda r: want <= {json_path(x) for x in r if x["status"] == 200}, 90,
                          "an event for every acknowledged close")
        epochs = {d["payload"]["data"]["epoch"] for d in receiver.deliveries()}
        assert len(epochs) >= 2, epochs         # delivered by the old leader and by the new one
        ids = [d["headers"]["webhook-id"] for d in receiver.deliveries()]
        print(f"\n{len(want)} closes acknowledged, {len(ids)} deliveries, {len(ids) - len(set(ids))} duplicates")
    finally:
        try:
            next(gen)
        except StopIteration:
            pass


def json_path(req: dict) -> str:
    return json.loads(req["body"])["data"]["path"]


def test_hanging_or_huge_receivers_stall_neither_files_nor_others(tmp_path):
    rs = {mode: Receiver(tmp_path / f"rcv-{mode}", mode).start() for mode in ("hang", "huge", "ok")}
    try:
        extra = "[events]\nallow_private = true\ntimeout_s = 2\n"
        for r in rs.values():
            extra += (f'\n[[webhook]]\nworkspace = "default"\nurl = "{r.url}"\nsecret = "{SECRET}"\n'
                      'events = ["fs.file.written"]\n')
        m = Mount(tmp_path, extra=extra).mount()
        try:
            slowest = 0.0
            for i in range(50):
                t0 = time.monotonic()
                (m.ws / f"f{i}").write_bytes(b"x")
                slowest = max(slowest, time.monotonic() - t0)
            assert slowest < 1.0, f"a close took {slowest:.2f} s"
            rs["ok"].wait_for(lambda r: len(r) >= 50, 15, what="the healthy receiver's 50 events")
            rs["huge"].wait_for(lambda r: len({x["headers"]["webhook-id"] for x in r}) >= 50, 30,
                                "the huge-answer receiver's 50 events")
            assert len(rs["hang"].requests()) <= 5     # one attempt per timeout, no pile-up
            t0 = time.monotonic()
            (m.ws / "after").write_bytes(b"y")
            assert time.monotonic() - t0 < 1.0
        finally:
            m.cleanup()
    finally:
        for r in rs.values():
            r.stop()


def test_lock_events(tmp_path, receiver):
    import fcntl
    m = Mount(tmp_path, extra=_conf(receiver.url, events=["fs.lock.acquired", "fs.lock.released"])).mount()
    try:
        (m.ws / "lockfile").write_text("")
        with open(m.ws / "lockfile") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            fcntl.flock(f, fcntl.LOCK_UN)
        with open(m.ws / "lockfile", "r+") as f:
            fcntl.lockf(f, fcntl.LOCK_EX)       # released by the close
        receiver.wait_for(lambda r: len(r) >= 4, 20, what="lock events")
        got = sorted(receiver.deliveries(), key=lambda d: d["payload"]["data"]["seq"])
        kinds = [(d["payload"]["type"], d["payload"]["data"]["path"], d["payload"]["data"].get("lock", {}).get("kind"))
                 for d in got]
        assert kinds == [("fs.lock.acquired", "/lockfile", "flock"), ("fs.lock.released", "/lockfile", None),
                         ("fs.lock.acquired", "/lockfile", "posix"), ("fs.lock.released", "/lockfile", None)], kinds
        acq = got[0]["payload"]["data"]
        assert acq["lock"]["type"] == "write" and acq["token"].count("-") == 1
        assert acq["actor"]["pid"] == os.getpid() and acq["actor"]["peer"] == "test"
    finally:
        m.cleanup()
