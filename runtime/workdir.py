"""The workers' directory: one per running front end, in the temporary folder, removed when
the front end stops. One that a killed front end (kill -9, power loss) left behind is removed
by the next start.

Which directories are stale is decided by a lock, not by a pid that may have been reused: a
front end holds an flock(2) on `.owner` in its directory for as long as it runs, and the
kernel drops it when the process dies, however it dies. A directory whose lock can be taken
has no owner. `.owner` is locked before it gets its name, so no other start can ever see it
unlocked while its owner lives; a directory without one is still being made (or is from an
older valrun) and is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "valrun-workers-"
OWNER = ".owner"


class WorkDir:
    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def claim_workdir() -> WorkDir:
    """Remove stale workers' directories, then make and lock a new one."""
    remove_stale_workdirs(Path(tempfile.gettempdir()))
    path = Path(tempfile.mkdtemp(prefix=PREFIX))
    path.chmod(0o711)  # workers run as another user; they need to reach their own dir
    pending = path / f"{OWNER}.new"
    fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(pending, path / OWNER)
    return WorkDir(path, fd)


def remove_stale_workdirs(tmp: Path) -> int:
    """Remove every workers' directory in `tmp` whose front end is gone; how many."""
    removed = 0
    for path in tmp.glob(PREFIX + "*"):
        # Only real directories of this user: a shared /tmp may hold anyone's look-alikes.
        if path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.geteuid():
            continue
        try:
            fd = os.open(path / OWNER, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # being made right now, or not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its front end is running
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d workers' directories left by a front end that was killed", removed)
    return removed
