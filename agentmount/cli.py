"""The `agentmount` command line. Exit status: 0 ok, 1 failure, 2 bad usage or config."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import trio

from agentmount import config as config_mod
from agentmount import control, procs
from agentmount.errors import ConfigError, FsError, MountError
from backend.store import StoreError


def _load(args) -> config_mod.Config:
    return config_mod.load(getattr(args, "config", None))


def cmd_mount(args) -> int:
    from agentmount import daemon
    cfg = _load(args)
    try:
        os.lstat(args.mountpoint)     # not stat: a dead mount there (ENOTCONN) is detached later
    except FileNotFoundError:
        raise MountError(f"mountpoint {args.mountpoint} does not exist") from None
    except OSError:
        pass
    code = daemon.mount(cfg, args.mountpoint, args.foreground)
    if code == 0 and not args.foreground:
        print(f"agentmount: mounted {os.path.abspath(args.mountpoint)}")
    return code


def _mount_pid(mp: str) -> int | None:
    try:
        return int(os.getxattr(mp, "user.agentmount.pid"))
    except (OSError, ValueError):
        return None


def cmd_umount(args) -> int:
    mp = os.path.abspath(args.mountpoint)
    try:
        os.stat(mp)
    except OSError as e:
        if e.errno == 107:  # ENOTCONN: the daemon is gone, detach what is left
            from agentmount.daemon import detach
            detach(mp)
            print(f"agentmount: {mp}: detached a stale mount")
            return 0
        raise MountError(f"{mp}: {e.strerror}") from None
    if not os.path.ismount(mp):
        raise MountError(f"{mp} is not mounted")
    pid = _mount_pid(mp)
    r = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
    if r.returncode != 0:
        raise MountError(f"cannot unmount {mp}: {r.stderr.strip() or 'fusermount3 failed'}")
    if pid is not None:
        # The kernel's unmount ends the peer only when no other mount namespace still holds a
        # copy of this mount (a container's bind of the mountpoint does); ask it to stop either
        # way: it commits everything first, and the copies left behind get ENOTCONN.
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if pid is not None and not procs.wait_exit(pid, args.timeout):
        raise MountError(f"the peer (pid {pid}) has not finished committing after {args.timeout:.0f}s")
    return 0


def _with_store(cfg, fn):
    from agentmount.daemon import open_store

    async def run():
        store = open_store(cfg)
        try:
            return await fn(store)
        finally:
            await store.aclose()
    return trio.run(run)


async def _offline_status(store) -> tuple[list[str], dict]:
    """Workspaces and per-store health probed directly (no daemon running)."""
    from agentmount.meta.workspaces import list_workspaces
    error = None
    try:
        await store.check()
    except StoreError as e:
        error = str(e)
    health = {h["name"]: h for h in store.health()}
    if error and len(health) == 1:
        for h in health.values():
            h.update(up=False, last_error=error)
    names: list[str] = []
    if any(h["up"] for h in health.values()):
        try:
            names = sorted(await list_workspaces(store))
        except StoreError as e:
            print(f"agentmount: cannot list workspaces: {e}", file=sys.stderr)
    return names, health


def cmd_status(args) -> int:
    cfg = _load(args)
    resp = control.request(cfg.node.data_dir, {"cmd": "status"})
    out: dict = {"node": cfg.node.name, "data_dir": cfg.node.data_dir,
                 "stores": [{"name": s.name, "kind": s.kind, "path": s.path,
                             "location": s.path if s.kind == "local" else
                             f"{s.endpoint or 'aws'}/{s.bucket}/{s.prefix}"} for s in cfg.stores]}
    if resp and resp.get("ok"):
        out["running"] = True
        out.update(resp["result"])
        health = {h["name"]: h for h in out.pop("store_health", [])}
    else:
        out["running"] = False
        out["workspaces"], health = _with_store(cfg, _offline_status)
    for st in out["stores"]:
        h = health.get(st["name"], {})
        st["healthy"] = bool(h.get("up"))
        st["latency_ms"] = h.get("latency_ms")
        st["repair_queue"] = h.get("repair_queue", 0)
        st["last_error"] = h.get("last_error")
        st["hedged_reads"] = h.get("hedged_reads", 0)
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    print(f"node {out['node']}: {'running (pid %d)' % out['pid'] if out['running'] else 'not running'}")
    for st in out["stores"]:
        lat = f", {st['latency_ms']:g} ms" if st["latency_ms"] is not None else ""
        err = f" ({st['last_error']})" if st["last_error"] and not st["healthy"] else ""
        hedged = f", {st['hedged_reads']} reads hedged" if st["hedged_reads"] else ""
        print(f"store {st['name']} ({st['kind']} {st['location']}): {'ok' if st['healthy'] else 'UNAVAILABLE'}"
              f"{err}{lat}, repair queue {st['repair_queue']}{hedged}")
    ws = out["workspaces"]
    if isinstance(ws, dict):
        for p in out.get("peers", []):
            rtt = f", rtt {p['rtt_ms']:g} ms" if p["rtt_ms"] is not None else ""
            print(f"peer {p['name']} ({p['endpoint']}): {'alive' if p['alive'] else 'UNREACHABLE'}{rtt}"
                  f", leads {', '.join(p['leads']) or 'nothing'}")
        for name, w in sorted(ws.items()):
            if w.get("role") != "leader":
                print(f"workspace {name}: {w.get('role', '?')}, leader {w.get('leader') or 'unknown'}, "
                      f"epoch {w['epoch']}, {w['dirty_files']} dirty, {w['open_files']} open")
                continue
            print(f"workspace {name}: leader (epoch {w['epoch']}), {w['inodes']} inodes, seq {w['seq']} "
                  f"(durable {w['durable_seq']}), {w['dirty_files']} dirty, {w['open_files']} open"
                  + (f", JOURNAL ERROR {w['journal_error']}" if w["journal_error"] else ""))
        print(f"write buffer {out['write_buffer_bytes']} B, uploads in flight {out['uploads_in_flight']}, "
              f"memory cache {out['memory_cache_bytes']} B")
        if out.get("api"):
            api = out["api"]
            print(f"http api {api['url']}" + (f" (token in {api['token_file']})" if api["token_file"] else ""))
    else:
        for name in ws:
            print(f"workspace {name}")
    return 0


def cmd_scrub(args) -> int:
    from agentmount import scrub
    from agentmount.daemon import _open_one
    from backend.replicated import ReplicatedStore
    cfg = _load(args)

    async def run() -> int:
        stores = [_open_one(sc, cfg) for sc in cfg.stores]
        reader = stores[0] if len(stores) == 1 else ReplicatedStore(
            stores, 1, timeout=cfg.fs.store_timeout_s, repair_on_read=False)
        try:
            try:
                await reader.check()
            except StoreError as e:
                print(f"agentmount: {e}", file=sys.stderr)
            return await scrub.run(reader, stores, cfg.chunk_size, args.workspace, args.repair)
        except StoreError as e:
            print(f"agentmount: scrub failed: {e}", file=sys.stderr)
            return 1
        finally:
            for s in stores:
                await s.aclose()
    return trio.run(run)


def cmd_keys(args) -> int:
    from agentmount.peer.keys import keygen_text
    print(keygen_text(), end="")
    return 0


def cmd_workspace(args) -> int:
    from agentmount.meta import workspaces as wsreg
    cfg = _load(args)
    if args.action == "list":
        resp = control.request(cfg.node.data_dir, {"cmd": "workspace.list"})
        names = resp["result"] if resp and resp.get("ok") else sorted(_with_store(cfg, wsreg.list_workspaces))
        for n in names:
            print(n)
        return 0
    if not args.name:
        raise ConfigError("workspace name required")
    if not wsreg.valid_name(args.name):
        print(f"agentmount: invalid workspace name {args.name!r}", file=sys.stderr)
        return 2
    cmd = {"create": "workspace.create", "delete": "workspace.delete"}[args.action]
    req = {"cmd": cmd, "name": args.name, "force": getattr(args, "force", False), "uid": os.getuid(),
           "gid": os.getgid(), "mode": int(getattr(args, "mode", "755") or "755", 8)}
    resp = control.request(cfg.node.data_dir, req)
    if resp is not None:
        if not resp.get("ok"):
            raise FsError(resp.get("errno", 5), resp.get("error", ""))
    elif args.action == "create":
        _with_store(cfg, lambda s: wsreg.create_workspace(s, args.name, uid=os.getuid(), gid=os.getgid(),
                                                          mode=req["mode"], chunk_size=cfg.chunk_size))
    else:
        async def delete(store):
            known = await wsreg.list_workspaces(store)
            if args.name not in known:
                raise FsError(2, f"no workspace {args.name}")
            return await wsreg.delete_workspace(store, args.name)
        _with_store(cfg, delete)
    print(f"workspace {args.name} {args.action}d")
    return 0


def cmd_locks(args) -> int:
    cfg = _load(args)
    resp = control.request(cfg.node.data_dir, {"cmd": "locks", "workspace": args.workspace})
    if resp is None:
        print(f"agentmount: no peer is running on {cfg.node.data_dir} (locks live only while mounted)",
              file=sys.stderr)
        return 1
    if not resp.get("ok"):
        print(f"agentmount: {resp.get('error')}", file=sys.stderr)
        return 1
    result = resp["result"]
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    for ws, lst in sorted(result.items()):
        if "error" in lst:
            print(f"workspace {ws}: {lst['error']}")
            continue
        grace = ", re-assertion grace period" if lst.get("in_grace") else ""
        print(f"workspace {ws}: {len(lst['held'])} held, {len(lst['waiting'])} waiting (epoch {lst['epoch']}{grace})")
        for h in lst["held"]:
            rng = f" [{h['start']}, {_end(h['end'])}]" if h["kind"] == "posix" else ""
            ttl = "-" if h["ttl_left_s"] is None else f"{h['ttl_left_s']:.1f}s"
            print(f"  HELD    {h.get('path') or '#%d' % h['ino']}  {h['kind']} {h['type']}{rng}  peer {h['peer']} "
                  f"pid {h['pid']}  age {h['age_s']:.1f}s  ttl left {ttl}  token {h['token']}")
        for w in lst["waiting"]:
            rng = f" [{w['start']}, {_end(w['end'])}]" if w["kind"] == "posix" else ""
            print(f"  WAITING {w.get('path') or '#%d' % w['ino']}  {w['kind']} {w['type']}{rng}  peer {w['peer']} "
                  f"pid {w['pid']}  for {w['waiting_s']:.1f}s")
    return 0


def _events_call(cfg, req: dict, offline):
    """`req` at the running peer, or `offline(store)` against the stores when none runs."""
    resp = control.request(cfg.node.data_dir, req)
    if resp is None:
        return _with_store(cfg, offline)
    if not resp.get("ok"):
        raise ValueError(resp.get("error") or "failed")
    return resp["result"]


def cmd_webhook(args) -> int:
    from agentmount.events import admin
    cfg = _load(args)
    ws = args.workspace
    try:
        if args.action == "list":
            if ws:
                subs = _events_call(cfg, {"cmd": "webhook.list", "workspace": ws}, lambda s: admin.list_subs(s, ws))
            else:
                from agentmount.meta import workspaces as wsreg

                async def all_subs(store):
                    out = []
                    for n in sorted(await wsreg.list_workspaces(store)):
                        out += await admin.list_subs(store, n)
                    return out
                subs = _events_call(cfg, {"cmd": "webhook.list"}, all_subs)
            if args.json:
                print(json.dumps(subs, indent=2, sort_keys=True))
                return 0
            for sub in subs:
                state = f"disabled: {sub['disabled']}" if sub.get("disabled") else "enabled"
                live = sub.get("delivery") or {}
                print(f"{sub['id']}  {sub['workspace']}  {sub['url']}  events={','.join(sub['events'] or ['*'])}"
                      f"{'  path=' + sub['path'] if sub.get('path') else ''}  {state}  cursor={sub['cursor']}"
                      f"  dead={sub['dead_letters']}"
                      + (f"  delivered={live['delivered']}  last_error={live['last_error']}" if live else ""))
            return 0
        if not ws:
            raise ValueError("a workspace is required")
        if args.action == "add":
            if not args.target:
                raise ValueError("webhook add needs a URL")
            allow = args.allow_private or cfg.events.allow_private
            req = {"cmd": "webhook.add", "workspace": ws, "url": args.target, "secret": args.secret,
                   "events": args.event or None, "path": args.path, "allow_private": allow}
            sub = _events_call(cfg, req, lambda s: admin.add(s, ws, args.target, args.secret, args.event or None,
                                                             args.path, allow))
            print(f"webhook {sub['id']} added to {ws}")
            print(f"secret: {sub['secret']}")
            return 0
        if not args.target:
            raise ValueError(f"webhook {args.action} needs a webhook id (see `agentmount webhook list`)")
        sid = args.target
        if args.action == "remove":
            def offline_remove(s):
                async def run():
                    if not await admin.remove(s, ws, sid):
                        raise ValueError(f"no webhook {sid!r} in workspace {ws!r}")
                return run()
            _events_call(cfg, {"cmd": "webhook.remove", "workspace": ws, "id": sid}, offline_remove)
            print(f"webhook {sid} removed")
            return 0
        if args.action == "test":
            r = _events_call(cfg, {"cmd": "webhook.test", "workspace": ws, "id": sid},
                             lambda s: admin.test(s, ws, sid, cfg.events.timeout_s))
            print(f"{'delivered' if r['ok'] else 'failed'}: status {r['status']} in {r['ms']} ms"
                  + (f" ({r['error']})" if r.get("error") else ""))
            return 0 if r["ok"] else 1
        r = _events_call(cfg, {"cmd": "webhook.replay", "workspace": ws, "id": sid},
                         lambda s: admin.replay(s, ws, sid, cfg.events.timeout_s))
        print(f"replayed: {r['delivered']} delivered, {r['failed']} still failing")
        for e in r["errors"]:
            print(f"  {e}")
        return 0 if r["failed"] == 0 else 1
    except ValueError as e:
        print(f"agentmount: {e}", file=sys.stderr)
        return 2


def cmd_events(args) -> int:
    from agentmount.events import admin
    cfg = _load(args)
    ws, after = args.workspace, args.since
    try:
        while True:
            r = _events_call(cfg, {"cmd": "events.tail", "workspace": ws, "after": after, "limit": args.lines},
                             lambda s: admin.tail(s, ws, after, args.lines))
            if r.get("gap"):
                print(json.dumps({"type": "fs.overflow", "data": r["gap"]}), flush=True)
            for ev in r["events"]:
                print(json.dumps(ev, sort_keys=True), flush=True)
            if not args.follow:
                return 0
            after = r["next"]
            time.sleep(0.5)
    except ValueError as e:
        print(f"agentmount: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _end(end: int) -> str:
    return "EOF" if end >= (1 << 63) - 1 else str(end)


def cmd_fsck(args) -> int:
    from agentmount import fsck
    cfg = _load(args)
    return _with_store(cfg, lambda store: fsck.run(store, cfg, args.workspace, verify_data=not args.quick,
                                                   out=sys.stdout))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentmount", description="A replicated FUSE filesystem for AI agents.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("-c", "--config", help="mount.conf (default: $AGENTMOUNT_CONFIG or the embedded default)")
        return sp

    m = with_config(sub.add_parser("mount", help="mount the filesystem"))
    m.add_argument("mountpoint")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.set_defaults(fn=cmd_mount)
    u = sub.add_parser("umount", help="unmount, waiting for pending uploads and commits")
    u.add_argument("mountpoint")
    u.add_argument("--timeout", type=float, default=600.0)
    u.set_defaults(fn=cmd_umount)
    s = with_config(sub.add_parser("status", help="show the peer, stores and workspaces"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    f = with_config(sub.add_parser("fsck", help="verify namespaces and blocks"))
    f.add_argument("workspace", nargs="?")
    f.add_argument("--quick", action="store_true", help="check block presence only, not checksums")
    f.set_defaults(fn=cmd_fsck)
    sc = with_config(sub.add_parser("scrub", help="verify every object on every store; --repair fixes copies"))
    sc.add_argument("workspace", nargs="?")
    sc.add_argument("--repair", action="store_true", help="rewrite missing or corrupt copies from a good one")
    sc.set_defaults(fn=cmd_scrub)
    k = sub.add_parser("keys", help="generate a CurveZMQ key pair for [node] public_key/secret_key")
    k.add_argument("action", choices=["generate"])
    k.set_defaults(fn=cmd_keys)
    lk = with_config(sub.add_parser("locks", help="list held file locks and waiters (from the workspace leaders)"))
    lk.add_argument("workspace", nargs="?", help="only this workspace")
    lk.add_argument("--json", action="store_true")
    lk.set_defaults(fn=cmd_locks)
    wh = with_config(sub.add_parser("webhook", help="add, list, remove, test or replay webhook subscriptions"))
    wh.add_argument("action", choices=["add", "list", "remove", "test", "replay"])
    wh.add_argument("workspace", nargs="?")
    wh.add_argument("target", nargs="?", help="add: the URL; remove/test/replay: the webhook id")
    wh.add_argument("--secret", help="add: whsec_... (default: a new one, printed)")
    wh.add_argument("--event", action="append", help="add: an event type to send (repeat; default: all)")
    wh.add_argument("--path", help="add: only events whose path matches this glob, e.g. '/reports/*'")
    wh.add_argument("--allow-private", action="store_true", help="add: allow a loopback/private-range URL")
    wh.add_argument("--json", action="store_true")
    wh.set_defaults(fn=cmd_webhook)
    ev = with_config(sub.add_parser("events", help="print a workspace's change events (pull)"))
    ev.add_argument("action", choices=["tail"])
    ev.add_argument("workspace")
    ev.add_argument("--since", type=int, default=None, help="events of records after this seq (default: the last N)")
    ev.add_argument("-n", "--lines", type=int, default=20, help="at most this many (default 20)")
    ev.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    ev.set_defaults(fn=cmd_events)
    w = with_config(sub.add_parser("workspace", help="create, list or delete workspaces"))
    w.add_argument("action", choices=["create", "list", "delete"])
    w.add_argument("name", nargs="?")
    w.add_argument("--mode", default="755", help="octal mode of a new workspace's root (create)")
    w.add_argument("--force", action="store_true", help="delete a workspace that is not empty")
    w.set_defaults(fn=cmd_workspace)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"agentmount: config error: {e}", file=sys.stderr)
        return 2
    except MountError as e:
        print(f"agentmount: {e}", file=sys.stderr)
        return 1
    except FsError as e:
        print(f"agentmount: {os.strerror(e.errno)}{': ' + e.args[1] if e.args[1] != os.strerror(e.errno) else ''}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
