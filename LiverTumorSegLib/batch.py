"""Segmenting many CTs in one run (``livertumorseg batch``).

The model loads once. Each input gets its own folder in the output folder, named after
the input, holding what ``segment`` writes, published the same way (all of a case's
files or none). ``batch.csv`` beside those folders lists every case with its status and
headline figures; it is rewritten after each case, so a batch that is stopped or killed
leaves an up-to-date list of what was done. A case that fails (an unreadable file, a
series that is refused, too little memory) is recorded with its reason and the batch
goes on.

This module plans the cases (names, inputs, the list file), decides which earlier
results ``--resume`` may keep, and writes ``batch.csv``; the command line runs the loop.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from .atomic import atomic_write_text, check_path_text
from .errors import InputError, OutputError
from .io import file_identity
from .stats import summary

SUMMARY_NAME = "batch.csv"
#: batch.csv's columns, in order. ``status`` is one of STATUSES.
SUMMARY_COLUMNS = ("case", "status", "liver_ml", "tumor_ml", "lesions", "burden_percent", "warnings",
                   "seconds", "error", "input")
STATUSES = ("done", "done earlier", "failed", "cancelled", "not run")
# Image suffixes dropped from a file's name to name its case (longest first).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# The run settings that decide a case's labels and that ``--resume`` compares, as
# stats.json's ``run`` records them.
RESUME_KEYS = ("input", "input_fingerprint", "series_requested", "engine_version", "model_card_sha256",
               "model_weights_sha256", "precision", "overlap", "weighting", "min_lesion_ml", "window_grid")


@dataclass
class Case:
    """One input of a batch and what became of it."""

    name: str
    input: Path
    series: Optional[str] = None  # the Series Instance UID to read from a DICOM folder
    status: str = "not run"
    summary: dict = field(default_factory=dict)  # stats.summary() of the result
    warnings: List[str] = field(default_factory=list)
    seconds: Optional[float] = None
    error: str = ""

    def row(self) -> dict:
        return {"case": self.name, "status": self.status, **{k: self.summary.get(k, "") for k in
                                                               ("liver_ml", "tumor_ml", "lesions", "burden_percent")},
                "warnings": " | ".join(self.warnings),
                "seconds": "" if self.seconds is None else f"{self.seconds:.1f}",
                "error": self.error, "input": str(self.input)}


#: An input of :func:`plan_cases`: a path, or (case name or None, path, series UID or None).
Entry = Tuple[Optional[str], Path, Optional[str]]


def read_list(list_file: Path) -> List[Entry]:
    """The inputs a list file names, one per line: a path; or a case name, a tab and a
    path; or those, a tab and the Series Instance UID to read from a DICOM folder that
    holds several series. Blank lines and lines starting with ``#`` are skipped; UTF-8
    (with or without a byte-order mark), UTF-16 with one, and Windows line ends are read;
    relative paths are taken from the folder the list file is in (as named, not where a
    link to it points); from the current folder for ``-`` (standard input) and for a list
    that is not a file in a folder (a pipe: ``--list <(find ...)``, ``/dev/stdin``)."""
    piped = str(list_file) == "-"
    list_file = Path(list_file).expanduser()
    try:
        data = sys.stdin.buffer.read() if piped else list_file.read_bytes()
        # UTF-8, with or without a byte-order mark; UTF-16 with one (a spreadsheet's "Unicode text")
        text = data.decode("utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig")
        # /dev/stdin, /dev/fd/N, /proc/self/fd/N: a descriptor, whatever it is connected to
        piped = (piped or not stat.S_ISREG(os.stat(list_file).st_mode)
                 or list_file.absolute().parts[1:2] in (("dev",), ("proc",)))
    except (OSError, UnicodeError) as exc:
        shown = "from standard input" if piped else str(list_file)
        raise InputError(f"cannot read the list of inputs {shown}: {exc}; save it as UTF-8 text") from None
    base = Path.cwd() if piped else list_file.absolute().parent
    entries, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) > 3 or (len(fields) > 1 and not all(fields)):  # an empty cell: a row half filled in
            problems.append(f"line {number} ({line.strip()!r}) is not PATH, NAME<tab>PATH or NAME<tab>PATH<tab>UID")
            continue
        name, path, series = (None, fields[0], None) if len(fields) == 1 else (fields + [None])[:3]
        path = Path(path).expanduser()
        entries.append((name, path if path.is_absolute() else base / path, series))
    if problems:
        raise InputError(f"cannot use the list of inputs {list_file}: " + "; ".join(problems))
    return entries


def case_name(path: Path) -> str:
    """A case's default name: its file's name without the image suffix
    (``liver_3.nii.gz`` → ``liver_3``), or its folder's name for a DICOM series."""
    name = path.name
    if path.is_dir():
        return name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _identity(path: Path) -> tuple:
    """What makes two paths one input: the same file or folder (links and hard links
    included); its resolved path where the file system has no inode numbers."""
    return file_identity(path) or (str(path.resolve()),)


def plan_cases(inputs: Iterable) -> List[Case]:
    """One :class:`Case` per input, in the order given. An input is a path, named by
    :func:`case_name`, or an :data:`Entry` (a name that is not None is the case's).

    Refused before anything runs (:class:`InputError`, every problem listed): no input,
    an input that does not exist, a path that is not valid UTF-8, the same input twice
    (hard links and links included; one DICOM folder may come once per series named), a
    series UID given for a file, an input inside another input's folder, two cases
    of one name (letter case aside, as macOS and Windows see file names: name them in a
    list file), a name that is empty, starts with ``.``, holds a ``/`` or a ``\\``, or is
    ``batch.csv``.
    """
    entries = [item if isinstance(item, tuple) else (None, item, None) for item in inputs]
    if not entries:
        raise InputError("no inputs: give CT files or DICOM folders, or --list FILE")
    # named as given: a link keeps its own name
    paths = [Path(entry[1]).expanduser().absolute() for entry in entries]
    names = [case_name(p) if entry[0] is None else entry[0] for entry, p in zip(entries, paths)]
    problems, seen, taken, naming = [], {}, {}, False
    for entry, path, name in zip(entries, paths, names):
        try:
            check_path_text(path, InputError, "input")
        except InputError as exc:
            problems.append(str(exc))
            continue
        if not path.exists():
            problems.append(f"{path}: no such file or folder")
            continue
        identity, series = _identity(path), entry[2]
        if series is not None and not path.is_dir():
            problems.append(f"{path}: a series UID ({series}) is for a DICOM folder, and this is a file")
            continue
        twice = [earlier for earlier, s in seen.get(identity, []) if series is None or s is None or s == series]
        if twice:  # one folder twice is fine when the list names another series each time
            problems.append(f"{path}: given twice (also as {twice[0]})")
            continue
        seen.setdefault(identity, []).append((path, series))
        if not name or name.startswith(".") or "/" in name or "\\" in name or name.lower() == SUMMARY_NAME:
            problems.append(f"{path}: its case would be named {name!r}, which cannot be a case folder's name")
            naming = True
        elif name.casefold() in taken:
            problems.append(f"{path} and {taken[name.casefold()]} would both be case {name!r}")
            naming = True
        taken.setdefault(name.casefold(), path)
    if problems:
        hint = (". A list file (--list) can name each case: a name, a tab, then its path, one case per line"
                if naming else "")
        raise InputError("cannot start the batch: " + "; ".join(problems) + hint)
    resolved = [p.resolve() for p in paths]
    nested = sorted({f"{p} lies in the folder of the input {q}" for p in resolved for q in resolved if q in p.parents})
    if nested:
        raise InputError("cannot start the batch: " + "; ".join(nested) + "; give each series once")
    return [Case(name, real, entry[2]) for name, real, entry in zip(names, resolved, entries)]


def check_case_folders(cases: Sequence[Case], outdir: Path) -> None:
    """Refuse (:class:`InputError`) a batch that would write among an input's files: an
    output folder that is an input's folder or lies in one, or a case folder that is an
    input's folder or holds an input (``batch P001 P002 -o .`` beside those DICOM
    folders)."""
    outdir = Path(outdir).resolve()
    # By path, and by file identity where the folders exist: a case folder that is a link
    # to an input's folder, or the same folder under another letter case (macOS, Windows).
    lineages = {case.input: _lineage(case.input) for case in cases}
    here = _lineage(outdir)
    problems = [f"the output folder {outdir} lies in the input {c.input}" for c in cases
                if c.input == outdir or c.input in outdir.parents or file_identity(c.input) in here]
    for case in cases:
        folder = outdir / case.name
        mark = file_identity(folder)
        for other in cases:
            if other.input == folder or folder in other.input.parents or (mark and mark in lineages[other.input]):
                problems.append(f"case {case.name!r} would write into {folder}, which holds the input {other.input}")
    if problems:
        raise InputError("cannot start the batch: " + "; ".join(problems) + "; choose another output folder")


def _lineage(path: Path) -> set:
    """The identities of ``path`` and of every existing folder above it."""
    return {mark for mark in map(file_identity, (path, *Path(path).parents)) if mark}


def input_fingerprint(path: Path) -> str:
    """SHA-256 of the names, sizes, modification and change times (ns) and inode numbers
    of an input's files (of every file under a DICOM folder, hidden ones aside), not of
    their content: a file replaced or written again at the same path changes it, even
    with its size and modification time restored (``cp -p``, ``rsync -a``: the change
    time cannot be set), and so does a copy of the folder elsewhere; reading it does
    not. A header that keeps its voxels in another file (``.mhd``, ``.nhdr``) counts
    that file too (:func:`data_files`). ``--resume`` compares it."""
    path = Path(path)
    if path.is_dir():
        files = []
        for root, folders, names in os.walk(path):
            folders[:] = [f for f in folders if not f.startswith(".")]  # .DS_Store and the like: not the scan
            files += [Path(root, name) for name in names if not name.startswith(".")]
        files.sort()
        base = path
    else:
        files, base = [path, *data_files(path)], path.parent
    digest = hashlib.sha256()
    for file in files:
        try:
            st = file.stat()
        except (OSError, ValueError):
            continue  # a dangling link, a file gone, a name no path can hold: the reader reports what it needs
        if file == path:
            name = b""
        else:
            name = os.fsencode(str(file.relative_to(base) if file.is_relative_to(base) else file))
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        digest.update(name + b"\0" + " ".join(map(str, stamp)).encode() + b"\n")
    return digest.hexdigest()


def data_files(header: Path) -> List[Path]:
    """The files in which a header-only image keeps its voxels, as its header names them:
    a MetaImage ``.mhd``'s ``ElementDataFile``, a detached NRRD ``.nhdr``'s ``data file``
    (one file, or a ``LIST`` of them); every other file of its folder when it names them
    by a pattern (``%03d``). None for a file that holds its own voxels (``LOCAL``,
    ``.nii``, ``.nrrd``, ``.mha``) or a header that cannot be read."""
    header = Path(header)
    mhd = header.name.lower().endswith(".mhd")
    if not (mhd or header.name.lower().endswith(".nhdr")):
        return []
    try:
        with open(header, "rb") as handle:
            lines = handle.read(1 << 16).decode("latin-1").splitlines()
    except OSError:
        return []
    for number, line in enumerate(lines):
        key, separator, value = line.partition("=" if mhd else ":")
        if not separator or key.strip().lower() not in (("elementdatafile",) if mhd else ("data file", "datafile")):
            continue
        value = value.strip()
        if not value or value.upper() == "LOCAL":
            return []
        if value.split()[0].upper() == "LIST":
            names = [name.strip() for name in lines[number + 1:] if name.strip()]
        elif "%" in value:
            try:
                return sorted(f for f in header.parent.iterdir() if f.is_file() and f != header)
            except OSError:
                return []
        else:
            names = [value]
        # an absolute name stays absolute; one no path can hold (a NUL) is the reader's to refuse
        return [header.parent / name for name in names if "\0" not in name]
    return []


def check_summary_is_ours(outdir: Path) -> None:
    """Refuse (:class:`OutputError`) an output folder whose ``batch.csv`` is not one a
    batch wrote: it would be overwritten."""
    path = Path(outdir) / SUMMARY_NAME
    if not os.path.lexists(path):
        return
    try:
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), None)
    except (OSError, UnicodeError, csv.Error):
        header = None
    if path.is_symlink() or not path.is_file() or header != list(SUMMARY_COLUMNS):
        raise OutputError(f"{path} exists and was not written by a batch run; move it, or choose another "
                          "output folder")


def write_summary(outdir: Path, cases: Sequence[Case]) -> Path:
    """Write ``batch.csv`` (every case, in input order), atomically; returns its path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SUMMARY_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for case in cases:
        writer.writerow(case.row())
    path = Path(outdir) / SUMMARY_NAME
    atomic_write_text(path, buffer.getvalue())
    return path


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def earlier_result(case_dir: Path, expected: dict, surfaces: Optional[str], preview: bool):
    """For ``--resume``: ``(stats document, None)`` when ``case_dir`` holds a finished
    run of this case that this batch would repeat (the same input, model weights and
    settings, ``expected``: :data:`RESUME_KEYS`; the same surface format, None for none;
    a preview or not), else ``(None, reason)``, the reason None when there is no earlier
    run at all. A ``stats.json`` that is not one of ours, whole, counts as a reason."""
    path = Path(case_dir) / "stats.json"
    if not path.is_file() or path.is_symlink():
        return None, None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        run, outputs = document["run"], document["run"]["outputs"]
        summary(document)  # the figures batch.csv takes from it
        surfaces_part = document.get("surfaces")
        files = surfaces_part.get("files") if isinstance(surfaces_part, dict) else None
        if not (_strings(outputs) and _strings(run.get("warnings") or []) and (files is None or _strings(files))):
            raise TypeError("not lists of names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, "its stats.json cannot be read"
    for key in RESUME_KEYS:
        if run.get(key) != expected[key]:
            if key == "input_fingerprint":
                return None, ("the input's files have changed since" if key in run
                              else "the earlier run did not record its input's fingerprint")
            return None, f"the earlier run's {key} was {run.get(key)!r}, not {expected[key]!r}"
    formats = {Path(name).suffix.lstrip(".") for name in files or ()}
    if (files is None) != (surfaces is None) or (surfaces is not None and formats - {surfaces}):
        return None, "the earlier run wrote other surface files"
    if ("preview.png" in outputs) != preview:
        return None, "the earlier run " + ("had no preview" if preview else "wrote a preview")
    missing = [name for name in outputs if not (Path(case_dir) / name).is_file()]
    if missing:
        return None, f"{', '.join(missing)} of the earlier run is missing"
    return document, None
