"""Replication through the FUSE mount over three real SeaweedFS S3 servers ("zones"):
a store killed mid-workload, copies deleted or corrupted behind our back, the write quorum out of
reach, a peer restarted with repairs pending, a slow store behind a 200 ms proxy, bad store config."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, Mount, s3_conf, wait_for
from tests.seaweed import free_port

pytestmark = pytest.mark.slow


def _files(rnd: random.Random, n: int) -> dict[str, bytes]:
    out = {}
    for i in range(n):
        size = rnd.choice([100, 5000, 300_000, 1_500_000, 5_000_000])
        out[f"f{i:03d}"] = rnd.randbytes(size)
    return out


def _write_files(m: Mount, seed: int, n: int) -> dict[str, bytes]:
    """Write `n` files of assorted sizes into the mount's workspace; returns name -> bytes."""
    files = _files(random.Random(seed), n)
    for name, data in files.items():
        (m.ws / name).write_bytes(data)
    return files


def _status(m: Mount) -> dict:
    r = m.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _queues(m: Mount) -> list[int]:
    return [s["repair_queue"] for s in _status(m)["stores"]]


def _check_all(m: Mount, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        got = (m.ws / name).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name


def _objects(srv, prefix: str = "ws/default/blocks/") -> list[str]:
    c = srv.client()
    keys = []
    for page in c.get_paginator("list_objects_v2").paginate(Bucket="agentmount", Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def test_a_store_killed_mid_workload_is_invisible_then_repaired(tmp_path, seaweed_cluster):
    servers = seaweed_cluster(3)
    m = Mount(tmp_path, conf_text=s3_conf(tmp_path, servers, fs={"store_timeout_s": 20}))
    try:
        m.mount()
        files = _files(random.Random(1), 30)
        for i, (name, data) in enumerate(files.items()):
            if i == 10:
                servers[1].kill()            # a zone dies mid-workload
            (m.ws / name).write_bytes(data)  # every write and close succeeds regardless
        with open(m.ws / "f000", "rb") as f:
            assert f.read() == files["f000"]
        assert _status(m)["stores"][1]["healthy"] is False
        assert _queues(m)[1] > 0
        servers[1].restart()
        wait_for(lambda: _queues(m) == [0, 0, 0], timeout=90, what="repair queues to drain")
        m.umount()
        r = m.cli("scrub", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "3 store(s), 0 bad copies" in r.stdout, r.stdout
        m.mount()
        _check_all(m, files)
    finally:
        m.cleanup()


def test_deleted_and_corrupted_copies_are_read_around_and_scrubbed(tmp_path, seaweed_cluster):
    servers = seaweed_cluster(3)
    m = Mount(tmp_path, conf_text=s3_conf(tmp_path, servers, fs={"store_timeout_s": 20}))
    try:
        m.mount()
        files = _write_files(m, 2, 12)
        m.umount()
        blocks = _objects(servers[0])
        assert len(blocks) >= 8
        rnd = random.Random(3)
        rnd.shuffle(blocks)
        c = servers[0].client()
        half = len(blocks) // 2
        for key in blocks[:half]:
            c.delete_object(Bucket="agentmount", Key=key)
        for key in blocks[half:]:
            body = bytearray(c.get_object(Bucket="agentmount", Key=key)["Body"].read())
            body[len(body) // 2] ^= 0xFF
            c.put_object(Bucket="agentmount", Key=key, Body=bytes(body))
        r = m.cli("scrub", timeout=300)
        assert r.returncode == 1, r.stdout
        assert f"store z0: {half} missing, {len(blocks) - half} corrupt" in r.stdout, r.stdout
        # Cold mount (no cached copies): reads must still return the right bytes.
        shutil.rmtree(tmp_path / "cache")
        m.mount()
        _check_all(m, files)
        m.umount()
        r = m.cli("scrub", "--repair", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        r = m.cli("scrub", timeout=300)
        assert r.returncode == 0 and "0 bad copies" in r.stdout, r.stdout
    finally:
        m.cleanup()


def test_quorum_out_of_reach_gives_eio_in_time_and_reads_survive(tmp_path, seaweed_cluster):
    servers = seaweed_cluster(3)
    timeout = 6
    m = Mount(tmp_path, conf_text=s3_conf(tmp_path, servers, write_quorum=2, fs={"store_timeout_s": timeout}))
    try:
        m.mount()
        files = _write_files(m, 4, 8)
        m.umount()
        shutil.rmtree(tmp_path / "cache")   # cold: reads below must reach a store
        m.mount()
        servers[0].kill()     # one zone refuses connections
        servers[1].pause()    # the other hangs
        t = time.monotonic()
        with pytest.raises(OSError) as e:
            with open(m.ws / "new", "wb") as f:
                f.write(os.urandom(3 << 20))
        took = time.monotonic() - t
        assert e.value.errno == 5, e.value   # EIO
        assert took < timeout * 2 + 5, took
        print(f"\nwrite with quorum out of reach failed with EIO after {took:.1f} s (store timeout {timeout} s)")
        _check_all(m, files)   # existing data is served by the survivor
        servers[1].resume()
        servers[0].restart()
        wait_for(lambda: all(s["healthy"] for s in _status(m)["stores"]), timeout=60, what="stores back")
        (m.ws / "after").write_bytes(b"back")
        assert (m.ws / "after").read_bytes() == b"back"
    finally:
        for s in servers:
            if s.paused:
                s.resume()
        m.cleanup()


def test_peer_restarted_with_pending_repairs_resumes_and_drains(tmp_path, seaweed_cluster):
    servers = seaweed_cluster(3)
    m = Mount(tmp_path, conf_text=s3_conf(tmp_path, servers, fs={"store_timeout_s": 20}))
    try:
        m.mount()
        servers[2].kill()
        files = _write_files(m, 5, 10)
        pending = _queues(m)[2]
        assert pending > 0
        m.kill()   # the peer dies with its repair queue not empty
        queue = m.data / "repair" / "z2.queue"
        assert queue.exists() and queue.stat().st_size > 0
        servers[2].restart()
        m.mount()
        wait_for(lambda: _queues(m) == [0, 0, 0], timeout=90, what="the resumed repair queue to drain")
        _check_all(m, files)
        m.umount()
        r = m.cli("scrub", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        m.cleanup()


def test_hedged_reads_hide_a_slow_store(tmp_path, seaweed_cluster):
    servers = seaweed_cluster(3)
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "tests.latency_proxy", str(port), str(servers[0].s3_port),
                              "0.2"], cwd=str(REPO), stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout.readline().strip() == "ready"
        endpoints = [f"http://127.0.0.1:{port}", servers[1].endpoint, servers[2].endpoint]
        lat = {}
        for label, eps in (("healthy", None), ("slow z0", endpoints)):
            root = tmp_path / label.replace(" ", "_")
            root.mkdir()
            m = Mount(root, conf_text=s3_conf(root, servers, endpoints=eps,
                                              fs={"store_timeout_s": 20, "block_size_kb": 64,
                                                  "readahead_blocks": 0}))
            try:
                m.mount()
                data = os.urandom(8 << 20)
                t0 = time.monotonic()
                (m.ws / "big").write_bytes(data)
                m.umount()
                shutil.rmtree(root / "cache")   # really cold: no disk-cache copy of the written blocks
                m.mount()
                rnd = random.Random(6)
                times = []
                fd = os.open(m.ws / "big", os.O_RDONLY)
                try:
                    print(f"\n{label}: write+remount {time.monotonic() - t0:.1f} s")
                    for blk in rnd.sample(range(128), 120):   # 120 distinct 64 KiB blocks, each fetched cold
                        t = time.monotonic()
                        got = os.pread(fd, 4096, blk * 65536)
                        times.append(time.monotonic() - t)
                        assert got == data[blk * 65536:blk * 65536 + 4096]
                finally:
                    os.close(fd)
                times.sort()
                lat[label] = (times[len(times) // 2], times[int(len(times) * 0.99)])
            finally:
                m.cleanup()
        print("\ncold 4 KiB reads: " + ", ".join(f"{k}: p50 {v[0] * 1e3:.1f} ms, p99 {v[1] * 1e3:.1f} ms"
                                                 for k, v in lat.items()))
        # A 200 ms replica must not show in the tail: hedging answers from the healthy ones.
        assert lat["slow z0"][1] < 0.19, lat
        assert lat["slow z0"][1] < max(2.5 * lat["healthy"][1], lat["healthy"][1] + 0.1), lat
    finally:
        proxy.kill()
        proxy.wait()


@pytest.mark.parametrize("problem", ["unreachable", "credentials", "bucket"])
def test_bad_store_at_mount_is_a_clear_error(tmp_path, seaweed_cluster, problem):
    servers = seaweed_cluster(1)
    srv = servers[0]
    conf = s3_conf(tmp_path, servers, fs={"store_timeout_s": 5})
    if problem == "unreachable":
        conf = conf.replace(srv.endpoint, f"http://127.0.0.1:{free_port()}")
    elif problem == "credentials":
        conf = conf.replace(f'secret_key = "{srv.secret_key}"', 'secret_key = "wrong"')
    else:
        conf = conf.replace('bucket = "agentmount"', 'bucket = "no-such-bucket"')
    m = Mount(tmp_path, conf_text=conf)
    t = time.monotonic()
    r = m.cli("mount", str(m.mp), timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert time.monotonic() - t < 30
    msg = r.stderr.strip()
    assert "z0" in msg and len(msg.splitlines()) == 1, msg
    assert {"unreachable": "unreachable", "credentials": "credentials", "bucket": "bucket"}[problem] in msg, msg
    assert not os.path.ismount(m.mp)
