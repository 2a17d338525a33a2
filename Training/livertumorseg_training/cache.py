"""The preprocessing cache: every case once on the model grid, as memory-mappable ``.npy``.

One pass (in parallel, with a progress bar) reads each image and label, checks them,
reorients and resamples them with the engine's own code
(:func:`LiverTumorSegLib.preprocess.to_model_grid` for the CT, nearest neighbour for
the labels) and stores ``<case>_ct.npy`` (int16 HU) and ``<case>_label.npy`` (uint8).
Arrays are (z, y, x) in the model orientation, exactly what the engine feeds the
network before intensity scaling.

``manifest.json`` holds the preprocessing parameters (with a fingerprint of the code
that reads and resamples the data) and, per case, the model-grid geometry and the source
files' size and modification time. A changed source file rebuilds that case.

The default cache folder is named by its preprocessing (:func:`default_cache_dir`: the
grid and a hash of :func:`cache_params`), so a run with other parameters or code (a
``git pull`` between two folds) builds a folder of its own and never deletes the arrays
under a run still reading the old one. A folder given with ``--cache-dir`` whose
manifest differs is refused, because another run may be reading it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .dataset import Case
from .errors import DatasetError

MANIFEST = "manifest.json"
CACHE_FORMAT = 1
ALLOWED_LABELS = (0, 1, 2)


#: The modules whose code decides what the cache holds (reading, checks, resampling).
CODE_MODULES = ("LiverTumorSegLib.io", "LiverTumorSegLib.volume", "LiverTumorSegLib.preprocess",
                "LiverTumorSegLib.model.card", "livertumorseg_training.cache", "livertumorseg_training.dataset")


_CODE_FINGERPRINT: List[str] = []  # computed once: the code this process runs, not what is on disk later


def code_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) of the source of :data:`CODE_MODULES`: an edit to
    the preprocessing gives another cache, even without a version change. Read once per
    process, so a long-lived process (a notebook, a loop over folds) keeps describing the
    code it imported after the files change on disk."""
    if not _CODE_FINGERPRINT:
        import importlib

        digest = hashlib.sha256()
        for name in CODE_MODULES:
            digest.update(Path(importlib.import_module(name).__file__).read_bytes())
        _CODE_FINGERPRINT.append(digest.hexdigest()[:16])
    return _CODE_FINGERPRINT[0]


def cache_params(config: dict) -> dict:
    """The preprocessing parameters a cache depends on (its identity)."""
    from LiverTumorSegLib import __version__

    return {
        "format": CACHE_FORMAT,
        "spacing_mm": [float(s) for s in config["data"]["spacing_mm"]],
        "orientation": str(config["data"]["orientation"]).upper(),
        "image_resampling": "linear, outside = -1024 HU (LiverTumorSegLib.preprocess.to_model_grid)",
        "label_resampling": "nearest, outside = 0",
        "image_dtype": "int16",
        "engine_version": __version__,
        "code": code_fingerprint(),
    }


def default_cache_dir(data_dir: Path, config: dict) -> Path:
    """``<data-dir>/.livertumorseg-cache/<spacing>-<orientation>-<hash>``, the hash the
    first 8 hex digits of the SHA-256 of :func:`cache_params` (code fingerprint
    included): other preprocessing, another folder."""
    sx, sy, sz = (float(s) for s in config["data"]["spacing_mm"])
    params = hashlib.sha256(json.dumps(cache_params(config), sort_keys=True).encode("utf-8")).hexdigest()[:8]
    tag = f"{sx:g}x{sy:g}x{sz:g}mm-{str(config['data']['orientation']).upper()}-{params}"
    return Path(data_dir).expanduser().resolve() / ".livertumorseg-cache" / tag


def other_caches(cache_dir: Path) -> List[Path]:
    """The other cache folders beside ``cache_dir`` (made with other preprocessing), for
    the user to delete once no run reads them."""
    cache_dir = Path(cache_dir)
    try:
        siblings = [p for p in cache_dir.parent.iterdir() if p != cache_dir and p.is_dir()
                    and (p / MANIFEST).is_file()]
    except OSError:
        return []
    return sorted(siblings)


def _source_stamp(path: Path) -> list:
    st = Path(path).stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def _grid_card(params: dict):
    from LiverTumorSegLib.model.card import ModelCard

    return ModelCard(name="cache", architecture={}, labels={}, spacing_mm=tuple(params["spacing_mm"]),
                     patch_size=(1, 1, 1), weights_file="", weights_sha256="", orientation=params["orientation"])


def check_pair(case_id: str, image, label) -> np.ndarray:
    """Check an image/label pair; returns the label array as uint8.

    Raises :class:`DatasetError` naming the case when shape or geometry differ or the
    label holds values outside {0, 1, 2}.
    """
    if image.array.shape != label.array.shape:
        raise DatasetError(f"case {case_id}: image and label shapes differ (z, y, x): image "
                           f"{image.array.shape}, label {label.array.shape}")
    tol = 1e-3 * max(max(image.spacing), 1.0)
    if not image.same_grid(label, tol=tol):
        raise DatasetError(
            f"case {case_id}: image and label geometry differ: spacing {image.spacing} vs {label.spacing}, "
            f"origin {image.origin} vs {label.origin}, direction {image.direction.round(4).tolist()} vs "
            f"{label.direction.round(4).tolist()}; re-export the label on the image's grid"
        )
    values = np.unique(label.array)
    bad = [v for v in values.tolist() if v not in ALLOWED_LABELS]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:8])
        raise DatasetError(f"case {case_id}: label values {shown} are outside {{0, 1, 2}} "
                           "(0 background, 1 liver, 2 tumor)")
    return label.array.astype(np.uint8)


def preprocess_case(case: Case, params: dict, out_dir: Path) -> dict:
    """Read, check, resample and store one case; returns its manifest entry."""
    from LiverTumorSegLib.errors import InputError
    from LiverTumorSegLib.io import read_volume
    from LiverTumorSegLib.preprocess import resample_to, to_model_grid
    from LiverTumorSegLib.volume import Volume

    try:
        image = read_volume(case.image)
        label = read_volume(case.label)
    except InputError as exc:
        raise DatasetError(f"case {case.case_id}: {exc}") from None
    label_array = check_pair(case.case_id, image, label)
    hu = to_model_grid(image, _grid_card(params))
    label_grid = resample_to(Volume(label_array, image.spacing, image.origin, image.direction), hu,
                             interpolation="nearest", default_value=0, dtype=np.uint8)
    ct16 = np.clip(np.rint(hu.array), -32768, 32767).astype(np.int16)
    files = {"ct": f"{case.case_id}_ct.npy", "label": f"{case.case_id}_label.npy"}
    _save_npy(out_dir / files["ct"], ct16)
    _save_npy(out_dir / files["label"], label_grid.array)
    counts = np.bincount(label_grid.array.ravel(), minlength=3)
    return {
        "case_id": case.case_id, "files": files,
        "image": str(case.image), "label": str(case.label),
        "source_stamp": {"image": _source_stamp(case.image), "label": _source_stamp(case.label)},
        "shape_zyx": list(ct16.shape), "spacing_mm": list(hu.spacing), "origin_lps": list(hu.origin),
        "direction_lps": hu.direction.tolist(), "source_spacing_mm": list(image.spacing),
        "source_shape_zyx": list(image.array.shape), "label_voxels": [int(c) for c in counts[:3]],
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    # A name of this writer's own: two runs building one case at once (two folds started
    # together) each publish a whole file, instead of one renaming the other's half-written one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial.npy")
    try:
        np.save(tmp, np.ascontiguousarray(array))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _run_case(args) -> dict:
    case, params, out_dir = args
    try:
        return {"ok": preprocess_case(case, params, out_dir)}
    except DatasetError as exc:
        return {"error": str(exc)}


def read_manifest(cache_dir: Path) -> Optional[dict]:
    """The manifest of ``cache_dir``, or None when there is none (or it is unreadable)."""
    path = Path(cache_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _entry_is_fresh(entry: dict, case: Case, cache_dir: Path) -> bool:
    try:
        return (entry["image"] == str(case.image) and entry["label"] == str(case.label)
                and entry["source_stamp"] == {"image": _source_stamp(case.image), "label": _source_stamp(case.label)}
                and all((cache_dir / f).is_file() for f in entry["files"].values()))
    except (OSError, KeyError):
        return False


def build_cache(cases: List[Case], config: dict, cache_dir: Path, workers: Optional[int] = None,
                progress: bool = True, rebuild_stale: bool = True) -> Dict[str, dict]:
    """Make sure every case is in the cache; returns ``{case_id: manifest entry}``.

    Rebuilds single cases whose source files changed. When the preprocessing parameters
    or code differ from the manifest's, rebuilds everything if ``rebuild_stale``, else
    raises :class:`DatasetError` (a folder the user chose may serve another run). Raises
    :class:`DatasetError` listing every bad case (after processing the good ones, so a
    fixed data set resumes).
    """
    from LiverTumorSegLib.atomic import atomic_write_text

    cache_dir = Path(cache_dir)
    params = cache_params(config)
    manifest = read_manifest(cache_dir)
    stale = manifest is not None and manifest.get("params") != params
    if stale:
        old = manifest.get("params") if isinstance(manifest.get("params"), dict) else {}
        changed = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
        if not rebuild_stale:
            raise DatasetError(f"the cache in {cache_dir} was made with other preprocessing ({', '.join(changed)} "
                               "differ); another run may still be reading it. Choose another --cache-dir, or "
                               "delete that folder to rebuild it there.")
        manifest = None
    entries = dict((manifest or {}).get("cases", {}))
    todo = [c for c in cases if not (c.case_id in entries and _entry_is_fresh(entries[c.case_id], c, cache_dir))]
    if stale or todo:  # a complete, fresh cache is only read: it may lie on read-only storage
        _make_writable(cache_dir, clear=stale)
    errors = []
    if todo:
        workers = max(1, min(int(workers or os.cpu_count() or 1), len(todo)))
        jobs = [(case, params, cache_dir) for case in todo]
        bar = _progress_bar(len(todo), f"caching {len(todo)} case(s) at {params['spacing_mm']} mm", progress)
        before = dict(entries)
        try:
            if workers == 1:
                for job in jobs:
                    _collect(_run_case(job), entries, errors, bar)
            else:
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_setup,
                                         initargs=(max(1, (os.cpu_count() or 1) // workers),)) as pool:
                    with _sigint_ignored():  # the workers start with it (see _worker_setup)
                        futures = [pool.submit(_run_case, job) for job in jobs]
                    try:
                        for future in futures:
                            _collect(future.result(), entries, errors, bar)
                    except BaseException:  # Ctrl-C: the cases under way finish (whole files), no new one starts
                        for future in futures:
                            future.cancel()
                        pool.shutdown(wait=True)
                        for future in futures:  # and every case finished by now goes into the manifest
                            if future.done() and not future.cancelled() and future.exception() is None:
                                entry = future.result().get("ok")
                                if entry:
                                    entries[entry["case_id"]] = entry
                        raise
        finally:
            bar.close()
            # also after a stop: the cases cached so far are not done again next time
            if entries != before:  # new cases, or cases rebuilt (a changed source, a missing array)
                atomic_write_text(cache_dir / MANIFEST, json.dumps({"params": params, "cases": entries}, indent=1))
    if errors:
        listed = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DatasetError(f"{len(errors)} case(s) cannot be used:\n  {listed}{more}")
    return {c.case_id: entries[c.case_id] for c in cases}


def _make_writable(cache_dir: Path, clear: bool) -> None:
    """Empty (``clear``) or create ``cache_dir`` and prove a file can be written there;
    a read-only data set (shared storage, where the default cache folder lies) is a
    one-line error naming ``--cache-dir``, not a ``PermissionError`` traceback."""
    import tempfile

    try:
        if clear:
            shutil.rmtree(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise DatasetError(f"cannot write the preprocessed cache in {cache_dir}: {exc.strerror or exc}; "
                           "pass --cache-dir DIR on a writable disk") from None


@contextmanager
def _sigint_ignored():
    """SIGINT ignored while the pool's workers are started, so they start deaf to it (a
    disposition a new process keeps) instead of only once their initializer runs;
    nothing to do outside the main thread, where no handler can be set."""
    import signal

    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _worker_setup(threads: int) -> None:
    """A caching worker: its share of the threads, and deaf to Ctrl-C, which the terminal
    sends to every process of the run: the main process stops the pool (the worker's
    case is finished, not cut off half-written, and no worker prints a traceback)."""
    import signal

    import SimpleITK as sitk

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _collect(result: dict, entries: dict, errors: list, bar) -> None:
    if "ok" in result:
        entries[result["ok"]["case_id"]] = result["ok"]
    else:
        errors.append(result["error"])
    bar.update(1)


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, unit="case")


def load_arrays(entry: dict, cache_dir: Path, mmap: bool = True):
    """(ct int16, label uint8) arrays of a cached case, memory-mapped by default."""
    mode = "r" if mmap else None
    ct = np.load(Path(cache_dir) / entry["files"]["ct"], mmap_mode=mode)
    label = np.load(Path(cache_dir) / entry["files"]["label"], mmap_mode=mode)
    return ct, label


def entry_volume(entry: dict, array: np.ndarray):
    """A :class:`~LiverTumorSegLib.volume.Volume` with a cached case's model-grid geometry."""
    from LiverTumorSegLib.volume import Volume

    return Volume(array=array, spacing=tuple(entry["spacing_mm"]), origin=tuple(entry["origin_lps"]),
                  direction=np.asarray(entry["direction_lps"]))
