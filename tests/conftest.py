"""Fixtures: real FUSE mounts of agentmount in per-test directories."""
from __future__ import annotations

import os

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


# -- SeaweedFS S3 servers ------------------------------------------------------------------
# S3 tests always pass credentials: never let botocore's credential chain probe the EC2
# instance metadata address.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def seaweed_cluster(tmp_path_factory):
    """Factory: seaweed_cluster(n=3, bucket="agentmount") -> n started `SeaweedServer`s (see
    tests/seaweed.py), each in its own temp dir with `bucket` created. All are killed and
    their data and sockets removed at the end of the test, also when it fails."""
    from tests.seaweed import SeaweedServer, start_all

    made: list[SeaweedServer] = []

    def factory(n: int = 3, bucket: str | None = "agentmount") -> list[SeaweedServer]:
        new = [SeaweedServer(tmp_path_factory.mktemp("seaweed")) for _ in range(n)]
        made.extend(new)
        start_all(new)
        if bucket:
            for s in new:
                s.create_bucket(bucket)
        return new

    yield factory
    for s in made:
        s.cleanup(graceful=False)
