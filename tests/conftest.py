"""Fixtures: real FUSE mounts of agentmount in per-test directories."""
from __future__ import annotations

import pytest

from tests.helpers import Mount


@pytest.fixture
def make_mount(tmp_path):
    """Factory: make_mount(**opts) -> mounted Mount; all are unmounted at the end."""
    made: list[Mount] = []

    def factory(name: str = "m", mount: bool = True, **kw) -> Mount:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        m = Mount(root, **kw)
        made.append(m)
        if mount:
            m.mount()
        return m

    yield factory
    for m in made:
        m.cleanup()


@pytest.fixture
def mount(make_mount) -> Mount:
    return make_mount()


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory):
    """One mount shared by a module's tests (each test works in its own subdirectory)."""
    m = Mount(tmp_path_factory.mktemp("shared"))
    m.mount()
    yield m
    m.cleanup()
