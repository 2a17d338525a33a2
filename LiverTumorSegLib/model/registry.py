"""Where models come from: bundled, a local folder, or a registered download.

* **Bundled** models live in ``LiverTumorSegLib/models/<name>/`` and travel with the
  package (and with the Slicer extension).
* **Local**: any folder holding ``model.json`` and its weights.
* **Registered downloads**: entries ``{name, url, sha256, description}`` in
  ``LiverTumorSegLib/models/registry.json`` and, optionally, in the JSON file named by
  ``LIVERTUMORSEG_REGISTRY``. The archive (a ``.zip`` of a model folder) is fetched on
  first use into the cache folder, verified against its SHA-256, extracted and moved
  into place atomically, one process at a time (a lock file per model); the installed
  folder records the archive's SHA-256, and a registry entry naming another archive
  makes it outdated (downloaded again on next use). Names are plain
  file names; downloads and archives have size limits (an entry's ``max_mb``, else
  :data:`MAX_DOWNLOAD_BYTES`).

The cache folder is ``$LIVERTUMORSEG_CACHE`` if set, else
``$XDG_CACHE_HOME/livertumorseg/models`` (``~/.cache/livertumorseg/models``).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import ModelError
from ..locks import lock_now
from .card import CARD_NAME
from .loading import sha256_of

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "demo-phantom"
CACHE_ENV = "LIVERTUMORSEG_CACHE"
REGISTRY_ENV = "LIVERTUMORSEG_REGISTRY"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a folder name in the cache, nothing more
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
MAX_DOWNLOAD_BYTES = 2 << 30  # an archive larger than this (or than the entry's max_mb) is refused
MAX_MEMBERS = 1000
LOCK_WAIT_S = 600.0
HEARTBEAT_S = 5.0
#: In a cached model's folder: the SHA-256 of the archive it came from. A registry entry
#: naming another archive makes the cached copy outdated, and it is downloaded again.
SOURCE_RECORD = ".archive-sha256"


@dataclass
class ModelEntry:
    """One model the engine knows about."""

    name: str
    source: str  # "bundled", "cached", "registered" or "local"
    path: Optional[Path] = None
    url: str = ""
    sha256: str = ""
    description: str = ""
    max_bytes: int = MAX_DOWNLOAD_BYTES

    @property
    def installed(self) -> bool:
        return self.path is not None and (self.path / CARD_NAME).is_file()


def cache_dir() -> Path:
    """The folder that downloaded models are cached in."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "livertumorseg" / "models"


def _registry_entries() -> list:
    files = [BUNDLED_DIR / "registry.json"]
    if os.environ.get(REGISTRY_ENV):
        files.append(Path(os.environ[REGISTRY_ENV]).expanduser())
    entries = []
    for path in files:
        if not path.is_file():
            if path != files[0]:
                raise ModelError(f"{REGISTRY_ENV} names {path}, which does not exist")
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            for item in data.get("models", []):
                entry = ModelEntry(
                    name=str(item["name"]), source="registered", url=str(item["url"]),
                    sha256=str(item["sha256"]).lower(), description=str(item.get("description", "")),
                    max_bytes=_max_bytes(item.get("max_mb", MAX_DOWNLOAD_BYTES / 2**20), path),
                )
                if not NAME_PATTERN.match(entry.name):
                    raise ModelError(f"model registry {path}: name {entry.name!r} must be letters, digits, '.', "
                                     "'_' and '-' (a folder name in the cache, at most 64 characters)")
                if not SHA256_PATTERN.match(entry.sha256):
                    raise ModelError(f"model registry {path}: model {entry.name!r} needs a 64-digit hex sha256")
                entries.append(entry)
        except ModelError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"model registry {path} is invalid: {exc!r}") from None
    return entries


def _max_bytes(value, path: Path) -> int:
    megabytes = float(value)
    if not (0 < megabytes < 1 << 30):  # refuses NaN and infinity too
        raise ModelError(f"model registry {path}: max_mb must be a positive number of megabytes, not {value!r}")
    return int(megabytes * 2**20)


def list_models() -> list:
    """Every bundled, cached and registered model (registered ones say if cached)."""
    found = {}
    if BUNDLED_DIR.is_dir():
        for card in sorted(BUNDLED_DIR.glob(f"*/{CARD_NAME}")):
            found[card.parent.name] = ModelEntry(card.parent.name, "bundled", card.parent, description=_describe(card))
    for entry in _registry_entries():
        cached = cache_dir() / entry.name
        if (cached / CARD_NAME).is_file():
            if installed_archive_sha256(cached) == entry.sha256:
                entry.path = cached
                entry.source = "cached"
            else:  # the registry now names another archive (a new or a withdrawn version)
                entry.source = "outdated"
        found.setdefault(entry.name, entry)
    return list(found.values())


def installed_archive_sha256(folder: Path) -> Optional[str]:
    """The SHA-256 of the archive a cached model was installed from (None if unknown)."""
    try:
        return (Path(folder) / SOURCE_RECORD).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _describe(card_path: Path) -> str:
    try:
        return str(json.loads(card_path.read_text(encoding="utf-8")).get("description", ""))[:120]
    except (OSError, ValueError):
        return "(unreadable model.json)"


def resolve_model(name_or_path: Optional[str] = None, *, download: bool = True,
                  progress: Optional[Callable[[float, str], None]] = None) -> Path:
    """Return the folder of a model given a name or a path.

    A path (``./name``, ``~/m``, an absolute path, anything with a separator) is a model
    folder. A plain name is looked up among bundled, cached and registered models first
    (downloading a registered one if needed), so a folder of that name in the current
    directory never replaces one of them; a plain name that is no known model may be a
    folder here. ``None`` means the default bundled model, never a folder.
    """
    spec = name_or_path or DEFAULT_MODEL
    as_path = Path(spec).expanduser()
    if name_or_path is not None and _is_explicit_path(spec):
        return _model_folder(as_path)
    entries = {e.name: e for e in list_models()}
    entry = entries.get(spec)
    if entry is None and name_or_path is not None and as_path.is_dir():
        return _model_folder(as_path)  # a plain name that is no known model, but a folder here
    if entry is None:
        if spec == DEFAULT_MODEL:
            raise ModelError(
                "no model installed: the default model was not found in "
                f"{BUNDLED_DIR}. Train and export one (see the README, 'Models'), or pass "
                "--model PATH to a model folder."
            )
        known = ", ".join(sorted(entries)) or "none"
        raise ModelError(f"unknown model {spec!r}: not a folder, and not among the known models ({known})")
    if entry.installed:
        return entry.path
    if not download:
        if entry.source == "outdated":
            raise ModelError(f"model {spec!r} is cached, but not (or not known to be) from the archive the registry "
                             "names now; it needs downloading again")
        raise ModelError(f"model {spec!r} is registered but not downloaded yet")
    return download_model(entry, progress=progress)


def _is_explicit_path(spec: str) -> bool:
    """A model given as a path (``./name``, ``~/m``, ``/abs``, ``a/b``), not a plain name:
    a plain name means a bundled or registered model first, whatever folder of that name
    the current directory holds."""
    separators = [os.sep] + ([os.altsep] if os.altsep else [])
    return any(sep in spec for sep in separators) or spec.startswith((".", "~")) or Path(spec).is_absolute()


def _model_folder(path: Path) -> Path:
    if path.is_file():
        if path.name == CARD_NAME:
            raise ModelError(f"{path} is a model card: give its folder, {path.parent}")
        hint = ("a training checkpoint: export it first (python Training/export.py CHECKPOINT MODEL_DIR) and give "
                "that folder" if path.suffix.lower() == ".ckpt" else "a file: give the model folder that holds it")
        raise ModelError(f"{path} is not a model folder but {hint}")
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist")
    if not (path / CARD_NAME).is_file():
        raise ModelError(f"{path} is not a model folder: it has no {CARD_NAME}")
    return path.resolve()


def download_model(entry: ModelEntry, *, progress: Optional[Callable[[float, str], None]] = None) -> Path:
    """Fetch, verify and unpack a registered model into the cache, atomically and one
    process at a time."""
    if not NAME_PATTERN.match(entry.name):
        raise ModelError(f"model name {entry.name!r} is not a plain folder name")
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the model cache {root}: {exc}; set {CACHE_ENV}") from None
    target = root / entry.name  # a plain name (checked above): always inside the cache
    lock = root / f".{entry.name}.lock"
    try:
        return _install(entry, root, target, lock, progress)
    except ModelError as exc:
        recorded = installed_archive_sha256(target)
        if (target / CARD_NAME).is_file() and recorded != entry.sha256:
            why = "came from another archive than the registry names now" if recorded else \
                f"has no record ({SOURCE_RECORD}) of the archive it came from"
            raise ModelError(f"{exc} (the copy cached at {target} {why}, so it is not used)") from None
        raise


def _install(entry: ModelEntry, root: Path, target: Path, lock: Path,
             progress: Optional[Callable[[float, str], None]]) -> Path:
    with _install_lock(lock, progress) as locked:
        if (target / CARD_NAME).is_file() and installed_archive_sha256(target) == entry.sha256:
            return target  # another process installed it while this one waited
        leftovers = re.compile(rf"^\.{re.escape(entry.name)}\.download-[A-Za-z0-9_]{{8}}$")
        for leftover in root.iterdir() if locked else ():  # from a killed download of this model
            if leftovers.match(leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.download-", dir=root))
        try:
            archive = work / "model.zip"
            _fetch(entry.url, archive, progress, entry.max_bytes)
            actual = sha256_of(archive)
            if actual != entry.sha256:
                size = archive.stat().st_size
                received = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} bytes"
                raise ModelError(
                    f"download of model {entry.name!r} failed verification: the {received} received from "
                    f"{entry.url} have SHA-256 {actual[:16]}..., the registry expects {entry.sha256[:16]}...; "
                    "nothing was installed. A transfer that was cut or damaged on the way gives this: run again; "
                    "if it persists, the file at that address is not the one the registry entry names"
                )
            unpacked = work / "unpacked"
            _extract(archive, unpacked, entry.max_bytes)
            cards = list(unpacked.rglob(CARD_NAME))
            if len(cards) != 1:
                raise ModelError(f"the archive of model {entry.name!r} must hold exactly one {CARD_NAME}")
            try:
                (cards[0].parent / SOURCE_RECORD).write_text(entry.sha256 + "\n", encoding="utf-8")
                if os.path.lexists(target):  # an outdated or broken earlier install: moved aside in one
                    os.replace(target, work / "replaced")  # step (never seen half-deleted), deleted with work
                os.replace(cards[0].parent, target)
            except OSError as exc:
                raise ModelError(f"could not install model {entry.name!r} into {target}: {exc}") from None
            if not (target / CARD_NAME).is_file():
                raise ModelError(f"could not install model {entry.name!r} into {target}")
            return target
        finally:
            shutil.rmtree(work, ignore_errors=True)


BUSY_ERRNOS = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK)}


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


@contextmanager
def _install_lock(path: Path, progress: Optional[Callable[[float, str], None]] = None,
                  idle_s: float = LOCK_WAIT_S) -> Iterator[bool]:
    """An exclusive lock on ``path`` (flock on POSIX, msvcrt on Windows), released on exit
    and by the system if the process dies; yields whether it is held. The holder touches
    the file every few seconds from a background thread; a waiter gives up only after
    ``idle_s`` of its own clock without seeing the file change. A file system without
    locks (some cluster mounts) is used unlocked, and then yields False."""
    try:
        handle = open(path, "a+b")
    except OSError as exc:
        raise ModelError(f"cannot lock {path}: {exc}; set {CACHE_ENV} to a writable folder for downloaded "
                         "models") from None
    locked = False
    stop = threading.Event()
    try:
        last_seen, since, told = _mtime(path), time.monotonic(), False
        while True:
            try:
                lock_now(handle)
                locked = True
                break
            except OSError as exc:
                if exc.errno not in BUSY_ERRNOS:
                    break  # no locking on this file system: go on without it
                seen = _mtime(path)
                if seen != last_seen:
                    last_seen, since = seen, time.monotonic()
                elif time.monotonic() - since > idle_s:
                    raise ModelError(f"another process has held {path} for {idle_s:.0f} s without progress; "
                                     "if none is installing this model, delete that file and try again") from None
                if progress is not None and not told:
                    progress(0.0, "waiting for another process to finish installing this model")
                    told = True
                time.sleep(0.2)
        if locked:
            def beat() -> None:
                while not stop.wait(HEARTBEAT_S):
                    _touch(path)

            _touch(path)
            threading.Thread(target=beat, name="livertumorseg-install-lock", daemon=True).start()
        yield locked
    finally:
        stop.set()
        if locked and os.name == "nt":
            import msvcrt

            try:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            except OSError:
                pass
        handle.close()  # closing releases a POSIX lock


def _mtime(path: Path) -> Optional[float]:
    try:
        return path.stat().st_mtime
    except OSError:  # deleted meanwhile: no news
        return None


def _fetch(url: str, dest: Path, progress: Optional[Callable[[float, str], None]],
           max_bytes: int = MAX_DOWNLOAD_BYTES) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            if total > max_bytes:
                raise ModelError(f"the model at {url} is {total >> 20} MiB, over the limit of {max_bytes >> 20} MiB "
                                 "(a registry entry's max_mb raises it); nothing was installed")
            done = 0
            while True:
                block = response.read(1 << 20)
                if not block:
                    break
                done += len(block)
                if done > max_bytes:
                    raise ModelError(f"the download from {url} passed the limit of {max_bytes >> 20} MiB "
                                     "(a registry entry's max_mb raises it); nothing was installed")
                out.write(block)
                if progress and total:
                    progress(done / total, f"downloading model ({done >> 20} MiB)")
        if total and done != total:
            raise ModelError(f"the download from {url} was interrupted after {done / 2**20:.1f} of "
                             f"{total / 2**20:.1f} MiB; nothing was installed: run again")
    except http.client.HTTPException as exc:  # a connection cut mid-file, a garbled response
        raise ModelError(f"the download from {url} was interrupted ({type(exc).__name__}); nothing was installed: "
                         "run again") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ModelError(
            f"cannot download the model from {url}: {getattr(exc, 'reason', exc)}. "
            "Are you offline? Download it elsewhere and pass --model PATH to the unpacked folder."
        ) from None


def _extract(archive: Path, dest: Path, max_bytes: int = MAX_DOWNLOAD_BYTES) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            if len(members) > MAX_MEMBERS:
                raise ModelError(f"the model archive holds {len(members)} files, more than {MAX_MEMBERS}")
            unpacked = sum(m.file_size for m in members)
            if unpacked > 2 * max_bytes:
                raise ModelError(f"the model archive unpacks to {unpacked >> 20} MiB, over the limit of "
                                 f"{(2 * max_bytes) >> 20} MiB")
            for member in members:
                if not (dest / member.filename).resolve().is_relative_to(dest.resolve()):
                    raise ModelError(f"refusing archive member outside the target folder: {member.filename}")
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"downloaded model archive is not a valid zip file: {exc}") from None
