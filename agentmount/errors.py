"""Error types shared by the layers below the FUSE front.

`FsError` carries an errno; the FUSE layer is the only place that turns it
into a reply. `ConfigError` carries the offending key for exit status 2.
"""
from __future__ import annotations

import errno
import os


class FsError(Exception):
    """A filesystem operation failed with `errno`."""

    def __init__(self, err: int, msg: str = "") -> None:
        super().__init__(err, msg or os.strerror(err))
        self.errno = err

    def __str__(self) -> str:
        return f"[{errno.errorcode.get(self.errno, self.errno)}] {self.args[1]}"


class ConfigError(Exception):
    """The configuration is invalid; the message names the key."""


class NotFound(ValueError):
    """No such workspace or webhook (the message says which). A ValueError, so whatever reports
    an invalid request (the CLI, the control socket) reports this too; the HTTP API answers 404."""


class MountError(Exception):
    """The filesystem cannot be mounted; the message is the one-line reason."""


class Deposed(Exception):
    """This peer no longer leads the workspace (its lease lapsed or moved): the operation was
    not applied here, or not made durable, and must be retried at the new leader."""
