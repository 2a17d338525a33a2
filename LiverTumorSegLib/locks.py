"""Exclusive file locks that the operating system releases when their process dies."""

from __future__ import annotations

import os


def lock_now(handle) -> None:
    """Lock the open file ``handle`` exclusively, without waiting: ``flock`` on POSIX,
    ``msvcrt.locking`` of its first byte on Windows. Raises OSError when another process
    holds it (``errno`` EAGAIN, EACCES...) or the file system has no locks."""
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
