"""A subscriber far behind: the journal keeps what it has not received (snapshots do not
prune it away), and past `[events] max_backlog` its backlog is cut with one fs.overflow."""
from __future__ import annotations

import json

import pytest

from agentmount import webhooks
from tests.helpers import Mount, s3_conf
from tests.receiver import Receiver

SECRET = webhooks.generate_secret()


def _conf(url: str, events: str = "") -> str:
    return (f"\n[events]\nallow_private = true\nretry_schedule_s = [0, 0.3]\nretry_every_s = 0.3\n{events}\n"
            f"[[webhook]]\nworkspace = \"default\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n"
            "events = [\"fs.file.written\", \"fs.overflow\"]\n")


@pytest.fixture
def receiver(tmp_path):
    r = Receiver(tmp_path / "receiver").start()
    yield r
    r.stop()


def _payloads(receiver: Receiver) -> list[dict]:
    return sorted((d["payload"] for d in receiver.deliveries()), key=lambda p: p["data"]["seq"])


def test_snapshots_keep_the_journal_a_subscriber_still_needs(tmp_path, receiver, seaweed_cluster):
    """Snapshots every 20 records (each pruning the journal segments it covers: one per commit
    on S3) while the receiver is down, and a restart of the peer: every event still arrives
    afterwards, read back from the segments the prune held for the subscriber."""
    receiver.set_mode("refuse")
    (server,) = seaweed_cluster(1)
    conf = s3_conf(tmp_path, [server], fs={"snapshot_records": 20}) + _conf(receiver.url)
    m = Mount(tmp_path, conf_text=conf).mount()
    try:
        for i in range(60):
            (m.ws / f"f{i}").write_bytes(b"x" * i)
        m.umount()                            # final snapshot + prune with the cursor still at the start
        receiver.set_mode("ok")
        m.mount()
        receiver.wait_for(lambda _: len(_payloads(receiver)) >= 60, 30, what="60 fs.file.written events")
        got = _payloads(receiver)
        assert [p["type"] for p in got] == ["fs.file.written"] * 60      # no fs.overflow: nothing was lost
        assert [p["data"]["path"] for p in got] == [f"/f{i}" for i in range(60)]
        assert [p["data"]["size"] for p in got] == list(range(60))
    finally:
        m.cleanup()


def test_backlog_past_max_backlog_is_cut_with_one_overflow_event(tmp_path, receiver):
    receiver.set_mode("refuse")
    m = Mount(tmp_path, extra=_conf(receiver.url, "max_backlog = 100")).mount()
    try:
        for i in range(100):                  # two records each (create, close-write): 200 records
            (m.ws / f"f{i}").write_bytes(b"y")
        receiver.set_mode("ok")
        receiver.wait_for(lambda _: any(p["data"]["path"] == "/f99" for p in _payloads(receiver)
                                        if p["type"] == "fs.file.written"), 30, what="the newest file's event")
        got = _payloads(receiver)
        overflow = [p for p in got if p["type"] == "fs.overflow"]
        assert len(overflow) == 1, [p["type"] for p in got]
        lost = overflow[0]["data"]
        assert lost["workspace"] == "default" and lost["first_seq"] <= lost["last_seq"]
        written = [p["data"] for p in got if p["type"] == "fs.file.written"]
        # Nothing from inside the cut range is delivered; what came after it is, in order.
        assert not [w for w in written if lost["first_seq"] <= w["seq"] <= lost["last_seq"]]
        after = [w["path"] for w in written if w["seq"] > lost["last_seq"]]
        assert after and after == sorted(after, key=lambda p: int(p[2:])) and after[-1] == "/f99"
        assert len(written) < 100
        # Everything ids-wise is unique and signed; the overflow event names what was lost.
        ids = [d["headers"]["webhook-id"] for d in receiver.deliveries()]
        assert len(ids) == len(set(ids))
        for d in receiver.deliveries():
            webhooks.verify(d["headers"], d["body"].encode(), SECRET)
        subs = json.loads(m.cli("webhook", "list", "default", "--json").stdout)
        assert subs and subs[0]["cursor"] >= lost["last_seq"], subs
    finally:
        m.cleanup()
