"""The HTTP control API (`[api] listen`), end to end: a real mounted peer, a real webhook
receiver process, httpx and raw sockets as clients."""
from __future__ import annotations

import ctypes
import json
import os
import socket
import stat
import time

import h11
import httpx
import pytest
import trio

from agentmount import config, webhooks
from agentmount.api import http as api_http
from agentmount.api.openapi import document
from agentmount.api.routes import ROUTES
from agentmount.errors import ConfigError
from tests.helpers import Mount, wait_for
from tests.peers import free_port
from tests.receiver import Receiver

SECRET = webhooks.generate_secret()


class Peer:
    """The module's mounted peer with its API address and token."""

    def __init__(self, m: Mount, port: int) -> None:
        self.m = m
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.token = (m.data / "api.token").read_text().strip()
        self.client = httpx.Client(base_url=self.base, headers={"authorization": f"Bearer {self.token}"},
                                   timeout=10)

    def raw(self, data: bytes, timeout: float = 10) -> bytes:
        """Send `data` on a new connection; everything the server answers until it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out


@pytest.fixture(scope="module")
def rx(tmp_path_factory):
    r = Receiver(tmp_path_factory.mktemp("rx")).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    port = free_port()
    m = Mount(tmp_path_factory.mktemp("api"), extra=f'[api]\nlisten = "127.0.0.1:{port}"\n')
    try:
        m.mount()
        p = Peer(m, port)
        yield p
        p.client.close()
    finally:
        m.cleanup()


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    return r.json()["error"]


def test_token_file_is_generated_private_and_required(peer):
    tf = peer.m.data / "api.token"
    assert stat.S_IMODE(tf.stat().st_mode) == 0o600
    assert len(peer.token) >= 40
    assert "api_token_created" in (peer.m.data / "agentmount.log").read_text()
    st = peer.m.cli("status")
    assert f"http api {peer.base}/v1 (token in {tf})" in st.stdout, st.stdout
    url = f"{peer.base}/v1/workspaces/default/webhooks"
    r = httpx.get(url)
    assert "missing bearer token" in _error(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    for auth in (f"Bearer {peer.token}x", "Bearer", f"Basic {peer.token}", peer.token):
        r = httpx.get(url, headers={"authorization": auth})
        assert _error(r, 401) == "wrong bearer token", auth
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
    # Unknown routes and the events pull need the token too; the OpenAPI document does not.
    assert httpx.get(f"{peer.base}/v1/nothing").status_code == 401
    assert httpx.get(f"{peer.base}/v1/workspaces/default/events").status_code == 401
    assert httpx.get(f"{peer.base}/v1/openapi.json").status_code == 200
    assert httpx.get(url, headers={"authorization": f"bearer {peer.token}"}).status_code == 200


def test_add_delivers_then_list_get_delete_round_trip_shared_with_the_cli(peer, rx):
    c, m = peer.client, peer.m
    r = c.post("/v1/workspaces/default/webhooks",
               json={"url": rx.url, "events": ["fs.file.written"], "path": "/api/*", "allow_private": True})
    assert r.status_code == 201, r.text
    sub = r.json()
    sid = sub["id"]
    assert sub["secret"].startswith("whsec_") and sub["workspace"] == "default" and sub["source"] == "api"
    assert r.headers["location"] == f"/v1/workspaces/default/webhooks/{sid}"
    os.mkdir(m.ws / "api")
    (m.ws / "api" / "report.txt").write_text("hello")
    (m.ws / "elsewhere.txt").write_text("not wanted")
    got = rx.wait_for(lambda reqs: any(json.loads(q["body"])["data"]["path"] == "/api/report.txt"
                                       for q in reqs), 20, what="the event of /api/report.txt")
    ev = webhooks.verify(got[-1]["headers"], got[-1]["body"].encode(), sub["secret"])
    assert ev["type"] == "fs.file.written" and ev["data"]["size"] == 5
    # Listed and fetched with the secret masked; kept in the stores, where the CLI sees it.
    listed = c.get("/v1/workspaces/default/webhooks").json()["webhooks"]
    mine = next(w for w in listed if w["id"] == sid)
    assert mine["secret"] != sub["secret"] and mine["secret"].endswith("...")
    one = c.get(f"/v1/workspaces/default/webhooks/{sid}")
    assert one.status_code == 200 and one.json()["url"] == rx.url and one.json()["path"] == "/api/*"
    assert sub["secret"] not in one.text and sub["secret"] not in c.get("/v1/workspaces/default/webhooks").text
    assert (m.store / "ws" / "default" / "webhooks" / "subs" / sid).exists()
    cli = json.loads(m.cli("webhook", "list", "default", "--json", check=True).stdout)
    assert sid in {w["id"] for w in cli}
    # test and replay: the CLI verbs.
    t = c.post(f"/v1/workspaces/default/webhooks/{sid}/test")
    assert t.status_code == 200 and t.json()["ok"] is True and t.json()["status"] == 200, t.text
    assert json.loads(rx.requests()[-1]["body"])["type"] == "webhook.test"
    rp = c.post(f"/v1/workspaces/default/webhooks/{sid}/replay")
    assert rp.status_code == 200 and rp.json() == {"delivered": 0, "failed": 0, "errors": []}
    # One added with the CLI shows up in the API.
    added = m.cli("webhook", "add", "default", rx.url, "--secret", SECRET, "--allow-private", check=True)
    cli_sid = added.stdout.split()[1]
    assert cli_sid in {w["id"] for w in c.get("/v1/workspaces/default/webhooks").json()["webhooks"]}
    # Delete: 204, then gone for the API and the CLI; deleting again is a 404.
    for s in (sid, cli_sid):
        d = c.delete(f"/v1/workspaces/default/webhooks/{s}")
        assert d.status_code == 204 and d.content == b""
    assert "no webhook" in _error(c.get(f"/v1/workspaces/default/webhooks/{sid}"), 404)
    assert "no webhook" in _error(c.delete(f"/v1/workspaces/default/webhooks/{sid}"), 404)
    assert c.get("/v1/workspaces/default/webhooks").json() == {"webhooks": []}
    assert json.loads(m.cli("webhook", "list", "default", "--json", check=True).stdout) == []


def _renameat2_exchange(a: str, b: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, a.encode(), -100, b.encode(), 2) != 0:       # AT_FDCWD, RENAME_EXCHANGE
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def test_events_pull_pages_give_what_the_webhook_got(peer, tmp_path):
    c, m = peer.client, peer.m
    os.mkdir(m.mp / "pull")                           # a workspace of its own
    wait_for(lambda: c.get("/v1/workspaces/pull/webhooks").status_code == 200, 10, what="workspace pull")
    rx = Receiver(tmp_path / "rx").start()
    try:
        sub = c.post("/v1/workspaces/pull/webhooks", json={"url": rx.url, "allow_private": True}).json()
        w = m.mp / "pull"
        for i in range(6):
            (w / f"f{i}").write_text(str(i))
        _renameat2_exchange(str(w / "f0"), str(w / "f1"))     # one record, two events
        os.rename(w / "f2", w / "g2")
        os.unlink(w / "f3")
        os.mkdir(w / "d")
        n = 6 * 2 + 2 + 1 + 1 + 1
        rx.wait_for(lambda r: len(r) >= n, 20, what=f"{n} deliveries")
        delivered = {d["headers"]["webhook-id"]: json.loads(d["body"]) for d in rx.deliveries()}
        assert len(delivered) == n
        for limit in (1, 3, 1000):
            after, pages, pulled = 0, 0, []
            while True:
                r = c.get("/v1/workspaces/pull/events", params={"after_seq": after, "limit": limit})
                assert r.status_code == 200, r.text
                page = r.json()
                assert page["gap"] is None
                if not page["events"]:
                    assert page["next_after_seq"] == after
                    break
                seqs = [e["data"]["seq"] for e in page["events"]]
                assert min(seqs) > after and page["next_after_seq"] == max(seqs)
                # A page holds whole records: at most `limit` events unless one record has more.
                assert len(page["events"]) <= limit or len(set(seqs)) == 1
                pulled += page["events"]
                after = page["next_after_seq"]
                pages += 1
            mine = [e for e in pulled if e["data"]["seq"] > sub["start_seq"]]
            assert [e["id"] for e in mine] == sorted(delivered, key=lambda i: [int(x) for x in i.split("_")[2:4]]
                                                     + [int(i.split("_")[4]) if i.count("_") == 4 else 0])
            assert len({e["id"] for e in mine}) == len(mine) == n
            for e in mine:
                assert {k: e[k] for k in ("type", "timestamp", "data")} == delivered[e["id"]]
            assert pages >= (n - 1 if limit == 1 else 1)
        exchange = [e for e in pulled if e["type"] == "fs.entry.moved" and e["id"].count("_") == 4]
        assert len(exchange) == 1
        # The CLI's `events tail` is the same source.
        tail = m.cli("events", "tail", "pull", "--since", str(sub["start_seq"]), "-n", "1000", check=True)
        assert [json.loads(line)["id"] for line in tail.stdout.splitlines()] == [e["id"] for e in mine]
    finally:
        rx.stop()


def test_invalid_requests_get_400_with_the_cli_message(peer, rx):
    c, m = peer.client, peer.m
    url = "/v1/workspaces/default/webhooks"
    for args, body in [
        (["ftp://example.com/x"], {"url": "ftp://example.com/x"}),
        ([rx.url, "--secret", "nope", "--allow-private"], {"url": rx.url, "secret": "nope", "allow_private": True}),
        ([rx.url, "--event", "fs.nothing", "--allow-private"],
         {"url": rx.url, "events": ["fs.nothing"], "allow_private": True}),
        ([rx.url, "--path", "reports/*", "--allow-private"],
         {"url": rx.url, "path": "reports/*", "allow_private": True}),
        (["http://127.0.0.1:9/x"], {"url": "http://127.0.0.1:9/x"}),
    ]:
        cli = m.cli("webhook", "add", "default", *args)
        assert cli.returncode == 2
        msg = _error(c.post(url, json=body), 400)
        assert cli.stderr.strip() == f"agentmount: {msg}", (cli.stderr, msg)
    assert "scheme must be http or https" in _error(c.post(url, json={"url": "ftp://example.com/x"}), 400)
    assert "webhook.secret" in _error(c.post(url, json={"url": "https://example.com/x", "secret": "nope"}), 400)
    assert _error(c.post(url, content=b"{not json"), 400).startswith("invalid JSON")
    assert "JSON object" in _error(c.post(url, content=b"[1]"), 400)
    assert "JSON object" in _error(c.post(url), 400)
    assert "webhook.url: required" in _error(c.post(url, json={}), 400)
    assert "webhook.color: unknown field" in _error(c.post(url, json={"url": rx.url, "color": 1}), 400)
    assert "webhook.allow_private" in _error(c.post(url, json={"url": rx.url, "allow_private": "yes"}), 400)
    assert "webhook.events" in _error(c.post(url, json={"url": rx.url, "events": "fs.file.written"}), 400)
    ev = "/v1/workspaces/default/events"
    for q, word in [("limit=0", "limit"), ("limit=10001", "limit"), ("limit=x", "limit"),
                    ("after_seq=-1", "after_seq"), ("after_seq=1&after_seq=2", "after_seq"), ("after=3", "'after'")]:
        assert word in _error(c.get(f"{ev}?{q}"), 400), q
    assert c.get(f"{ev}?limit=10000").status_code == 200
    assert c.get(url).json() == {"webhooks": []}       # nothing was added


def test_unknown_workspace_webhook_route_and_method(peer):
    c = peer.client
    assert _error(c.get("/v1/workspaces/nope/webhooks"), 404) == "no workspace 'nope'"
    assert _error(c.post("/v1/workspaces/nope/webhooks", json={"url": "https://example.com/x"}), 404) \
        == "no workspace 'nope'"
    assert _error(c.get("/v1/workspaces/nope/events"), 404) == "no workspace 'nope'"
    for sid in ("wh_0123456789abcdef", "WH_0123456789ABCDEF", "wh_%2E%2E", "x"):
        base = f"/v1/workspaces/default/webhooks/{sid}"
        for r in (c.get(base), c.delete(base), c.post(base + "/test"), c.post(base + "/replay")):
            assert "no webhook" in _error(r, 404), (sid, r.request.method, r.request.url)
    assert "no such route" in _error(c.get("/v1/workspaces/default/webhooks/..%2F..%2Fjournal"), 404)
    assert "no such route" in _error(c.get("/v1/workspaces/default"), 404)
    assert "no such route" in _error(c.get("/v2/openapi.json"), 404)
    r = c.put("/v1/workspaces/default/webhooks", json={})
    assert "not allowed" in _error(r, 405) and r.headers["allow"] == "GET, POST"
    r = c.post("/v1/workspaces/default/events")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_limits_413_431_and_garbage(peer):
    c = peer.client
    url = "/v1/workspaces/default/webhooks"
    big = json.dumps({"url": "https://example.com/" + "a" * (1 << 20)}).encode()
    assert "over 1048576 bytes" in _error(c.post(url, content=big), 413)
    chunks = (b"x" * 65536 for _ in range(20))                  # chunked, no length: cut at 1 MiB
    assert _error(c.post(url, content=chunks), 413)
    head = f"POST {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {peer.token}\r\nContent-Length: 5000000\r\n\r\n"
    assert peer.raw(head.encode()).startswith(b"HTTP/1.1 413 ")
    huge = f"GET {url} HTTP/1.1\r\nHost: x\r\nX-Pad: {'p' * 20000}\r\n\r\n"
    assert peer.raw(huge.encode()).startswith(b"HTTP/1.1 431 ")
    out = peer.raw(b"\x00\x01garbage\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b'"error"' in out
    assert c.get(url).status_code == 200


def test_stuck_or_many_clients_do_not_block_others_and_keep_alive_works(peer):
    c = peer.client
    url = "/v1/workspaces/default/webhooks"
    silent = socket.create_connection(("127.0.0.1", peer.port))
    partial = socket.create_connection(("127.0.0.1", peer.port))
    partial.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n".encode())       # and never the end
    unread = socket.create_connection(("127.0.0.1", peer.port))
    unread.sendall(b"POST " + url.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    try:
        for _ in range(5):
            t0 = time.monotonic()
            assert c.get(url).status_code == 200
            assert time.monotonic() - t0 < 2
        # Keep-alive: two requests on one connection, answered in turn.
        with socket.create_connection(("127.0.0.1", peer.port), timeout=10) as s:
            conn = h11.Connection(h11.CLIENT)
            for _ in range(2):
                s.sendall(conn.send(h11.Request(method="GET", target=url, headers=[
                    ("host", "x"), ("authorization", f"Bearer {peer.token}")])) + conn.send(h11.EndOfMessage()))
                events = []
                while not events or not isinstance(events[-1], h11.EndOfMessage):
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(s.recv(65536))
                    else:
                        events.append(ev)
                assert events[0].status_code == 200
                assert json.loads(b"".join(e.data for e in events if isinstance(e, h11.Data))) == {"webhooks": []}
                conn.start_next_cycle()
    finally:
        for s in (silent, partial, unread):
            s.close()
    # Past the cap on connections a new one is refused at once (503), never left hanging ...
    idle = [socket.create_connection(("127.0.0.1", peer.port)) for _ in range(api_http.MAX_CONNECTIONS)]
    try:
        def refused() -> bool:
            try:
                return httpx.get(f"{peer.base}{url}", timeout=5).status_code == 503
            except httpx.TransportError:
                return False
        wait_for(refused, 10, what="a 503 past the connection cap")
    finally:
        for s in idle:
            s.close()
    # ... and served again as soon as the others are gone.
    wait_for(lambda: httpx.get(f"{peer.base}{url}", headers=c.headers, timeout=5).status_code == 200, 10,
             what="service after the idle connections closed")


def test_openapi_document_describes_every_route(peer):
    r = httpx.get(f"{peer.base}/v1/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc == json.loads(json.dumps(document()))
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {t for t, _ in ROUTES}
    for template, methods in ROUTES:
        item = doc["paths"][template]
        assert {m.lower() for m in methods} == set(item), template
        for method, op_id in methods.items():
            op = item[method.lower()]
            assert op["operationId"] == op_id and op["responses"], (template, method)
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == {seg[1:-1] for seg in template.split("/") if seg.startswith("{")}, template
    assert doc["paths"]["/v1/openapi.json"]["get"]["security"] == []
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"

    def refs(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)
    for ref in refs(doc):
        target = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]                       # KeyError: a dangling $ref
    assert set(doc["components"]["schemas"]["EventType"]["enum"]) >= {"fs.file.written", "fs.entry.moved"}


def test_api_config_keys_are_checked():
    base = '[node]\ndata_dir = "/tmp/x"\n[[store]]\nname = "s"\nkind = "local"\npath = "/tmp/s"\n'
    cfg = config.parse(base)
    assert cfg.api.listen is None and cfg.api.address is None
    cfg = config.parse(base + '[api]\nlisten = "127.0.0.1:7080"\n')
    assert cfg.api.address == ("127.0.0.1", 7080) and cfg.api.token_file == "/tmp/x/api.token"
    assert config.parse(base + '[api]\nlisten = "[::1]:8"\ntoken = "' + "t" * 20 + '"\n').api.address == ("::1", 8)
    assert config.parse(base + '[api]\nlisten = ""\n').api.address is None
    for extra, words in [('listen = "7080"', "api.listen: invalid value"), ('listen = "h:0"', "api.listen"),
                         ('listen = "h:70000"', "api.listen"), ("listen = 7080", "api.listen"),
                         ('token = "short"', "api.token"), ('color = "x"', "api.color: unknown key"),
                         ('token = "' + "t" * 20 + '"\ntoken_file = "/x"', "api.token_file"),
                         ('token_file = ""', "api.token_file")]:
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            config.parse(base + "[api]\n" + extra + "\n")


def test_bind_failure_is_a_one_line_mount_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        m = Mount(tmp_path, extra=f'[api]\nlisten = "127.0.0.1:{port}"\ntoken = "{"k" * 24}"\n')
        r = m.cli("mount", str(m.mp))
        try:
            assert r.returncode == 1, r.stderr
            assert r.stderr.strip().splitlines() == [f"agentmount: [api] listen 127.0.0.1:{port}: cannot listen "
                                                     "there: Address already in use"], r.stderr
            assert not os.path.ismount(m.mp)
        finally:
            m.cleanup()


class _Echo:
    """A minimal app for exercising the server's own limits in process."""

    def early(self, method, path, headers):
        return None

    async def handle(self, request):
        return api_http.Response.json(200, {"path": request.path, "n": len(request.body)})


async def test_server_deadlines_end_slow_and_idle_clients():
    server = api_http.Server(_Echo(), read_timeout=0.5, write_timeout=0.5)
    listeners = await server.listen("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, listeners)

        async def exchange(*parts: bytes, gap: float = 0.0) -> tuple[bytes, float]:
            s = await trio.open_tcp_stream("127.0.0.1", port)
            t0 = trio.current_time()
            for p in parts:
                await s.send_all(p)
                await trio.sleep(gap)
            out = b""
            with trio.fail_after(5):
                while chunk := await s.receive_some(65536):
                    out += chunk
            await s.aclose()
            return out, trio.current_time() - t0

        out, took = await exchange()                                   # says nothing: closed
        assert out == b"" and 0.4 < took < 2
        out, took = await exchange(b"GET /a HT", b"TP/1.1\r\nHo", b"st: x\r\n", gap=0.2)   # dribbles
        assert out.startswith(b"HTTP/1.1 408 ") and took < 2
        out, _ = await exchange(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")    # kept alive, then idle: closed
        assert out.startswith(b"HTTP/1.1 200 ") and out.count(b"HTTP/1.1") == 1
        nursery.cancel_scope.cancel()
    assert server.open == 0
