"""Atomic output: a killed or failed run leaves nothing half-written.

Single files are written to a temporary name in the same folder and renamed into
place. A set of outputs (the command line's output folder) is written into a staging
folder inside the target when it exists (beside it when it is still to be made) and
moved in only when every file is complete; the files an
earlier run listed that the new set does not have are removed after that. A staging
folder is locked while its run lives, so the next run into the same target removes
those that a run killed outright left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from .errors import OutputError


_CRITICAL = {"depth": 0, "pending": False}


class InterruptedAfterwards(KeyboardInterrupt):
    """A signal that came while outputs were moved in, raised once they all were."""


def defer_interrupt() -> bool:
    """For a signal handler: True (and the interrupt is held) while outputs are being moved
    into place, which must not stop half way; :func:`uninterrupted` raises it after."""
    if _CRITICAL["depth"]:
        _CRITICAL["pending"] = True
        return True
    return False


@contextmanager
def uninterrupted() -> Iterator[None]:
    """A block that a signal handler using :func:`defer_interrupt` does not break into;
    an interrupt that arrived meanwhile is raised (:class:`InterruptedAfterwards`, a
    KeyboardInterrupt) when it ends."""
    _CRITICAL["depth"] += 1
    try:
        yield
    except BaseException:
        _CRITICAL["depth"] -= 1
        if not _CRITICAL["depth"] and _CRITICAL["pending"]:
            _CRITICAL["pending"] = False  # the block failed: the held interrupt wins over its error
            raise KeyboardInterrupt("stopped by signal") from None
        raise
    _CRITICAL["depth"] -= 1
    if not _CRITICAL["depth"] and _CRITICAL["pending"]:
        _CRITICAL["pending"] = False
        raise InterruptedAfterwards("stopped by signal once the outputs were in place")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder.

    Raises :class:`OutputError` (naming the file) when it cannot be written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}; choose a writable output folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(Path(tmp))
        raise OutputError(f"cannot write {path}: {exc}; choose a writable output folder") from None
    except BaseException:
        _remove_quietly(Path(tmp))
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write to; it is renamed to ``path`` on success.

    The temporary name keeps the final suffix(es) so writers that choose a format by
    extension (SimpleITK, for example) still work.
    """
    path = Path(path)
    suffix = "".join(path.suffixes) or ".tmp"
    stem = path.name[: len(path.name) - len(suffix)] if path.suffixes else path.name
    tmp = path.parent / f".{stem}.{uuid.uuid4().hex[:8]}.partial{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove_quietly(tmp)


def check_path_text(path, error=OutputError, what: str = "output") -> None:
    """Refuse a path whose name is not valid UTF-8 (bytes from another system's encoding,
    e.g. a Latin-1 name unpacked from an old zip): SimpleITK's C++ aborts the whole
    process on such a name, with no message and after all the work."""
    try:
        os.fsencode(str(path)).decode("utf-8")
    except UnicodeError:
        shown = os.fsencode(str(path)).decode("utf-8", "replace")
        raise error(f"the {what} path {shown} holds characters that are not valid UTF-8 (a name from another "
                    "system's encoding?), which the image library cannot open; rename it") from None


def check_writable_dir(folder: Path) -> Path:
    """Check that ``folder`` (made later, on success, if it does not exist) can be
    written: it or its nearest existing parent must be a writable folder, and its path
    valid UTF-8 (:func:`check_path_text`)."""
    check_path_text(Path(folder).expanduser().absolute())
    folder = Path(folder).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output path {folder} exists and is not a folder")
    probe_dir = folder if folder.exists() else existing_parent(folder)
    if not probe_dir.is_dir():
        raise OutputError(f"cannot create output folder {folder}: {probe_dir} is a file, not a folder")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {probe_dir}: permission denied; choose another output folder")
    return folder


class StagedOutput:
    """Write a group of files into a staging folder, then publish them all at once.

    Usage::

        with StagedOutput(outdir) as stage:
            write(stage.path / "a.json") ...
        # on success every file now lies in outdir; on any exception none does.

    Files may lie in subfolders of the set; they are published by their relative path.
    ``replaces``: relative paths of files an earlier run wrote into the target (its own
    record, never a guess), or a function giving them, called when publishing (it may
    refuse the target by raising). Those the new set
    does not include (a ``tumor.stl`` when no tumor is found this time) are removed once
    the new files are in; no other file is touched. ``last``: the name to move in after
    all the others (the record of the set). Publishing holds a lock on the target folder
    (POSIX), so two runs writing into one folder publish one after the other and the
    folder ends with the later run's set, not a mix.
    """

    def __init__(self, target: Path, replaces: Union[Iterable[str], Callable[[], Iterable[str]]] = (),
                 last: Optional[str] = None) -> None:
        self.target = check_writable_dir(target)
        self.replaces = replaces if callable(replaces) else tuple(replaces)
        self.last = last
        self.path: Path = Path()
        self.published: list = []
        self.removed: list = []
        self.swept: list = []
        self._lock: Optional[int] = None

    def __enter__(self) -> "StagedOutput":
        # Stage where publishing is a rename: inside a target that exists (it may be a mount
        # point, as Docker's -v host:/output, which nothing can be renamed into from its
        # parent), else in its parent, or in the nearest existing folder above a target
        # whose parent is still to be made (made only on success).
        if self.target.is_dir():
            base = self.target
        else:
            base = self.target.parent if self.target.parent.is_dir() else existing_parent(self.target)
        self.swept = sweep_stale_staging(self.target)
        # Made under a name no sweep looks at, locked for as long as this run lives, and
        # only then given the staging name: a sweep never finds this run's folder unlocked.
        prefix = f".{self.target.name}."
        try:
            made = Path(tempfile.mkdtemp(prefix=prefix + "creating-", dir=base))
        except OSError as exc:
            raise OutputError(f"cannot create a staging folder beside {self.target}: {exc}") from None
        try:
            self._lock = _hold(made)
            self.path = made.with_name(prefix + "partial-" + made.name[len(prefix + "creating-"):])
            os.rename(made, self.path)
        except OSError as exc:
            shutil.rmtree(made, ignore_errors=True)
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None
            raise OutputError(f"cannot create a staging folder beside {self.target}: {exc}") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._publish()
        finally:
            shutil.rmtree(self.path, ignore_errors=True)
            if self._lock is not None:
                os.close(self._lock)

    def _publish(self) -> None:
        # Files by their path inside the set (``imagesTr/liver_0.nii.gz``); the record last.
        names = sorted((item.relative_to(self.path).as_posix() for item in self.path.rglob("*") if item.is_file()),
                       key=lambda name: (name == self.last, name))
        if not self.path.is_dir() or (self.last and self.last not in names):
            # removed under this run (by hand, or by a cleaner that could not see this
            # run's lock): publishing nothing would still remove the earlier run's files
            raise OutputError(f"the staging folder {self.path} lost its files before they could be moved into "
                              f"{self.target}; nothing was changed there, so run again")
        in_the_way = [self.target / name for name in names
                      if (self.target / name).is_dir() and not (self.target / name).is_symlink()]
        if in_the_way:
            raise OutputError(f"cannot write {in_the_way[0]}: a folder of that name is there; move it away or "
                              "choose another output folder")
        try:
            self.target.mkdir(parents=True, exist_ok=True)
            # Waiting for another run's lock can be interrupted; moving the files in cannot
            # (a signal then would leave two runs' files mixed): it is held until they are in.
            with folder_lock(self.target), uninterrupted():
                replaces = self.replaces() if callable(self.replaces) else self.replaces
                for name in names:
                    destination = self.target / name
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self.path / name, destination)
                    self.published.append(destination)
                for name in sorted(set(replaces) - set(names)):
                    stale = self.target / name
                    if stale.is_file() or stale.is_symlink():
                        stale.unlink()
                        self.removed.append(stale)
        except OSError as exc:
            moved = f" ({len(self.published)} of the new files were moved in)" if self.published else ""
            raise OutputError(f"cannot move results into {self.target}: {exc}; the folder may now be "
                              f"incomplete{moved}, so run again") from None


def _hold(folder: Path) -> Optional[int]:
    """A descriptor holding an exclusive lock on ``folder`` (released when it is closed,
    or when the process ends however it ends); None where folders cannot be locked."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def sweep_stale_staging(target: Path) -> list:
    """Remove the staging folders of ``target`` that runs killed outright (SIGKILL, power
    loss) left behind, in ``target`` and beside it. A staging folder is locked for as long
    as its run lives, so one that can be locked now has no run; one whose lock cannot be
    tested (no file locks on that file system, Windows) is left alone. Returns the
    folders removed."""
    try:
        import fcntl
    except ImportError:
        return []
    prefix = f".{target.name}.partial-"  # compared as text: a name may hold glob characters
    removed = []
    for base in {target, target.parent, existing_parent(target)}:
        try:
            found = [path for path in base.iterdir()
                     if path.name.startswith(prefix) and path.is_dir() and not path.is_symlink()]
        except OSError:
            continue
        for folder in found:
            try:
                fd = os.open(folder, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # a live run's (or untestable): not ours to remove
                continue
            try:
                shutil.rmtree(folder, ignore_errors=True)
                if not folder.exists():
                    removed.append(folder)
            finally:
                os.close(fd)
    return removed


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (flock on its descriptor: no lock file left
    behind), waiting for another holder; none where folders cannot be locked (Windows)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: go on without
        yield
    finally:
        os.close(fd)  # releases the lock


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path("/")


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
