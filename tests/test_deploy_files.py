"""docker/: the peer configs load, agree with each other, and compose.yaml wires them up.

compose.yaml is read with a small YAML-subset reader (block mappings and sequences, flow
sequences, quoted and plain scalars, `|` blocks): enough for that file, no dependency. It
refuses what it does not understand (anchors, flow mappings, ...), so the file stays plain.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from agentmount import config

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
PEER_CONFS = sorted((DOCKER / "conf").glob("*.conf"))


# -- a YAML subset ----------------------------------------------------------------------------
def _scalar(text: str):
    text = text.strip()
    if text[:1] in ("'", '"'):
        q = text[0]
        assert text.endswith(q) and len(text) >= 2, f"unterminated string: {text}"
        body = text[1:-1]
        return body.replace("''", "'") if q == "'" else json.loads(text)
    if text.startswith("["):
        assert text.endswith("]"), f"multi-line flow sequences are not supported: {text}"
        inner = text[1:-1].strip()
        return [_scalar(x) for x in _split_flow(inner)] if inner else []
    if text[:1] in ("{", "&", "*", "!", ">"):
        raise ValueError(f"YAML feature not supported by this reader: {text}")
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return {"true": True, "false": False, "null": None, "~": None}.get(text, text)


def _split_flow(inner: str) -> list[str]:
    out, cur, quote = [], "", None
    for ch in inner:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ",":
            out.append(cur)
            cur = ""
            continue
        cur += ch
    return out + [cur]


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def load_yaml(text: str):
    lines = []          # (indent, content) of significant lines; `|` blocks folded in below
    raw = text.splitlines()
    i = 0
    while i < len(raw):
        line = _strip_comment(raw[i])
        i += 1
        if not line.strip():
            continue
        assert "\t" not in line[: len(line) - len(line.lstrip())], "tabs in indentation"
        indent = len(line) - len(line.lstrip())
        content = line.strip()
        if content.endswith(": |") or content == "- |" or content.endswith(" |"):
            block = []
            while i < len(raw) and (not raw[i].strip() or len(raw[i]) - len(raw[i].lstrip()) > indent):
                block.append(raw[i])
                i += 1
            strip = min((len(b) - len(b.lstrip()) for b in block if b.strip()), default=0)
            value = "\n".join(b[strip:] for b in block).rstrip("\n") + "\n"
            lines.append((indent, content[:-1].rstrip(), value))
        else:
            lines.append((indent, content, None))
    value, pos = _node(lines, 0, lines[0][0] if lines else 0)
    assert pos == len(lines), f"could not read line: {lines[pos][1]}"
    return value


def _node(lines, pos, indent):
    if lines[pos][1].startswith("- ") or lines[pos][1] == "-":
        return _seq(lines, pos, indent)
    return _map(lines, pos, indent)


def _map(lines, pos, indent):
    out = {}
    while pos < len(lines) and lines[pos][0] == indent and not lines[pos][1].startswith("- "):
        _, content, block = lines[pos]
        key, sep, rest = content.partition(":")
        assert sep and (rest == "" or rest.startswith(" ")), f"not a mapping entry: {content}"
        key = _scalar(key)
        assert key not in out, f"duplicate key {key}"
        pos += 1
        if block is not None:
            out[key] = block
        elif rest.strip():
            out[key] = _scalar(rest)
        elif pos < len(lines) and (lines[pos][0] > indent or
                                   (lines[pos][0] == indent and lines[pos][1].startswith("- "))):
            out[key], pos = _node(lines, pos, lines[pos][0])
        else:
            out[key] = None
    return out, pos


def _seq(lines, pos, indent):
    out = []
    while pos < len(lines) and lines[pos][0] == indent and lines[pos][1].startswith("-"):
        _, content, block = lines[pos]
        item = content[1:].strip()
        if block is not None:
            out.append(block)
            pos += 1
        elif re.match(r"^[^'\"\[][^:]*: |^[^'\"\[][^:]*:$", item):
            # "- key: value" starts a mapping whose keys are indented past the dash
            sub = [(indent + 2, item, None)] + list(lines[pos + 1:])
            value, used = _map(sub, 0, indent + 2)
            out.append(value)
            pos += used
        else:
            out.append(_scalar(item))
            pos += 1
    return out, pos


def test_yaml_reader_on_the_forms_compose_yaml_uses():
    doc = load_yaml(
        "a: 1\n"
        "b:\n  c: 'x y'  # note\n  d: [\"/dev/fuse\", SYS_ADMIN]\n"
        "e:\n  - one\n  - k: v\n    m: n\n"
        "f:\n- two\n"
        "g: |\n  line 1\n    line 2\n"
        "h: \"a#b\"\n")
    assert doc == {"a": 1, "b": {"c": "x y", "d": ["/dev/fuse", "SYS_ADMIN"]},
                   "e": ["one", {"k": "v", "m": "n"}], "f": ["two"], "g": "line 1\n  line 2\n",
                   "h": "a#b"}
    with pytest.raises(ValueError):
        load_yaml("a: &anchor 1\n")


# -- the files --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def confs() -> dict[str, config.Config]:
    return {p.name: config.load(str(p)) for p in PEER_CONFS}


def _binds(service: dict) -> list[dict]:
    """A service's volumes as {source, target, read_only, propagation} (short and long syntax)."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            opts = parts[2].split(",") if len(parts) > 2 else []
            prop = next((o for o in opts if o in ("rshared", "shared", "rslave", "slave", "rprivate", "private")),
                        None)
            out.append({"source": parts[0], "target": parts[1], "read_only": "ro" in opts, "propagation": prop})
        else:
            out.append({"source": v["source"], "target": v["target"], "read_only": v.get("read_only", False),
                        "propagation": v.get("bind", {}).get("propagation")})
    return out


def test_image_default_config_loads():
    cfg = config.load(str(DOCKER / "mount.conf"))
    assert cfg.workspaces == ["default"] and not cfg.peers
    assert [s.kind for s in cfg.stores] == ["local"]
    assert cfg.node.data_dir.startswith("/var/lib/agentmount/") and cfg.stores[0].path.startswith("/var/lib/agentmount/")


def test_peer_configs_load_and_agree(confs):
    assert [p.name for p in PEER_CONFS] == ["peer-a.conf", "peer-b.conf", "peer-c.conf"]
    names = {c.node.name for c in confs.values()}
    keys = {c.node.name: c.node.public_key for c in confs.values()}
    assert len(set(keys.values())) == len(keys), "every peer needs its own key pair"
    for fname, cfg in confs.items():
        assert fname == f"{cfg.node.name}.conf"
        port = cfg.node.listen.rsplit(":", 1)[1]
        # every other peer is listed, with the key it really has, at its listen port
        assert {p.name for p in cfg.peers} == names - {cfg.node.name}
        for p in cfg.peers:
            assert p.public_key == keys[p.name], f"{fname}: wrong public_key for {p.name}"
            assert p.endpoint == f"tcp://{p.name}:{port}"
        # three S3 zones, write quorum 2, the same stores everywhere
        assert [s.kind for s in cfg.stores] == ["s3"] * 3 and cfg.write_quorum == 2
        assert [(s.name, s.endpoint, s.bucket) for s in cfg.stores] == \
               [(s.name, s.endpoint, s.bucket) for s in confs["peer-a.conf"].stores]
        assert cfg.workspaces == ["default"]


def test_compose_runs_each_peer_with_its_config(compose, confs):
    services = compose["services"]
    for fname, cfg in confs.items():
        svc = services[cfg.node.name]
        binds = _binds(svc)
        conf_bind = [b for b in binds if b["source"] == f"./conf/{fname}"]
        assert conf_bind and conf_bind[0]["target"] == "/etc/agentmount/mount.conf", \
            f"compose.yaml does not mount conf/{fname} into {cfg.node.name}"
        assert any(b["target"] == cfg.node.data_dir and not b["source"].startswith((".", "/")) for b in binds), \
            f"{cfg.node.name}: its data_dir {cfg.node.data_dir} is not a named volume"
        assert svc["devices"] == ["/dev/fuse"] and svc["cap_add"] == ["SYS_ADMIN"]
        assert "apparmor:unconfined" in svc["security_opt"] and "privileged" not in svc
        assert svc.get("hostname", cfg.node.name) == cfg.node.name
        assert svc["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        for p in cfg.peers:                       # peers and zones reachable by service name
            assert urlsplit(p.endpoint.replace("tcp://", "http://")).hostname in services
        for s in cfg.stores:
            zone = services[urlsplit(s.endpoint).hostname]
            assert "seaweedfs" in zone["image"] and "-s3" in zone["command"].split()
            assert f"-s3.port={urlsplit(s.endpoint).port}" in zone["command"].split()
    # every file compose.yaml binds from the repository exists
    for svc in services.values():
        for b in _binds(svc):
            if b["source"].startswith("./"):
                assert (DOCKER / b["source"]).exists(), b["source"]
    assert (REPO / "docker" / "Dockerfile").exists()


def test_compose_credentials_match_the_s3_zones(compose):
    identities = json.loads((DOCKER / "conf" / "s3.json").read_text())["identities"]
    creds = {(c["accessKey"], c["secretKey"]) for i in identities for c in i["credentials"]}
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        if "AWS_ACCESS_KEY_ID" in env:
            assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) in creds, name


def test_compose_shares_the_host_mount_with_the_agent(compose):
    services = compose["services"]
    peer, agent = services["peer-a"], services["agent"]
    shared = [b for b in _binds(peer) if b["propagation"] == "rshared"]
    assert len(shared) == 1
    mp = peer["entrypoint"][-1].split("agentmount mount ", 1)[1].split()[0]
    # the mountpoint is below the rshared bind, not the bind target itself
    assert mp.startswith(shared[0]["target"] + "/")
    assert f" {mp} fuse.agentmount " in " ".join(peer["healthcheck"]["test"])
    seen = [b for b in _binds(agent) if b["source"] == shared[0]["source"]]
    assert seen and seen[0]["propagation"] in ("rslave", "rshared")
    assert agent["environment"]["WORKSPACE"].startswith(seen[0]["target"] + mp[len(shared[0]["target"]):] + "/")
    assert "devices" not in agent and "cap_add" not in agent
    assert agent["depends_on"]["peer-a"]["condition"] == "service_healthy"


def test_dockerfile_contract():
    text = (DOCKER / "Dockerfile").read_text()
    instructions = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert instructions[0] == "ARG BASE=debian:bookworm"
    assert [ln for ln in instructions if ln.startswith("FROM ")][-1] == "FROM ${BASE}"
    assert 'ENTRYPOINT ["agentmount", "mount", "/agents", "-f"]' in instructions
    assert "STOPSIGNAL SIGTERM" in instructions
    assert "AGENTMOUNT_CONFIG=/etc/agentmount/mount.conf" in text
    assert "USER agentmount" in instructions
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"COPY {path}: missing"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "mnt", "build"} <= set(ignored)
