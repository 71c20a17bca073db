"""Three peers over replicated S3 stores (SeaweedFS on 127.0.0.1): the namespace is shared and
survives the leader's SIGKILL with the journal and blocks in the replicated stores; every peer
reads file data straight from the stores (through its own block caches)."""
from __future__ import annotations

import os
import random

import pytest

from tests.peers import MARGIN_S, PeerCluster, clusters, report, sha, verify_files, write_file


@pytest.fixture
def peer_cluster(tmp_path):
    yield from clusters(tmp_path)


def s3_stores(servers) -> str:
    lines = []
    for i, srv in enumerate(servers):
        lines += ["[[store]]", f'name = "z{i}"', 'kind = "s3"', f'endpoint = "{srv.endpoint}"',
                  'bucket = "agentmount"', f'access_key = "{srv.access_key}"', f'secret_key = "{srv.secret_key}"', ""]
    lines += ["[replication]", "write_quorum = 2", "health_interval_s = 0.2", ""]
    return "\n".join(lines)


@pytest.mark.slow
def test_peers_over_replicated_s3_close_to_open_and_failover(peer_cluster, seaweed_cluster):
    servers = seaweed_cluster(3)
    c: PeerCluster = peer_cluster(stores=s3_stores(servers))
    peers = c.mount_all()
    leader, epoch = c.wait_leader(timeout=60)
    rng = random.Random(7)
    (peers[0].ws / "s3").mkdir()
    files: dict[str, bytes] = {}
    for r in range(60):
        w, rd = rng.sample(peers, 2)
        name = f"f{r % 12}"
        data = rng.randbytes(rng.choice([100, 5000, 300_000]))
        write_file(w.ws / "s3" / name, data)
        files[name] = data
        with open(rd.ws / "s3" / name, "rb") as f:
            assert f.read() == data, (r, name, w.name, rd.name)
    t_kill = c.kill(leader)
    survivors = [p for p in c.real if p.name != leader]
    new, new_epoch = c.wait_leader(not_name=leader, min_epoch=epoch, timeout=c[survivors[0].name].failover_s
                                   + MARGIN_S)
    data = os.urandom(200_000)
    write_file(survivors[0].ws / "s3" / "after", data)
    files["after"] = data
    expected = {n: (sha(d), len(d)) for n, d in files.items()}
    for p in survivors:
        assert not verify_files(p.ws / "s3", expected), p.name
    report(f"peers over 3 SeaweedFS stores: leader {leader} killed, {new} leads at epoch {new_epoch}; "
           f"every file intact on {', '.join(p.name for p in survivors)}")
    c.umount_all()
