"""`[[peer]]`, `[node]` keys and `[lease]` in mount.conf: accepted when right, refused naming the key."""
from __future__ import annotations

import pytest

from agentmount.config import parse
from agentmount.errors import ConfigError
from agentmount.peer import keys

A, B, C = keys.generate(), keys.generate(), keys.generate()


def conf(node_extra: str = "", peers: str | None = None, lease: str = "") -> str:
    if peers is None:
        peers = (f'[[peer]]\nname = "b"\nendpoint = "tcp://127.0.0.1:7002"\npublic_key = "{B[0]}"\n\n'
                 f'[[peer]]\nname = "c"\nendpoint = "tcp://127.0.0.1:7003"\npublic_key = "{C[0]}"\n')
    return (f'[node]\nname = "a"\ndata_dir = "/tmp/x"\nlisten = "tcp://127.0.0.1:7001"\n'
            f'public_key = "{A[0]}"\nsecret_key = "{A[1]}"\n{node_extra}\n{peers}\n{lease}\n'
            '[[store]]\nname = "s"\nkind = "local"\npath = "/tmp/s"\n')


def test_peers_and_lease_parse():
    cfg = parse(conf(lease="[lease]\nduration_s = 2.0\nrenew_s = 0.5\nfailover_timeout_s = 10\n"))
    assert [p.name for p in cfg.peers] == ["b", "c"]
    assert cfg.peers[0].public_key == B[0] and cfg.peers[1].endpoint == "tcp://127.0.0.1:7003"
    assert (cfg.lease.duration_s, cfg.lease.renew_s, cfg.lease.failover_timeout_s) == (2.0, 0.5, 10.0)
    assert cfg.lease.invalidate_timeout_s == 2.0


@pytest.mark.parametrize("text, key", [
    (lambda: conf(peers=f'[[peer]]\nname = "a"\nendpoint = "tcp://h:1"\npublic_key = "{B[0]}"\n'), "peer[0].name"),
    (lambda: conf(peers=f'[[peer]]\nname = "b"\nendpoint = "http://h:1"\npublic_key = "{B[0]}"\n'),
     "peer[0].endpoint"),
    (lambda: conf(peers='[[peer]]\nname = "b"\nendpoint = "tcp://h:1"\npublic_key = "short"\n'),
     "peer[0].public_key"),
    (lambda: conf(peers=f'[[peer]]\nname = "b"\nendpoint = "tcp://h:1"\npublic_key = "{A[0]}"\n'), "peer"),
    (lambda: conf(peers=f'[[peer]]\nname = "b"\nendpoint = "tcp://h:1"\npublic_key = "{B[0]}"\nport = 3\n'),
     "peer[0].port"),
    (lambda: conf(peers=f'[[peer]]\nname = "b"\nendpoint = "tcp://h:1"\npublic_key = "{B[0]}"\n'
                        f'[[peer]]\nname = "b"\nendpoint = "tcp://h:2"\npublic_key = "{C[0]}"\n'), "peer[1].name"),
    (lambda: conf().replace(f'public_key = "{A[0]}"', f'public_key = "{B[0]}"', 1), "node.public_key"),
    (lambda: conf().replace('listen = "tcp://127.0.0.1:7001"\n', ""), "node.listen"),
    (lambda: conf(lease="[lease]\nduration_s = 2.0\nrenew_s = 1.5\n"), "lease.renew_s"),
    (lambda: conf(lease="[lease]\nttl = 2\n"), "lease.ttl"),
])
def test_bad_peer_config_names_the_key(text, key):
    with pytest.raises(ConfigError) as e:
        parse(text())
    assert str(e.value).startswith(key), str(e.value)


def test_single_peer_needs_no_keys():
    cfg = parse('[node]\ndata_dir = "/tmp/x"\n[[store]]\nname = "s"\nkind = "local"\npath = "/tmp/s"\n')
    assert cfg.peers == [] and cfg.node.listen is None
