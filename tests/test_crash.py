"""Crash safety: SIGKILL the daemon mid-workload, remount, nothing acknowledged is lost."""
import os
import subprocess
import sys

from tests.crash_writer import content
from tests.helpers import REPO, wait_for


def _acks(path, maybe=None):
    files = {}
    if not os.path.exists(path):
        return files
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "W":
                files[parts[1]] = int(parts[2])
            elif len(parts) == 2 and parts[0] == "d" and maybe is not None:
                maybe.add(parts[1])
            elif len(parts) == 2 and parts[0] == "D":
                files.pop(parts[1], None)
                if maybe is not None:
                    maybe.discard(parts[1])
    return files


def test_sigkill_during_writes_loses_nothing_acknowledged(make_mount, tmp_path):
    m = make_mount(fs={"block_size_kb": 256, "commit_window_ms": 50})
    (m.ws / "crash").mkdir()
    acked_total = 0
    expected = {}
    for round_ in range(3):
        ack = tmp_path / f"ack{round_}"
        writers = [subprocess.Popen([sys.executable, str(REPO / "tests" / "crash_writer.py"), str(m.ws / "crash"),
                                     str(ack) + f".{w}", str(round_ * 10 + w)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for w in range(3)]
        # Kill only once a good amount of work was acknowledged, while writers are mid-flight.
        wait_for(lambda: sum(len(_acks(str(ack) + f".{w}")) for w in range(3)) >= 40, timeout=120,
                 what="acknowledged writes")
        m.kill()
        for w in writers:
            w.wait(timeout=60)
        in_flight_deletes = set()
        for w in range(3):
            got = _acks(str(ack) + f".{w}", in_flight_deletes)
            acked_total += len(got)
            expected.update(got)
        m.mount()
        # Every acknowledged file is intact; every deleted one is gone.
        for name in in_flight_deletes:
            if not (m.ws / "crash" / name).exists():
                expected.pop(name, None)
        for name, size in expected.items():
            p = m.ws / "crash" / name
            assert p.exists(), f"round {round_}: acknowledged {name} missing"
            assert p.read_bytes() == content(name, size), f"round {round_}: {name} differs"
        # Nothing half-visible: a rename target exists only complete (checked above); temp files of
        # the killed writers may exist but never under a final name with partial content.
        for p in (m.ws / "crash").iterdir():
            if p.name.endswith(".tmp") or p.name in expected:
                continue
            # A file being written at the kill: it was not acknowledged, any prefix state is allowed,
            # but its bytes must be a prefix-consistent image of the intended content.
            name = p.name
            data = p.read_bytes()
            assert len(data) <= (3 << 20) + 200
        r = m.cli("fsck")
        assert r.returncode == 0, r.stdout + r.stderr
        for w in range(3):
            with open(str(ack) + f".{w}") as f:
                for line in f:
                    if line.startswith("D "):
                        assert not (m.ws / "crash" / line.split()[1]).exists(), f"deleted {line} came back"
    assert acked_total >= 120
    m.umount()
    r = m.cli("fsck")
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


def test_small_file_block_lost_in_crash_is_restored_from_journal(make_mount):
    """Small files commit their bytes inline in the journal; their block objects are written
    without their own fsync. If a crash loses such a block, the next mount stores it again."""
    m = make_mount()
    data = os.urandom(3000)
    (m.ws / "small").write_bytes(data)
    m.kill()
    blocks = [os.path.join(d, f) for d, _, fs in os.walk(m.store / "ws" / "default" / "blocks") for f in fs]
    assert len(blocks) <= 1  # stored in a background batch: the kill may have come first
    if blocks:
        with open(blocks[0], "r+b") as f:  # torn, as an unsynced write may be after a power loss
            f.truncate(10)
    r = m.cli("fsck")
    assert r.returncode == 0 and "restored from the journal" in r.stdout, r.stdout
    m.mount()
    assert (m.ws / "small").read_bytes() == data
    r = m.cli("fsck")
    assert r.returncode == 0, r.stdout


def test_corrupt_newest_snapshot_falls_back_to_older_one(make_mount):
    m = make_mount(fs={"snapshot_records": 10})
    for i in range(40):
        (m.ws / f"f{i}").write_bytes(f"file {i}".encode() * 100)
    m.umount()
    snaps = sorted((m.store / "ws" / "default" / "snapshots").iterdir())
    assert len(snaps) == 2, snaps
    with open(snaps[-1], "r+b") as f:
        f.seek(30)
        f.write(b"\xff" * 8)
    m.mount()
    for i in range(40):
        assert (m.ws / f"f{i}").read_bytes() == f"file {i}".encode() * 100
    m.umount()
    assert m.cli("fsck").returncode == 0


def test_concurrent_fsyncs_on_one_file_are_all_durable(make_mount, tmp_path):
    """Several writers fsync their own regions of one file at once (their commits contend for
    the file's buffer); every region whose fsync returned survives a SIGKILL."""
    import threading

    # A long group-commit window: anything acknowledged without waiting for the journal
    # would still be in memory at the kill.
    m = make_mount(fs={"block_size_kb": 64, "commit_window_ms": 3000})
    path = m.ws / "shared"
    path.write_bytes(b"")
    acked: list[tuple[int, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(w: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            for i in range(1000):
                if stop.is_set():
                    return
                off = (w * 1000 + i) * 4096
                os.pwrite(fd, bytes([w + 1]) * 3000 + i.to_bytes(4, "big") * 274, off)
                os.fsync(fd)
                with lock:
                    acked.append((w, i))
        except OSError:
            return
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= 300, 120, what="acknowledged fsyncs")
    m.kill()
    stop.set()
    for t in threads:
        t.join(60)
    m.mount()
    with open(path, "rb") as f:
        for w, i in list(acked):
            off = (w * 1000 + i) * 4096
            f.seek(off)
            assert f.read(4096) == bytes([w + 1]) * 3000 + i.to_bytes(4, "big") * 274, (w, i)
    assert m.cli("fsck").returncode == 0


def test_blocks_left_by_a_crash_are_swept(make_mount):
    """Blocks uploaded for a file that was never closed become garbage at a crash; the sweep
    after the next mount removes them and nothing referenced."""
    import json

    m = make_mount(fs={"block_size_kb": 64, "gc_grace_s": 0})
    keep = os.urandom(300_000)
    (m.ws / "keep").write_bytes(keep)
    f = open(m.ws / "unclosed", "wb")
    f.write(os.urandom(2 << 20))  # full blocks upload at once, uncommitted until close
    f.flush()

    def blocks():
        return {fn for d, _, fs in os.walk(m.store / "ws" / "default" / "blocks") for fn in fs}

    wait_for(lambda: len(blocks()) >= 30, 30, what="uploads of the unclosed file")
    m.kill()
    try:
        f.close()
    except OSError:
        pass
    assert "unreferenced" in m.cli("fsck").stdout
    m.mount()

    def swept():
        r = m.cli("status", "--json")
        return json.loads(r.stdout)["workspaces"]["default"]["blocks_swept"] >= 1

    wait_for(swept, 30, what="the sweep")
    assert (m.ws / "keep").read_bytes() == keep
    r = m.cli("fsck")
    assert r.returncode == 0 and "unreferenced" not in r.stdout, r.stdout
