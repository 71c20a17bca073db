"""File locks: the lock table (pure logic, table.py); the FUSE-facing service is vfs/locking.py."""
from agentmount.locks.table import (F_RDLCK, F_UNLCK, F_WRLCK, LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN, OFFSET_MAX,
                                    Conflict, LockTable, Result, Waiter)

__all__ = ["F_RDLCK", "F_UNLCK", "F_WRLCK", "LOCK_EX", "LOCK_NB", "LOCK_SH", "LOCK_UN", "OFFSET_MAX", "Conflict",
           "LockTable", "Result", "Waiter"]
