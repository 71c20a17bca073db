"""An "agent container" for tests: runs inside its own mount namespace (started by unshare)
and does what its stdin asks, one JSON command per line, one JSON answer per line.

Commands: ["sh", cmd] -> [rc, out]; ["write", path, text]; ["read", path] -> text or
[errno]; ["ismount", path]; ["listdir", path]; ["exit"]. Errors come back as
{"errno": n} so the test sees what an agent would see (e.g. ENOTCONN).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def run(cmd: list) -> object:
    op = cmd[0]
    try:
        if op == "sh":
            r = subprocess.run(cmd[1], shell=True, capture_output=True, text=True, timeout=60)
            return [r.returncode, r.stdout + r.stderr]
        if op == "write":
            with open(cmd[1], "w") as f:
                f.write(cmd[2])
            return True
        if op == "read":
            with open(cmd[1]) as f:
                return f.read()
        if op == "ismount":
            return os.path.ismount(cmd[1])
        if op == "listdir":
            return sorted(os.listdir(cmd[1]))
    except OSError as e:
        return {"errno": e.errno}
    return {"error": f"unknown command {op}"}


def main() -> None:
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd[0] == "exit":
            return
        print(json.dumps(run(cmd)), flush=True)


if __name__ == "__main__":
    main()
