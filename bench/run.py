#!/usr/bin/env python3
"""agentmount benchmark: the same workload on a plain local directory, agentmount and (if it can be
had) JuiceFS; one table of medians plus a JSON file in bench/results/.

    python bench/run.py                  # mounts its own agentmount (+ JuiceFS) in a temp dir
    python bench/run.py --quick          # sizes / counts scaled down 8x
    python bench/run.py --target DIR     # DIR (e.g. a mounted agentmount workspace) vs local only
    python bench/run.py --replicas       # agentmount over 3 SeaweedFS S3 stores vs over 1 (issue 3):
                                         # sequential and small-file phases, s3x3/s3x1 ratios

Everything it mounts or creates is removed at the end, also on error or Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets as tg  # noqa: E402
import workload as wl  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


class StepFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# watchdog: a step that takes too long is reported; an owned mount is then killed so the blocked
# system call returns and the run can go on (and clean up).

class Watchdog(threading.Thread):
    def __init__(self, hard: float, warn_every: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.hard = hard
        self.warn_every = warn_every
        self.lock = threading.Lock()
        self.cur: tuple[str, tg.Target, float] | None = None
        self.fired: str | None = None
        self.main_tid = threading.get_native_id()
        self.stop = threading.Event()

    def arm(self, desc: str, target: tg.Target) -> None:
        with self.lock:
            self.cur = (desc, target, time.monotonic())
            self.fired = None

    def disarm(self) -> str | None:
        with self.lock:
            self.cur = None
            f, self.fired = self.fired, None
            return f

    def run(self) -> None:
        next_warn = self.warn_every
        while not self.stop.wait(1.0):
            with self.lock:
                cur = self.cur
            if cur is None:
                next_warn = self.warn_every
                continue
            desc, target, start = cur
            el = time.monotonic() - start
            if el >= next_warn:
                log(f"  ... {desc} on {target.name} still running after {el:.0f} s")
                next_warn += self.warn_every
            if el >= self.hard and self.fired is None:
                self._hang(desc, target, el)

    def _hang(self, desc: str, target: tg.Target, el: float) -> None:
        try:
            with open(f"/proc/self/task/{self.main_tid}/stack") as f:
                stack = f.read().strip()
        except OSError:
            stack = "(unavailable)"
        try:
            with open(f"/proc/self/task/{self.main_tid}/wchan") as f:
                wchan = f.read().strip()
        except OSError:
            wchan = "?"
        msg = f"HANG: {desc} on {target.name} did not finish in {el:.0f} s (bench thread wchan {wchan})"
        with self.lock:
            self.fired = msg
        log(msg)
        log("  kernel stack of the bench thread:\n" + "\n".join("    " + s for s in stack.splitlines()))
        diag = target.diagnostics(60)
        if diag:
            log(f"  --- {target.log_path} (tail) ---\n{diag}")
        if target.owned:
            log(f"  killing the {target.name} daemon so that the blocked call returns")
            target.abort()
        else:
            log("  (not a mount this benchmark owns: waiting on)")


# ---------------------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str
    keys: list[str]
    big: bool
    step: Callable[[tg.Target, int], dict[str, float]]
    before: Callable[[tg.Target], None] | None = None
    after: Callable[[tg.Target], None] | None = None


@dataclass
class Run:
    args: argparse.Namespace
    sz: wl.Sizes
    figs: list[wl.Figure]
    targets: list[tg.Target]
    wd: Watchdog
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    cpu: list[dict] = field(default_factory=list)
    state: dict[str, dict] = field(default_factory=dict)

    def amount(self, key: str) -> float | None:
        sz = self.sz
        if key.startswith("seq_"):
            return sz.seq_bytes / wl.MiB
        return {"rand_read_4k": sz.rand_reads, "small_create": sz.small_files, "small_stat": sz.small_files,
                "small_read": sz.small_files, "small_unlink": sz.small_files, "mkdir": sz.dirs,
                "rename": sz.renames, "flock": sz.flocks}.get(key)

    def guarded(self, t: tg.Target, desc: str, keys: list[str], fn):
        """Run fn() under the watchdog; on failure record it (with the daemon's log tail) and return None."""
        self.wd.arm(desc, t)
        try:
            return fn()
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001
            hang = self.wd.disarm()
            err = f"{type(e).__name__}: {e}"
            if isinstance(e, OSError) and e.errno is not None:
                err = f"{type(e).__name__} [errno {e.errno} {os.strerror(e.errno)}]: {e}"
            if hang:
                err = f"{hang}; then {err}"
            log(f"  ERROR in {desc} on {t.name}: {err}")
            tb = traceback.format_exc(limit=4)
            diag = t.diagnostics(40)
            if diag:
                log(f"  --- {t.log_path} (tail) ---\n{diag}\n  ---")
            rec = {"target": t.name, "step": desc, "figures": keys, "error": err, "traceback": tb,
                   "log_tail": diag}
            alive = t.alive()
            if not alive:
                log(f"  {t.name}: the mount is not answering (stat of {t.workdir} fails)")
                if t.owned:
                    ok = t.recover()
                    log(f"  {t.name}: {'remounted after the failure' if ok else 'could not be remounted'}")
                    rec["recovered"] = ok
                    if not ok:
                        t.broken = err
                else:
                    t.broken = err
            rec["mount_alive_after"] = alive
            self.errors.append(rec)
            return None
        finally:
            self.wd.disarm()

    def run_phase(self, ph: Phase) -> None:
        n = self.args.repeat_big if ph.big else self.args.repeat
        failed: set[str] = set()
        active = [t for t in self.targets if not t.broken]
        log(f"== {ph.name} ({n} run{'s' if n > 1 else ''} per target)")
        for t in active:
            self.state.setdefault(t.name, {})
            if ph.before and self.guarded(t, f"{ph.name} setup", ph.keys, lambda: (ph.before(t), True)[1]) is None:
                failed.add(t.name)
        for rep in range(n):
            for t in active:
                if t.broken or t.name in failed:
                    continue
                self.guarded(t, f"{ph.name} sync", [], os.sync)
                cpu0, w0 = t.cpu_seconds(), time.perf_counter()
                res = self.guarded(t, ph.name, ph.keys, lambda: ph.step(t, rep))
                if res is None:
                    failed.add(t.name)
                    continue
                wall = time.perf_counter() - w0
                cpu: dict[str, float] = {}
                for k, v in t.cpu_seconds().items():  # a process started in the step counts from 0
                    role = k.split(":", 1)[0]
                    cpu[role] = cpu.get(role, 0.0) + v - cpu0.get(k, 0.0)
                parts = []
                for k, secs in res.items():
                    self.samples.setdefault(k, {}).setdefault(t.name, []).append(secs)
                    a = self.amount(k)
                    unit = next(f.unit for f in self.figs if f.key == k)
                    parts.append(f"{k} {secs:.3f} s" if a is None else f"{k} {fmt_num(a / secs)} {unit} ({secs:.3f} s)")
                log(f"  {t.name:<10} run {rep + 1}/{n}: " + ", ".join(parts))
                if cpu:
                    self.cpu.append({"phase": ph.name, "target": t.name, "rep": rep, "wall_seconds": wall,
                                     "cpu_seconds": cpu})
                    log(f"  {'':<10} cpu during the step ({wall:.2f} s wall): "
                        + ", ".join(f"{k} {v:.2f} s" for k, v in cpu.items()))
        for t in active:
            if ph.after and not t.broken:
                self.guarded(t, f"{ph.name} cleanup", ph.keys, lambda: (ph.after(t), True)[1])


def fmt_num(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def build_phases(r: Run, tarball: Path, tar_entries: int) -> list[Phase]:
    sz = r.sz
    st = r.state

    def seq_write_random(t: tg.Target, rep: int) -> dict[str, float]:
        path = t.workdir / "seq-random.bin"
        if path.exists():
            path.unlink()
        data = os.urandom(sz.seq_bytes)
        import hashlib
        st[t.name]["seq_digest"] = hashlib.blake2b(data, digest_size=16).hexdigest()
        os.sync()
        dt = wl.seq_write(path, data, sz.seq_bytes, sz.piece)
        del data
        return {"seq_write_random": dt}

    def seq_write_zeros(t: tg.Target, rep: int) -> dict[str, float]:
        path = t.workdir / "seq-zeros.bin"
        dt = wl.seq_write(path, bytes(sz.piece), sz.seq_bytes, sz.piece)
        path.unlink()
        return {"seq_write_zeros": dt}

    def seq_read(t: tg.Target, rep: int) -> dict[str, float]:
        how = t.drop_caches()
        if rep == 0:
            log(f"  {t.name:<10} cold read: {how}")
        path = t.workdir / "seq-random.bin"
        cold = wl.seq_read(path, sz.seq_bytes, sz.piece)
        before = t.fuse_reads()
        warm = wl.seq_read(path, sz.seq_bytes, sz.piece)
        if before is not None:
            # Warm re-reads must come from the kernel page cache: none may reach the daemon.
            n = t.fuse_reads() - before
            st[t.name].setdefault("warm_read_requests", []).append(n)
            log(f"  {t.name:<10} warm read: {n} READ requests reached the daemon"
                + (" (all served from the kernel page cache)" if n == 0 else ""))
        return {"seq_read_cold": cold, "seq_read_warm": warm}

    def seq_read_after(t: tg.Target) -> None:
        path = t.workdir / "seq-random.bin"
        want = st[t.name].get("seq_digest")
        if want:
            got = wl.file_digest(path, sz.piece)
            if got != want:
                raise OSError(f"DATA MISMATCH: {path.name} reads back with a different checksum than written")
            log(f"  {t.name:<10} verified: {wl.human_bytes(sz.seq_bytes)} file reads back identical")
        path.unlink()

    def rand_before(t: tg.Target) -> None:
        wl.seq_write(t.workdir / "rand.bin", os.urandom(sz.rand_file), sz.rand_file, sz.piece)

    def rand_read(t: tg.Target, rep: int) -> dict[str, float]:
        t.drop_caches()
        return {"rand_read_4k": wl.rand_reads(t.workdir / "rand.bin", sz.rand_file, sz.rand_reads, sz.rand_io,
                                              seed=1234 + rep)}

    def rand_after(t: tg.Target) -> None:
        (t.workdir / "rand.bin").unlink()

    return [
        Phase("seq-write-random", ["seq_write_random"], True, seq_write_random),
        Phase("seq-write-zeros", ["seq_write_zeros"], True, seq_write_zeros),
        Phase("seq-read", ["seq_read_cold", "seq_read_warm"], True, seq_read, after=seq_read_after),
        Phase("rand-read-4k", ["rand_read_4k"], False, rand_read, before=rand_before, after=rand_after),
        Phase("small-files", ["small_create", "small_stat", "small_read", "small_unlink"], False,
              lambda t, rep: wl.small_files(t.workdir / f"small-{rep}", sz.small_files, sz.small_size)),
        Phase("mkdir", ["mkdir"], False, lambda t, rep: {"mkdir": wl.mkdirs(t.workdir / f"mkdir-{rep}", sz.dirs)}),
        Phase("rename", ["rename"], False,
              lambda t, rep: {"rename": wl.renames(t.workdir / f"rename-{rep}", sz.renames)}),
        Phase("tar", ["tar_extract", "rm_rf"], False,
              lambda t, rep: wl.tar_extract(tarball, t.workdir / f"tar-{rep}", tar_entries, r.args.step_timeout)),
        Phase("flock", ["flock"], False, lambda t, rep: {"flock": wl.flocks(t.workdir / f"lock-{rep}", sz.flocks)}),
    ]


# ---------------------------------------------------------------------------------------------
# report

def ratio_key(num: str, den: str) -> str:
    return f"ratio_{num}_{den}"


def summarize(r: Run, pairs: list[tuple[str, str]]) -> list[dict]:
    """Medians per figure and target, and for each (num, den) in pairs the speed ratio num/den."""
    out = []
    for f in r.figs:
        row = {"key": f.key, "title": f.title, "unit": f.unit, "higher_is_better": not f.is_time,
               "results": {}, "errors": {}}
        a = r.amount(f.key)
        for t in r.targets:
            secs = r.samples.get(f.key, {}).get(t.name)
            if secs:
                med_s = statistics.median(secs)
                res = {"median_seconds": med_s, "samples_seconds": secs}
                if a is not None:
                    vals = [a / s for s in secs]
                    res["median"] = statistics.median(vals)
                    res["samples"] = vals
                else:
                    res["median"] = med_s
                row["results"][t.name] = res
            errs = [e["error"] for e in r.errors if e["target"] == t.name and f.key in e["figures"]]
            if errs:
                row["errors"][t.name] = errs[0]

        def ratio(num: str, den: str) -> float | None:
            a, b = row["results"].get(num), row["results"].get(den)
            if not a or not b:
                return None
            # speed ratio: > 1 means num is faster
            return b["median_seconds"] / a["median_seconds"] if f.is_time else a["median"] / b["median"]

        for num, den in pairs:
            row[ratio_key(num, den)] = ratio(num, den)
        out.append(row)
    return out


def cell(row: dict, name: str) -> str:
    res = row["results"].get(name)
    if res is None:
        return "ERROR" if name in row["errors"] else "-"
    if row["unit"] == "s":
        return f"{res['median_seconds']:.2f} s"
    s = f"{fmt_num(res['median'])} {row['unit']}"
    if row["unit"] == "MiB/s":
        s += f" ({res['median_seconds']:.2f} s)"
    return s


def fmt_ratio(rv: float | None) -> str:
    return "-" if rv is None else f"x{rv:.2f}" if rv >= 0.1 else f"x{rv:.2g}"


def table(rows: list[dict], names: list[str], pairs: list[tuple[str, str]]) -> str:
    """One column per target; a ratio column num/den follows the later of its two targets."""
    after: dict[str, list[tuple[str, str]]] = {}
    for num, den in pairs:
        after.setdefault(max(num, den, key=names.index), []).append((num, den))
    cols = ["figure"]
    for n in names:
        cols.append(n)
        cols += [f"{num}/{den}" for num, den in after.get(n, [])]
    lines = []
    for row in rows:
        line = [row["title"]]
        for n in names:
            line.append(cell(row, n))
            line += [fmt_ratio(row.get(ratio_key(num, den))) for num, den in after.get(n, [])]
        lines.append(line)
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    fmt = lambda l: "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(l, widths)))  # noqa: E731
    out = [fmt(cols), "  ".join("-" * w for w in widths)]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def cpu_table(r: Run) -> str:
    """Median CPU seconds per step by role (daemon, SeaweedFS servers) next to the median wall time."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in r.cpu:
        groups.setdefault((c["phase"], c["target"]), []).append(c)
    if not groups:
        return ""
    order = ["daemon", "servers", "bench"]
    roles = sorted({k for c in r.cpu for k in c["cpu_seconds"]} - {"machine"},
                   key=lambda k: (order.index(k) if k in order else len(order), k))
    machine = any("machine" in c["cpu_seconds"] for c in r.cpu)
    cols = ["step", "target", "wall s"] + [f"{k} cpu s" for k in roles]
    cols += ["other procs cpu s", "machine busy cores"] if machine else ["cores busy"]
    lines = []
    for (ph, t), cs in groups.items():
        wall = statistics.median(c["wall_seconds"] for c in cs)
        per = [statistics.median(c["cpu_seconds"].get(k, 0.0) for c in cs) for k in roles]
        line = [ph, t, f"{wall:.2f}"] + [f"{v:.2f}" for v in per]
        if machine:
            tot = statistics.median(c["cpu_seconds"].get("machine", 0.0) for c in cs)
            other = statistics.median(c["cpu_seconds"].get("machine", 0.0)
                                      - sum(v for k, v in c["cpu_seconds"].items() if k != "machine") for c in cs)
            line += [f"{max(other, 0.0):.2f}", f"{tot / wall:.2f} of {os.cpu_count()}" if wall else "-"]
        else:
            line.append(f"{sum(per) / wall:.2f}" if wall else "-")
        lines.append(line)
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    fmt = lambda l: "  ".join(s.ljust(w) if i < 2 else s.rjust(w) for i, (s, w) in enumerate(zip(l, widths)))  # noqa: E731
    return "\n".join([fmt(cols), "  ".join("-" * w for w in widths)] + [fmt(l) for l in lines])


def close_fds_under(root: Path, keep: set[int] = frozenset()) -> None:
    for fd in os.listdir("/proc/self/fd"):
        try:
            if int(fd) not in keep and os.readlink(f"/proc/self/fd/{fd}").startswith(str(root) + "/"):
                os.close(int(fd))
        except OSError:
            pass


def log_problems(path: Path | None, limit: int = 40) -> list[str]:
    if not path or not path.exists():
        return []
    probs = []
    with open(path, errors="replace") as f:
        for line in f:
            if any(w in line for w in ("ERROR", "CRITICAL", "Traceback", "Exception", "error:")):
                probs.append(line.rstrip())
    return probs[:limit] + ([f"... and {len(probs) - limit} more"] if len(probs) > limit else [])


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, help="run on this directory (and the local baseline) instead of "
                                               "mounting agentmount and JuiceFS")
    p.add_argument("--quick", action="store_true", help="scale sizes and counts down 8x")
    p.add_argument("--repeat", type=int, default=3, help="runs per cheap figure (median; default 3)")
    p.add_argument("--repeat-big", type=int, default=3,
                   help="runs per 1 GiB figure, interleaved across targets (median; default 3: one "
                        "cold read on a shared disk swings by 2x between runs)")
    p.add_argument("--no-juicefs", action="store_true", help="skip the JuiceFS comparison")
    p.add_argument("--replicas", action="store_true",
                   help="start 4 SeaweedFS S3 servers on 127.0.0.1 and compare agentmount over three of them "
                        "(s3x3, write_quorum 2) with agentmount over one (s3x1): sequential and small-file "
                        "phases, s3x3/s3x1 ratios (issue 3's acceptance: seq write/read >= 0.8x)")
    p.add_argument("--no-local", action="store_true", help="with --replicas: leave out the local-directory "
                                                           "reference")
    p.add_argument("--tmpdir", type=Path, default=None, help="where the temp area goes (default: $TMPDIR or /tmp)")
    p.add_argument("--step-timeout", type=float, default=900.0,
                   help="seconds before one step counts as hung (an owned mount is then killed)")
    a = p.parse_args(argv)
    if a.repeat < 1 or a.repeat_big < 1:
        p.error("--repeat and --repeat-big must be >= 1")
    if a.replicas and a.target:
        p.error("--replicas and --target do not go together")
    if a.no_local and not a.replicas:
        p.error("--no-local only applies to --replicas")
    return a


def setup_default(args: argparse.Namespace, tmp: Path, stamp: str, created: list[tg.Target]) -> list[tg.Target]:
    """local, agentmount (own mount over a local store, or --target) and JuiceFS when it can be had."""
    local = tg.LocalTarget(tmp)
    created.append(local)
    local.setup()
    if args.target:
        am: tg.Target = tg.ExternalTarget(args.target.resolve(), stamp)
        created.append(am)
        am.setup()
    else:
        am = tg.AgentmountTarget(tmp)
        created.append(am)
        log("mounting agentmount ...")
        am.setup()
        log(f"agentmount: mounted {am.mp} (pid {am.pid}, {am.mount_seconds:.2f} s)")
    targets: list[tg.Target] = [local, am]

    if not args.target and not args.no_juicefs:
        exe = tg.ensure_juicefs()
        if not exe:
            log("juicefs: not available")
        else:
            jfs = tg.JuiceFSTarget(tmp, exe)
            created.append(jfs)
            try:
                log("formatting and mounting juicefs ...")
                jfs.setup()
                targets.append(jfs)
                log(f"juicefs: mounted {jfs.mp}")
            except Exception as e:  # noqa: BLE001
                log(f"juicefs: not available ({e})")
                jfs.teardown()
                created.remove(jfs)
    return targets


# ---------------------------------------------------------------------------------------------
# --replicas: agentmount over 3 SeaweedFS stores vs over 1 (issue 3's performance acceptance)

REPLICA_PHASES = ("seq-write-random", "seq-read", "small-files")
REPLICA_BUCKET = "agentmount-bench"
REPLICA_SERVERS = 4          # one for s3x1, three for s3x3
ACCEPT = {"seq_write_random": 0.8, "seq_read_cold": 0.8, "seq_read_warm": 0.8}
S3X1, S3X3 = "s3x1", "s3x3"


def setup_replicas(args: argparse.Namespace, tmp: Path, created: list[tg.Target], servers: list) -> list[tg.Target]:
    """Start the SeaweedFS servers (appended to `servers` before they start, so that cleanup finds them
    whatever happens) and mount s3x1 and s3x3 with the same [fs]/[cache] settings."""
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # credentials are explicit: never probe IMDS
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.seaweed import SeaweedServer, start_all, weed_binary

    targets: list[tg.Target] = []
    if not args.no_local:
        local = tg.LocalTarget(tmp)
        created.append(local)
        local.setup()
        targets.append(local)
    weed = weed_binary()
    for i in range(REPLICA_SERVERS):
        servers.append(SeaweedServer(tmp / "seaweed" / f"sw{i}", start_timeout=120))
    log(f"starting {REPLICA_SERVERS} SeaweedFS servers ({weed} mini, 127.0.0.1 only) ...")
    t0 = time.monotonic()
    start_all(servers)
    for s in servers:
        s.create_bucket(REPLICA_BUCKET)
    log(f"SeaweedFS: {', '.join(s.endpoint for s in servers)} up, bucket {REPLICA_BUCKET} "
        f"({time.monotonic() - t0:.1f} s)")
    # identical [fs]/[cache] settings on both (the defaults); only the store list differs
    for name, group, wq in ((S3X1, servers[:1], None), (S3X3, servers[1:], 2)):
        t = tg.S3AgentmountTarget(tmp, name, group, REPLICA_BUCKET, write_quorum=wq)
        created.append(t)
        log(f"mounting {name} ...")
        t.setup()
        log(f"{name}: mounted {t.mp} (pid {t.pid}, {t.mount_seconds:.2f} s)")
        targets.append(t)
    return targets


def stop_servers(servers: list) -> None:
    def stop(s) -> None:
        try:
            s.cleanup(graceful=True)   # SIGTERM (SIGKILL after 15 s), remove its sockets and data
        except Exception as e:  # noqa: BLE001
            log(f"  SeaweedFS {s.endpoint if s.ports else s.root}: stop failed ({e}); killing it")
            try:
                s.cleanup(graceful=False)
            except Exception:  # noqa: BLE001
                pass

    threads = [threading.Thread(target=stop, args=(s,)) for s in servers]   # in parallel: each may take seconds
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if servers:
        log(f"  SeaweedFS: {len(servers)} server(s) stopped")


def acceptance(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for row in rows:
        need = ACCEPT.get(row["key"])
        if need is None:
            continue
        rv = row.get(ratio_key(S3X3, S3X1))
        out[row["key"]] = {"ratio": rv, "required": need, "ok": None if rv is None else rv >= need}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    sz = wl.Sizes.quick() if args.quick else wl.Sizes()
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    tmp = Path(tempfile.mkdtemp(prefix="agentmount-bench-", dir=args.tmpdir))
    created: list[tg.Target] = []
    servers: list = []   # --replicas: SeaweedFS servers, stopped after the mounts are gone
    wd = Watchdog(args.step_timeout)
    wd.start()
    run: Run | None = None
    problems: dict[str, list[str]] = {}
    descriptions: dict[str, str] = {}
    code = 0
    interrupted = False
    try:
        log(f"agentmount bench{' --replicas' if args.replicas else ''}{' --quick' if args.quick else ''}: "
            f"temp area {tmp}, python {sys.executable}")
        if args.replicas:
            targets = setup_replicas(args, tmp, created, servers)
            tarball, tar_entries = Path(), 0   # no tar phase in this mode
        else:
            tarball, tar_entries = wl.stdlib_tarball(sz.tar_every, log)
            log(f"tarball {tarball} ({tar_entries} entries, {tarball.stat().st_size / wl.MiB:.0f} MiB)")
            targets = setup_default(args, tmp, stamp, created)
        for t in targets:
            descriptions[t.name] = t.describe()
            log(f"target {t.name}: {descriptions[t.name]}")

        run = Run(args, sz, wl.figures(sz), targets, wd)
        phases = build_phases(run, tarball, tar_entries)
        if args.replicas:
            phases = [ph for ph in phases if ph.name in REPLICA_PHASES]
            keys = {k for ph in phases for k in ph.keys}
            run.figs = [f for f in run.figs if f.key in keys]
        for ph in phases:
            run.run_phase(ph)
    except KeyboardInterrupt as e:
        interrupted = True
        log(f"interrupted ({str(e) or 'Ctrl-C'}): cleaning up")
        code = 130
    except Exception as e:  # noqa: BLE001
        log(f"FAILED: {type(e).__name__}: {e}")
        traceback.print_exc()
        code = 1
    finally:
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        wd.stop.set()
        logs_kept = {}
        try:
            log("cleaning up ...")
            # an fd left open by an interrupted step would make the unmount EBUSY (the SeaweedFS servers'
            # log files are ours too, and stay open until they are stopped)
            close_fds_under(tmp, {f.fileno() for f in (getattr(s, "_log", None) for s in servers)
                                  if f is not None and not f.closed})
            try:
                for t in reversed(created):
                    try:
                        t.teardown()
                    except Exception as e:  # noqa: BLE001
                        log(f"  {t.name}: teardown failed: {e}")
                RESULTS.mkdir(exist_ok=True)
                for t in created:
                    if t.log_path and t.log_path.exists() and t.log_path.stat().st_size:
                        dst = RESULTS / f"{stamp}-{t.name}.log"
                        shutil.copyfile(t.log_path, dst)
                        logs_kept[t.name] = str(dst)
                problems = {t.name: log_problems(t.log_path) for t in created
                            if isinstance(t, tg.AgentmountTarget)}
                if servers and (code or (run is not None and run.errors)):
                    for i, srv in enumerate(servers):   # keep the SeaweedFS logs of a failed run
                        if srv.log_path.exists():
                            dst = RESULTS / f"{stamp}-seaweed{i}.log"
                            shutil.copyfile(srv.log_path, dst)
                            logs_kept[f"seaweed{i}"] = str(dst)
            finally:
                for t in created:
                    for mp in (getattr(t, "mp", None),):
                        if mp is not None and tg.is_mounted(mp):
                            tg.lazy_detach(mp)
                stop_servers(servers)   # only now: the mounts commit to them until they are unmounted
            shutil.rmtree(tmp, ignore_errors=True)
            if tmp.exists():
                log(f"  warning: could not remove all of {tmp}")
            else:
                log(f"  removed {tmp}")
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    if run is None:
        return code or 1
    names = [t.name for t in run.targets]
    if args.replicas:
        pairs = [(S3X3, S3X1)] + ([(S3X1, "local")] if "local" in names else [])
        who = "the first target (s3x3 in s3x3/s3x1)"
    else:
        pairs = [("agentmount", "local")] + ([("agentmount", "juicefs")] if "juicefs" in names else [])
        who = "agentmount"
    rows = summarize(run, pairs)
    accept = acceptance(rows) if args.replicas else {}
    print()
    print(f"agentmount benchmark{' --replicas' if args.replicas else ''} {stamp}"
          f"{' (--quick: sizes/counts / 8)' if args.quick else ''}"
          f"{' (INTERRUPTED: partial)' if interrupted else ''}")
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, python {platform.python_version()}")
    for t in run.targets:
        print(f"  {t.name}: {descriptions.get(t.name, '')}")
    print(f"medians of {args.repeat} run(s) each ({args.repeat_big} for the {wl.human_bytes(sz.seq_bytes)} figures)")
    print()
    print(table(rows, names, pairs))
    ct = cpu_table(run)
    if ct:
        print()
        print("CPU per step (medians; a step's wall time includes untimed parts: generating the random data,")
        print("the cold read's remount; 'other procs' = machine busy time not used by daemon/servers/bench):")
        print(ct)
    if accept:
        print()
        print("issue 3 acceptance (sequential throughput with three replicas >= 0.8x of one replica):")
        for key, a in accept.items():
            verdict = "no figure" if a["ok"] is None else "PASS" if a["ok"] else "FAIL"
            print(f"  {key:<17} s3x3/s3x1 {fmt_ratio(a['ratio']):>6}  (need x{a['required']:.2f})  {verdict}")
    print()
    print("notes:")
    print(f"  * ratio columns num/den are SPEED ratios, > 1 means {who} is faster: rate/rate for MiB/s, ops/s,")
    print("    files/s; den_time/num_time for the figures in seconds (lower seconds are better).")
    print("  * sequential writes: 1 MiB write() calls, then fsync, then close; the time covers all of it,")
    print("    because agentmount's close() is durable (it returns once the data is committed to the store).")
    if args.replicas:
        print("  * s3x1: agentmount over one SeaweedFS S3 store; s3x3: over three (replicated, write_quorum 2: a")
        print("    write returns once two replicas have it, the third finishes in the background). Same [fs] and")
        print("    [cache] settings (the defaults). The servers are `weed mini` processes on 127.0.0.1 of THIS")
        print(f"    machine ({os.cpu_count()} cores): they share its CPUs and disk with the daemon and the benchmark, so")
        print("    s3x3 also pays for three servers' work on the same cores (no network between them).")
        print("  * cold reads: the mount is unmounted, its disk block cache ([cache] dir) emptied, and it is")
        print("    mounted again (memory cache empty); the kernel page cache is dropped for every target")
        print("    (sync; echo 3 > /proc/sys/vm/drop_caches); warm = read again right away.")
    else:
        print("  * cold reads: owned mounts are unmounted and remounted (JuiceFS block cache emptied), and for every")
        print("    target the kernel page cache is dropped (sync; echo 3 > /proc/sys/vm/drop_caches); warm = read again")
        print("    right away. 4 KiB random reads are cold too (cache dropped before each run).")
    for name, v in run.state.items():
        if "warm_read_requests" in v:
            print(f"  * warm re-reads on {name}: {v['warm_read_requests']} READ requests reached its daemon per run"
                  " (0: served from the kernel page cache).")
    if args.target:
        print("    --target is not a mount this benchmark owns, so it is not remounted: a daemon's own memory")
        print("    cache may still serve the 'cold' reads there.")
    if not args.replicas:
        print("  * tar: GNU tar -xf of a stdlib tarball (no fsync; agentmount's close() per file is still durable);")
        print("    rm -rf of the extracted tree is timed separately.")
    if run.errors:
        print()
        print(f"ERRORS ({len(run.errors)}):")
        for e in run.errors:
            print(f"  - {e['target']}: {e['step']}: {e['error']}")
            if e.get("log_tail"):
                print("    log tail:\n" + "\n".join("      " + s for s in e["log_tail"].splitlines()[-15:]))
        code = code or 1
    for name, probs in problems.items():
        if probs:
            print()
            print(f"{name} daemon log has {len(probs)} error line(s) ({logs_kept.get(name, '')}):")
            for p in probs:
                print("  " + p)

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{stamp}{'-replicas' if args.replicas else ''}.json"
    out.write_text(json.dumps({
        "timestamp": stamp, "argv": sys.argv, "mode": "replicas" if args.replicas else "default",
        "quick": args.quick, "interrupted": interrupted,
        "repeat": args.repeat, "repeat_big": args.repeat_big, "sizes": asdict(sz),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "targets": descriptions,
        "ratios": [{"key": ratio_key(n, d), "num": n, "den": d} for n, d in pairs],
        "ratio_meaning": "speed ratio num/den, > 1 means num is faster (time figures: den_s / num_s)",
        "acceptance": accept,
        "figures": rows, "errors": run.errors, "daemon_logs": logs_kept,
        "cpu_per_step": run.cpu,
        "warm_read_fuse_requests": {name: v["warm_read_requests"] for name, v in run.state.items()
                                    if "warm_read_requests" in v},
        "agentmount_log_problems": problems.get("agentmount", []),
        "daemon_log_problems": problems,
    }, indent=2))
    print()
    print(f"results: {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
