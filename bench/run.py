#!/usr/bin/env python3
"""agentmount benchmark: the same workload on a plain local directory, agentmount and (if it can be
had) JuiceFS; one table of medians plus a JSON file in bench/results/.

    python bench/run.py                  # mounts its own agentmount (+ JuiceFS) in a temp dir
    python bench/run.py --quick          # sizes / counts scaled down 8x
    python bench/run.py --target DIR     # DIR (e.g. a mounted agentmount workspace) vs local only

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
                res = self.guarded(t, ph.name, ph.keys, lambda: ph.step(t, rep))
                if res is None:
                    failed.add(t.name)
                    continue
                parts = []
                for k, secs in res.items():
                    self.samples.setdefault(k, {}).setdefault(t.name, []).append(secs)
                    a = self.amount(k)
                    unit = next(f.unit for f in self.figs if f.key == k)
                    parts.append(f"{k} {secs:.3f} s" if a is None else f"{k} {fmt_num(a / secs)} {unit} ({secs:.3f} s)")
                log(f"  {t.name:<10} run {rep + 1}/{n}: " + ", ".join(parts))
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
        warm = wl.seq_read(path, sz.seq_bytes, sz.piece)
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

def summarize(r: Run) -> list[dict]:
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

        def ratio(other: str) -> float | None:
            am, ot = row["results"].get("agentmount"), row["results"].get(other)
            if not am or not ot:
                return None
            # speed ratio: > 1 means agentmount is faster
            return ot["median_seconds"] / am["median_seconds"] if f.is_time else am["median"] / ot["median"]

        row["ratio_agentmount_local"] = ratio("local")
        if any(t.name == "juicefs" for t in r.targets):
            row["ratio_agentmount_juicefs"] = ratio("juicefs")
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


def table(rows: list[dict], names: list[str]) -> str:
    cols = ["figure"]
    for n in names:
        cols.append(n)
        if n == "agentmount":
            cols.append("agentmount/local")
        if n == "juicefs":
            cols.append("agentmount/juicefs")
    lines = []
    for row in rows:
        line = [row["title"]]
        for n in names:
            line.append(cell(row, n))
            if n in ("agentmount", "juicefs"):
                rv = row.get("ratio_agentmount_local" if n == "agentmount" else "ratio_agentmount_juicefs")
                line.append("-" if rv is None else f"x{rv:.2f}" if rv >= 0.1 else f"x{rv:.2g}")
        lines.append(line)
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    fmt = lambda l: "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(l, widths)))  # noqa: E731
    out = [fmt(cols), "  ".join("-" * w for w in widths)]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def close_fds_under(root: Path) -> None:
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(root) + "/"):
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
    p.add_argument("--repeat-big", type=int, default=1, help="runs per 1 GiB figure (median; default 1)")
    p.add_argument("--no-juicefs", action="store_true", help="skip the JuiceFS comparison")
    p.add_argument("--tmpdir", type=Path, default=None, help="where the temp area goes (default: $TMPDIR or /tmp)")
    p.add_argument("--step-timeout", type=float, default=900.0,
                   help="seconds before one step counts as hung (an owned mount is then killed)")
    a = p.parse_args(argv)
    if a.repeat < 1 or a.repeat_big < 1:
        p.error("--repeat and --repeat-big must be >= 1")
    return a


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
    wd = Watchdog(args.step_timeout)
    wd.start()
    run: Run | None = None
    problems: dict[str, list[str]] = {}
    descriptions: dict[str, str] = {}
    code = 0
    interrupted = False
    try:
        log(f"agentmount bench{' --quick' if args.quick else ''}: temp area {tmp}, python {sys.executable}")
        tarball, tar_entries = wl.stdlib_tarball(sz.tar_every, log)
        log(f"tarball {tarball} ({tar_entries} entries, {tarball.stat().st_size / wl.MiB:.0f} MiB)")

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
        for t in targets:
            descriptions[t.name] = t.describe()
            log(f"target {t.name}: {descriptions[t.name]}")

        run = Run(args, sz, wl.figures(sz), targets, wd)
        for ph in build_phases(run, tarball, tar_entries):
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
            close_fds_under(tmp)  # an fd left open by an interrupted step would make the unmount EBUSY
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
            problems = {t.name: log_problems(t.log_path) for t in created if t.name == "agentmount"}
            for t in created:
                for mp in (getattr(t, "mp", None),):
                    if mp is not None and tg.is_mounted(mp):
                        tg.lazy_detach(mp)
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
    rows = summarize(run)
    names = [t.name for t in run.targets]
    print()
    print(f"agentmount benchmark {stamp}{' (--quick: sizes/counts / 8)' if args.quick else ''}"
          f"{' (INTERRUPTED: partial)' if interrupted else ''}")
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, python {platform.python_version()}")
    for t in run.targets:
        print(f"  {t.name}: {descriptions.get(t.name, '')}")
    print(f"medians of {args.repeat} run(s) each ({args.repeat_big} for the {wl.human_bytes(sz.seq_bytes)} figures)")
    print()
    print(table(rows, names))
    print()
    print("notes:")
    print("  * ratio columns are SPEED ratios, > 1 means agentmount is faster: rate/rate for MiB/s, ops/s, files/s;")
    print("    other_time/agentmount_time for the figures in seconds (lower seconds are better).")
    print("  * sequential writes: 1 MiB write() calls, then fsync, then close; the time covers all of it,")
    print("    because agentmount's close() is durable (it returns once the data is committed to the store).")
    print("  * cold reads: owned mounts are unmounted and remounted (JuiceFS block cache emptied), and for every")
    print("    target the kernel page cache is dropped (sync; echo 3 > /proc/sys/vm/drop_caches); warm = read again")
    print("    right away. 4 KiB random reads are cold too (cache dropped before each run).")
    if args.target:
        print("    --target is not a mount this benchmark owns, so it is not remounted: a daemon's own memory")
        print("    cache may still serve the 'cold' reads there.")
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
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps({
        "timestamp": stamp, "argv": sys.argv, "quick": args.quick, "interrupted": interrupted,
        "repeat": args.repeat, "repeat_big": args.repeat_big, "sizes": asdict(sz),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "targets": descriptions,
        "ratio_meaning": "speed ratio, > 1 means agentmount is faster (time figures: other_s / agentmount_s)",
        "figures": rows, "errors": run.errors, "daemon_logs": logs_kept,
        "agentmount_log_problems": problems.get("agentmount", []),
    }, indent=2))
    print()
    print(f"results: {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
