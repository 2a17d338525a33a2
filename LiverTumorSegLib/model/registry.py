"""Where models come from: bundled, a local folder, or a registered download.

* **Bundled** models live in ``LiverTumorSegLib/models/<name>/`` and travel with the
  package (and with the Slicer extension).
* **Local**: any folder holding ``model.json`` and its weights.
* **Registered downloads**: entries ``{name, url, sha256, description}`` in
  ``LiverTumorSegLib/models/registry.json`` and, optionally, in the JSON file named by
  ``LIVERTUMORSEG_REGISTRY``. The archive (a ``.zip`` of a model folder) is fetched on
  first use into the cache folder, verified against its SHA-256, extracted and moved
  into place atomically.

The cache folder is ``$LIVERTUMORSEG_CACHE`` if set, else
``$XDG_CACHE_HOME/livertumorseg/models`` (``~/.cache/livertumorseg/models``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import ModelError
from .card import CARD_NAME
from .loading import sha256_of

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "demo-phantom"
CACHE_ENV = "LIVERTUMORSEG_CACHE"
REGISTRY_ENV = "LIVERTUMORSEG_REGISTRY"


@dataclass
class ModelEntry:
    """One model the engine knows about."""

    name: str
    source: str  # "bundled", "cached", "registered" or "local"
    path: Optional[Path] = None
    url: str = ""
    sha256: str = ""
    description: str = ""

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
                entries.append(ModelEntry(
                    name=str(item["name"]), source="registered", url=str(item["url"]),
                    sha256=str(item["sha256"]).lower(), description=str(item.get("description", "")),
                ))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"model registry {path} is invalid: {exc!r}") from None
    return entries


def list_models() -> list:
    """Every bundled, cached and registered model (registered ones say if cached)."""
    found = {}
    if BUNDLED_DIR.is_dir():
        for card in sorted(BUNDLED_DIR.glob(f"*/{CARD_NAME}")):
            found[card.parent.name] = ModelEntry(card.parent.name, "bundled", card.parent, description=_describe(card))
    for entry in _registry_entries():
        cached = cache_dir() / entry.name
        if (cached / CARD_NAME).is_file():
            entry.path = cached
            entry.source = "cached"
        found.setdefault(entry.name, entry)
    return list(found.values())


def _describe(card_path: Path) -> str:
    try:
        return str(json.loads(card_path.read_text(encoding="utf-8")).get("description", ""))[:120]
    except (OSError, ValueError):
        return "(unreadable model.json)"


def resolve_model(name_or_path: Optional[str] = None, *, download: bool = True,
                  progress: Optional[Callable[[float, str], None]] = None) -> Path:
    """Return the folder of a model given a name or a path.

    A path to an existing folder is used as is; otherwise the name is looked up among
    bundled, cached and registered models, downloading a registered one if needed.
    ``None`` means the default bundled model.
    """
    spec = name_or_path or DEFAULT_MODEL
    as_path = Path(spec).expanduser()
    if as_path.is_dir():
        if not (as_path / CARD_NAME).is_file():
            raise ModelError(f"{as_path} is not a model folder: it has no {CARD_NAME}")
        return as_path.resolve()
    entries = {e.name: e for e in list_models()}
    entry = entries.get(spec)
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
        raise ModelError(f"model {spec!r} is registered but not downloaded yet")
    return download_model(entry, progress=progress)


def download_model(entry: ModelEntry, *, progress: Optional[Callable[[float, str], None]] = None) -> Path:
    """Fetch, verify and unpack a registered model into the cache, atomically."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the model cache {root}: {exc}; set {CACHE_ENV}") from None
    target = root / entry.name
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.download-", dir=root))
    try:
        archive = work / "model.zip"
        _fetch(entry.url, archive, progress)
        actual = sha256_of(archive)
        if actual != entry.sha256:
            raise ModelError(
                f"download of model {entry.name!r} failed verification: expected SHA-256 "
                f"{entry.sha256[:16]}..., got {actual[:16]}...; nothing was installed"
            )
        unpacked = work / "unpacked"
        _extract(archive, unpacked)
        cards = list(unpacked.rglob(CARD_NAME))
        if len(cards) != 1:
            raise ModelError(f"the archive of model {entry.name!r} must hold exactly one {CARD_NAME}")
        if target.exists():
            shutil.rmtree(target)  # a broken earlier install: it has no model.json
        os.replace(cards[0].parent, target)
        if not (target / CARD_NAME).is_file():
            raise ModelError(f"could not install model {entry.name!r} into {target}")
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fetch(url: str, dest: Path, progress: Optional[Callable[[float, str], None]]) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while True:
                block = response.read(1 << 20)
                if not block:
                    break
                out.write(block)
                done += len(block)
                if progress and total:
                    progress(done / total, f"downloading model ({done >> 20} MiB)")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ModelError(
            f"cannot download the model from {url}: {getattr(exc, 'reason', exc)}. "
            "Are you offline? Download it elsewhere and pass --model PATH to the unpacked folder."
        ) from None


def _extract(archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                resolved = (dest / member).resolve()
                if not str(resolved).startswith(str(dest.resolve())):
                    raise ModelError(f"refusing archive member outside the target folder: {member}")
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"downloaded model archive is not a valid zip file: {exc}") from None
