"""The README documents every config key, and the example mount.conf is valid."""
from pathlib import Path

from agentmount import config

REPO = Path(__file__).resolve().parent.parent


def test_every_config_key_is_documented():
    readme = (REPO / "README.md").read_text()
    for section, spec in [("node", config._NODE), ("cache", config._CACHE), ("fs", config._FS),
                          ("log", config._LOG), ("replication", config._REPL), ("events", config._EVENTS),
                          ("api", config._API)]:
        for key in spec:
            assert f"`[{section}] {key}" in readme or f", {key}`" in readme or f"`{key}`" in readme, \
                f"{section}.{key} is not documented in README.md"
    for key in ("name", "kind", "path", "fsync"):
        assert f"`[[store]] {key}`" in readme
    for key in config._WEBHOOK:
        assert f"`[[webhook]] {key}`" in readme, f"webhook.{key} is not documented in README.md"
    for key in config._API:
        assert f"`[api] {key}`" in readme, f"api.{key} is not documented in README.md"


def test_example_config_is_valid():
    cfg = config.load(str(REPO / "mount.conf"))
    assert cfg.workspaces == ["default"]
    assert cfg.stores[0].kind == "local"
