"""Object stores: the interface every store implements and its implementations.

The rest of agentmount only talks to `ObjectStore`; which stores exist and how
they are replicated is decided by `backend.open_store` from the configuration.
"""
from backend.store import (
    AlreadyExists,
    NotFound,
    ObjectInfo,
    ObjectStore,
    StoreError,
    StoreUnavailable,
)
from backend.local import LocalStore

__all__ = [
    "AlreadyExists",
    "LocalStore",
    "NotFound",
    "ObjectInfo",
    "ObjectStore",
    "StoreError",
    "StoreUnavailable",
]
