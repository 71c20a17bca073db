"""Loading and validating `mount.conf` (TOML) into typed settings.

Every key is declared here with its type and check; anything unknown or
invalid raises ConfigError naming the key (the CLI exits 2 on it). The
embedded default (no `-c`) lives under $AGENTMOUNT_HOME.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from agentmount.errors import ConfigError

WORKSPACE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PEER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENDPOINT_RE = re.compile(r"^(tcp://(\*|[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):(\d{1,5}|\*)|ipc://.+)$")


@dataclass
class NodeConfig:
    name: str = "local"
    data_dir: str = ""
    listen: str | None = None
    secret_key: str | None = None
    public_key: str | None = None


@dataclass
class PeerConfig:
    name: str
    endpoint: str
    public_key: str


@dataclass
class LeaseSettings:
    duration_s: float = 5.0
    renew_s: float = 1.5
    failover_timeout_s: float = 30.0
    invalidate_timeout_s: float = 2.0
    lock_ttl_s: float = 15.0


@dataclass
class StoreConfig:
    name: str
    kind: str
    path: str | None = None
    fsync: bool = True
    endpoint: str | None = None
    bucket: str | None = None
    prefix: str = ""
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = None
    path_style: bool = True


@dataclass
class CacheConfig:
    dir: str = ""
    size_mb: int = 10240
    memory_mb: int = 512


@dataclass
class FsConfig:
    block_size_kb: int = 4096
    chunk_size_mb: int = 64
    zstd_level: int = 1
    commit_window_ms: int = 20
    write_buffer_mb: int = 512
    readahead_blocks: int = 8
    upload_concurrency: int = 8
    download_concurrency: int = 8
    compact_slices: int = 16
    snapshot_records: int = 20000
    gc_grace_s: float = 30.0
    attr_timeout_s: float = 1.0
    entry_timeout_s: float = 1.0
    store_timeout_s: float = 60.0


@dataclass
class WebhookConfig:
    workspace: str
    url: str
    secret: str
    events: list[str] | None = None
    path: str | None = None
    allow_private: bool = False


@dataclass
class EventsConfig:
    retry_schedule_s: list[float] = field(default_factory=lambda: [0, 5, 30, 120, 600, 1800, 7200])
    retry_every_s: float = 21600.0
    retry_budget_s: float = 3 * 86400.0
    timeout_s: float = 15.0
    max_in_flight: int = 1
    max_backlog: int = 1000000
    allow_private: bool = False


@dataclass
class ApiConfig:
    """`[api]`: the HTTP control API (off unless `listen` is set)."""

    listen: str | None = None
    token: str | None = None
    token_file: str | None = None   # when `token` is not given: <data_dir>/api.token by default

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when the API is off."""
        return split_host_port(self.listen) if self.listen else None


@dataclass
class LogConfig:
    level: str = "warning"
    file: str | None = None


@dataclass
class Config:
    node: NodeConfig
    stores: list[StoreConfig]
    cache: CacheConfig
    fs: FsConfig
    log: LogConfig
    workspaces: list[str] = field(default_factory=list)
    peers: list[PeerConfig] = field(default_factory=list)
    lease: LeaseSettings = field(default_factory=LeaseSettings)
    webhooks: list[WebhookConfig] = field(default_factory=list)
    events: EventsConfig = field(default_factory=EventsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    write_quorum: int = 1
    hedge_ms: int = 50
    health_interval_s: float = 1.0
    path: str | None = None

    @property
    def block_size(self) -> int:
        return self.fs.block_size_kb * 1024

    @property
    def chunk_size(self) -> int:
        return self.fs.chunk_size_mb * 1024 * 1024


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _nonneg_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _str(v: Any) -> bool:
    return isinstance(v, str) and v != ""


_NODE = {"name": _str, "data_dir": _str, "listen": _str, "secret_key": _str, "public_key": _str}
_STORE = {"name": _str, "kind": lambda v: v in ("local", "s3"), "path": _str, "fsync": lambda v: isinstance(v, bool),
          "endpoint": _str, "bucket": _str, "prefix": lambda v: isinstance(v, str), "region": _str,
          "access_key": _str, "secret_key": _str, "path_style": lambda v: isinstance(v, bool)}
_CACHE = {"dir": _str, "size_mb": _positive_int, "memory_mb": _positive_int}
_FS = {
    "block_size_kb": lambda v: _positive_int(v) and 64 <= v <= 16384 and (v & (v - 1)) == 0,
    "chunk_size_mb": lambda v: _positive_int(v) and 1 <= v <= 1024 and (v & (v - 1)) == 0,
    "zstd_level": lambda v: isinstance(v, int) and not isinstance(v, bool) and -7 <= v <= 22,
    "commit_window_ms": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10000,
    "write_buffer_mb": _positive_int,
    "readahead_blocks": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 64,
    "upload_concurrency": _positive_int,
    "download_concurrency": _positive_int,
    "compact_slices": lambda v: _positive_int(v) and v >= 2,
    "snapshot_records": _positive_int,
    "gc_grace_s": _nonneg_num,
    "attr_timeout_s": _nonneg_num,
    "entry_timeout_s": _nonneg_num,
    "store_timeout_s": lambda v: _nonneg_num(v) and v > 0,
}
_LOG = {"level": lambda v: v in ("debug", "info", "warning", "error"), "file": _str}
_REPL = {"write_quorum": _positive_int, "hedge_ms": lambda v: _positive_int(v) and v <= 60000,
         "health_interval_s": lambda v: _nonneg_num(v) and 0.05 <= v <= 3600}
_WS = {"name": lambda v: isinstance(v, str) and bool(WORKSPACE_NAME_RE.match(v))}
_PEER = {"name": lambda v: isinstance(v, str) and bool(PEER_NAME_RE.match(v)), "endpoint": _str,
         "public_key": _str}
_LEASE = {"duration_s": lambda v: _nonneg_num(v) and 0.2 <= v <= 600,
          "renew_s": lambda v: _nonneg_num(v) and v >= 0.05,
          "failover_timeout_s": lambda v: _nonneg_num(v) and 0.5 <= v <= 3600,
          "invalidate_timeout_s": lambda v: _nonneg_num(v) and 0.05 <= v <= 600,
          "lock_ttl_s": lambda v: _nonneg_num(v) and 2.0 <= v <= 3600}
_WEBHOOK = {"workspace": lambda v: isinstance(v, str) and bool(WORKSPACE_NAME_RE.match(v)), "url": _str,
            "secret": _str, "events": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "path": _str, "allow_private": lambda v: isinstance(v, bool)}
_EVENTS = {"retry_schedule_s": lambda v: isinstance(v, list) and 0 < len(v) <= 64 and all(_nonneg_num(x) for x in v),
           "retry_every_s": lambda v: _nonneg_num(v) and v > 0,
           "retry_budget_s": lambda v: _nonneg_num(v) and v > 0,
           "timeout_s": lambda v: _nonneg_num(v) and 0.1 <= v <= 600,
           "max_in_flight": lambda v: _positive_int(v) and v <= 256,
           "max_backlog": lambda v: _positive_int(v) and v >= 100,
           "allow_private": lambda v: isinstance(v, bool)}
_API = {"listen": lambda v: isinstance(v, str),
        "token": lambda v: isinstance(v, str) and len(v) >= 16 and not any(c.isspace() for c in v),
        "token_file": _str}
_TOP = {"node", "peer", "lease", "store", "replication", "cache", "fs", "log", "workspace", "webhook", "events",
        "api"}
_HINT = {
    "block_size_kb": "a power of two between 64 and 16384",
    "chunk_size_mb": "a power of two between 1 and 1024",
    "kind": '"local" or "s3"',
    "level": '"debug", "info", "warning" or "error"',
    "name": "letters, digits, '.', '_' or '-' (at most 64, not starting with '.', '_' or '-')",
    "token": "at least 16 characters, no whitespace",
}


def split_host_port(value: str) -> tuple[str, int]:
    """`HOST:PORT` (`[v6]:PORT` for IPv6) as (host, port); ValueError when it is not one."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})", value)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ValueError(f"not HOST:PORT: {value!r}")
    return m.group(1).strip("[]"), int(m.group(2))


def _check_table(where: str, table: Any, spec: dict, required: tuple[str, ...] = ()) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    for k, v in table.items():
        if k not in spec:
            raise ConfigError(f"{where}.{k}: unknown key")
        if not spec[k](v):
            hint = _HINT.get(k, "")
            raise ConfigError(f"{where}.{k}: invalid value {v!r}" + (f" (expected {hint})" if hint else ""))
    for k in required:
        if k not in table:
            raise ConfigError(f"{where}.{k}: required key missing")
    return table


def default_home() -> str:
    return os.environ.get("AGENTMOUNT_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share", "agentmount")


def embedded_default() -> Config:
    """The configuration used without -c: one local store and workspace `default` under $AGENTMOUNT_HOME."""
    home = default_home()
    return Config(
        node=NodeConfig(name="local", data_dir=os.path.join(home, "data")),
        stores=[StoreConfig(name="local", kind="local", path=os.path.join(home, "store"))],
        cache=CacheConfig(dir=os.path.join(home, "cache")),
        fs=FsConfig(),
        log=LogConfig(),
        workspaces=["default"],
        path=None,
    )


def parse(text: str, path: str | None = None) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path or 'config'}: not valid TOML: {e}") from None
    for k in raw:
        if k not in _TOP:
            raise ConfigError(f"{k}: unknown key")
    node_t = _check_table("node", raw.get("node", {}), _NODE, ("data_dir",))
    node = NodeConfig(**node_t)
    node.data_dir = os.path.abspath(os.path.expanduser(node.data_dir))
    peers = _parse_peers(raw.get("peer", []), node)
    lease_t = _check_table("lease", raw.get("lease", {}), _LEASE)
    lease = LeaseSettings(**{k: float(v) for k, v in lease_t.items()})
    if lease.renew_s > lease.duration_s / 2:
        raise ConfigError(f"lease.renew_s: {lease.renew_s:g} must be at most half of lease.duration_s "
                          f"({lease.duration_s:g})")
    stores_raw = raw.get("store")
    if not stores_raw:
        raise ConfigError("store: at least one [[store]] is required")
    if not isinstance(stores_raw, list):
        raise ConfigError("store: must be an array of tables ([[store]])")
    stores = []
    names = set()
    for i, st in enumerate(stores_raw):
        t = _check_table(f"store[{i}]", st, _STORE, ("name", "kind"))
        if t["name"] in names:
            raise ConfigError(f"store[{i}].name: duplicate store name {t['name']!r}")
        names.add(t["name"])
        if t["kind"] == "s3":
            if "bucket" not in t:
                raise ConfigError(f"store[{i}].bucket: required for kind \"s3\"")
            extra = set(t) & {"path", "fsync"}
            if extra:
                raise ConfigError(f"store[{i}].{sorted(extra)[0]}: only valid for kind \"local\"")
            if ("access_key" in t) != ("secret_key" in t):
                raise ConfigError(f"store[{i}].{'secret_key' if 'access_key' in t else 'access_key'}: "
                                  "access_key and secret_key go together")
            prefix = t.get("prefix", "")
            stores.append(StoreConfig(name=t["name"], kind="s3", endpoint=t.get("endpoint"), bucket=t["bucket"],
                                      prefix=prefix, region=t.get("region", "us-east-1"),
                                      access_key=t.get("access_key"), secret_key=t.get("secret_key"),
                                      path_style=t.get("path_style", True)))
            continue
        if "path" not in t:
            raise ConfigError(f"store[{i}].path: required for kind \"local\"")
        extra = set(t) - {"name", "kind", "path", "fsync"}
        if extra:
            raise ConfigError(f"store[{i}].{sorted(extra)[0]}: only valid for kind \"s3\"")
        stores.append(StoreConfig(name=t["name"], kind=t["kind"], path=os.path.abspath(os.path.expanduser(t["path"])),
                                  fsync=t.get("fsync", True)))
    repl = _check_table("replication", raw.get("replication", {}), _REPL)
    wq = repl.get("write_quorum", len(stores) // 2 + 1)
    if wq > len(stores):
        raise ConfigError(f"replication.write_quorum: {wq} is more than the {len(stores)} configured store(s)")
    cache_t = _check_table("cache", raw.get("cache", {}), _CACHE)
    cache = CacheConfig(**cache_t)
    cache.dir = os.path.abspath(os.path.expanduser(cache.dir)) if cache.dir else os.path.join(node.data_dir, "cache")
    fs = FsConfig(**_check_table("fs", raw.get("fs", {}), _FS))
    if fs.block_size_kb * 1024 > fs.chunk_size_mb * 1024 * 1024:
        raise ConfigError("fs.block_size_kb: larger than fs.chunk_size_mb")
    log = LogConfig(**_check_table("log", raw.get("log", {}), _LOG))
    wss_raw = raw.get("workspace", [])
    if not isinstance(wss_raw, list):
        raise ConfigError("workspace: must be an array of tables ([[workspace]])")
    workspaces = []
    for i, w in enumerate(wss_raw):
        t = _check_table(f"workspace[{i}]", w, _WS, ("name",))
        if t["name"] in workspaces:
            raise ConfigError(f"workspace[{i}].name: duplicate workspace {t['name']!r}")
        workspaces.append(t["name"])
    events = EventsConfig(**_check_table("events", raw.get("events", {}), _EVENTS))
    webhooks = _parse_webhooks(raw.get("webhook", []), events)
    api = _parse_api(raw.get("api", {}), node)
    return Config(node=node, stores=stores, cache=cache, fs=fs, log=log, workspaces=workspaces, peers=peers,
                  lease=lease, write_quorum=wq, webhooks=webhooks, events=events, api=api,
                  hedge_ms=repl.get("hedge_ms", 50), health_interval_s=float(repl.get("health_interval_s", 1.0)),
                  path=path)


def _parse_api(raw: Any, node: NodeConfig) -> ApiConfig:
    t = _check_table("api", raw, _API)
    listen = t.get("listen") or None
    if listen is not None:
        try:
            split_host_port(listen)
        except ValueError:
            raise ConfigError(f"api.listen: invalid value {listen!r} (expected HOST:PORT, e.g. \"127.0.0.1:7080\"; "
                              "\"\" turns the API off)") from None
    if "token" in t and "token_file" in t:
        raise ConfigError("api.token_file: give either api.token or api.token_file, not both")
    token_file = None
    if "token" not in t:
        token_file = os.path.abspath(os.path.expanduser(t.get("token_file") or os.path.join(node.data_dir,
                                                                                             "api.token")))
    return ApiConfig(listen=listen, token=t.get("token"), token_file=token_file)


def _parse_webhooks(raw: Any, events: EventsConfig) -> list[WebhookConfig]:
    from agentmount.events.subscriptions import InvalidSubscription, validate
    if not isinstance(raw, list):
        raise ConfigError("webhook: must be an array of tables ([[webhook]])")
    out = []
    for i, w in enumerate(raw):
        t = _check_table(f"webhook[{i}]", w, _WEBHOOK, ("workspace", "url", "secret"))
        allow = t.get("allow_private", events.allow_private)
        try:
            validate(t["workspace"], t["url"], t["secret"], t.get("events"), t.get("path"), allow,
                     where=f"webhook[{i}]")
        except InvalidSubscription as e:
            raise ConfigError(str(e)) from None
        out.append(WebhookConfig(workspace=t["workspace"], url=t["url"], secret=t["secret"], events=t.get("events"),
                                 path=t.get("path"), allow_private=allow))
    return out


def _parse_peers(peers_raw: Any, node: NodeConfig) -> list[PeerConfig]:
    """`[[peer]]` tables, and the `[node]` keys they require (listen, this peer's key pair)."""
    from agentmount.peer.keys import KeyFormatError, load_key, public_from_secret
    if not isinstance(peers_raw, list):
        raise ConfigError("peer: must be an array of tables ([[peer]])")
    peers: list[PeerConfig] = []
    seen: dict[str, str] = {}
    for i, p in enumerate(peers_raw):
        t = _check_table(f"peer[{i}]", p, _PEER, ("name", "endpoint", "public_key"))
        if t["name"] == node.name:
            raise ConfigError(f"peer[{i}].name: {t['name']!r} is this peer's own name ([node] name)")
        if any(q.name == t["name"] for q in peers):
            raise ConfigError(f"peer[{i}].name: duplicate peer name {t['name']!r}")
        if not ENDPOINT_RE.match(t["endpoint"]) or "*" in t["endpoint"]:
            raise ConfigError(f"peer[{i}].endpoint: invalid value {t['endpoint']!r} "
                              "(expected tcp://HOST:PORT or ipc://PATH)")
        try:
            key = load_key(t["public_key"], f"peer[{i}].public_key")
        except KeyFormatError as e:
            raise ConfigError(str(e)) from None
        if key in seen:
            raise ConfigError(f"peer[{i}].public_key: the same key as peer {seen[key]!r}")
        seen[key] = t["name"]
        peers.append(PeerConfig(name=t["name"], endpoint=t["endpoint"], public_key=key))
    if node.listen is not None and not ENDPOINT_RE.match(node.listen):
        raise ConfigError(f"node.listen: invalid value {node.listen!r} (expected tcp://HOST:PORT or ipc://PATH)")
    if not peers:
        return peers
    for k in ("listen", "secret_key", "public_key"):
        if getattr(node, k) is None:
            raise ConfigError(f"node.{k}: required when [[peer]]s are listed")
    try:
        secret = load_key(node.secret_key, "node.secret_key")
        public = load_key(node.public_key, "node.public_key")
        if public_from_secret(secret) != public:
            raise ConfigError("node.public_key: does not belong to node.secret_key")
    except KeyFormatError as e:
        raise ConfigError(str(e)) from None
    if public in seen:
        raise ConfigError(f"peer: peer {seen[public]!r} has this peer's own public key")
    node.secret_key, node.public_key = secret, public
    return peers


def load(path: str | None) -> Config:
    """Load the config at `path`, or $AGENTMOUNT_CONFIG, or the embedded default."""
    path = path or os.environ.get("AGENTMOUNT_CONFIG") or None
    if path is None:
        return embedded_default()
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8") from None
    return parse(text, os.path.abspath(path))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def render_local(*, name: str, data_dir: str, store: str, cache_dir: str, workspaces: tuple[str, ...] = ("default",),
                 cache: dict | None = None, fs: dict | None = None, extra: str = "") -> str:
    """mount.conf text for a single peer over one local store (used by tests and the benchmark)."""
    lines = ["[node]", f"name = {_toml_value(name)}", f"data_dir = {_toml_value(data_dir)}", "",
             "[[store]]", 'name = "local"', 'kind = "local"', f"path = {_toml_value(store)}", "",
             "[cache]", f"dir = {_toml_value(cache_dir)}"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in (cache or {}).items()]
    lines += ["", "[fs]"] + [f"{k} = {_toml_value(v)}" for k, v in (fs or {}).items()]
    for w in workspaces:
        lines += ["", "[[workspace]]", f"name = {_toml_value(w)}"]
    return "\n".join(lines) + "\n" + (extra + "\n" if extra else "")
