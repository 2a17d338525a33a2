"""Reading CT volumes and writing label maps, with the full geometry kept.

Readers: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``) and DICOM series folders (any transfer syntax that SimpleITK's
GDCM reads: uncompressed, RLE, JPEG, JPEG-LS and JPEG 2000). Everything comes back as a
:class:`~LiverTumorSegLib.volume.Volume` in LPS with (z, y, x) arrays; SimpleITK does
the NIfTI RAS <-> LPS conversion on read and write.
"""

from __future__ import annotations

import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .atomic import atomic_path, check_path_text
from .errors import InputError, OutputError
from .volume import Volume

SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def read_volume(path: Path, series_uid: "str | None" = None) -> Volume:
    """Read a 3D scalar image file or a DICOM series folder.

    ``series_uid`` picks one series of a DICOM folder that holds several CT series.

    Raises :class:`InputError` for a missing, unreadable, 2D, 4D or multi-component
    image, and for a file or series whose geometry would be read wrongly (see
    :func:`_check_nifti` and :func:`_check_slices`).
    """
    import SimpleITK as sitk

    path = Path(path).expanduser()
    check_path_text(path.absolute(), InputError, "input")
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        return read_dicom_series(path, series_uid)[0]
    if series_uid is not None:
        raise InputError(f"a series UID picks one series of a DICOM folder; {path} is a file")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise InputError(
            f"cannot read {path}: the file is corrupt, truncated or not a supported image "
            f"(NIfTI, NRRD, MHA/MHD, or a DICOM folder). Reader said: {reason[:200]}"
        ) from None
    return _to_volume(image, path)


def _check_nifti(path: Path) -> None:
    """Refuse what SimpleITK would read wrongly or silently alter in a NIfTI file.

    * truncated data (SimpleITK zero-fills it): the bytes present are counted,
      streaming through the gzip data for ``.nii.gz``;
    * NaN or Inf voxels in float data (SimpleITK turns them into 0, i.e. soft tissue),
      counted in the same pass;
    * an ambiguous geometry: no orientation at all (qform and sform codes 0), a sheared
      sform, or a qform and an sform that place the image differently (readers differ
      on which one wins, so the labels could be misplaced in another tool);
    * NIfTI-2, which this SimpleITK build does not read.
    """
    import gzip
    import zlib

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read(540)
            header = _nifti_header(raw)
            if header is None:
                return  # not a NIfTI header we understand: the reader will judge it
            if header["version"] == 2:
                raise InputError(f"cannot read {path}: it is a NIfTI-2 file, which this reader does not support; "
                                 "save it as NIfTI-1 (.nii.gz) or NRRD")
            _check_nifti_geometry(header, str(path))
            counter = _DataCounter(header)
            counter.feed(raw)
            while True:
                block = f.read(1 << 22)
                if not block:
                    break
                counter.feed(block)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(f"cannot read {path}: the compressed data is truncated or corrupt ({exc})") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if counter.total < header["expected_bytes"]:
        raise InputError(f"cannot read {path}: the file is truncated or corrupt (its data ends early)")
    if counter.non_finite:
        raise InputError(f"{path} has {counter.non_finite} NaN or Inf voxels; fix or crop the image before "
                         "segmenting")


#: sform and qform may place the image this many (smallest) voxels apart: the qform's
#: float32 quaternion cannot match an oblique sform exactly.
QFORM_SFORM_TOLERANCE = 0.5
#: NIfTI datatype codes of the float types (NaN and Inf are possible): float32, float64.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_header(raw: bytes) -> "dict | None":
    """The fields of a NIfTI-1 or -2 header this module checks, or None."""
    import struct

    if len(raw) < 348:
        return None
    for order in ("<", ">"):
        size = struct.unpack(order + "i", raw[:4])[0]
        if size == 348:
            dims = struct.unpack(order + "8h", raw[40:56])
            datatype, bitpix = struct.unpack(order + "2h", raw[70:74])
            pixdim = struct.unpack(order + "8f", raw[76:108])
            offset = int(struct.unpack(order + "f", raw[108:112])[0])
            qform_code, sform_code = struct.unpack(order + "2h", raw[252:256])
            quatern = struct.unpack(order + "6f", raw[256:280])
            srow = struct.unpack(order + "12f", raw[280:328])
            version = 1
            break
        if size == 540 and len(raw) >= 540:
            dims = struct.unpack(order + "8q", raw[16:80])
            datatype, bitpix = struct.unpack(order + "2h", raw[12:16])
            offset = struct.unpack(order + "q", raw[168:176])[0]
            pixdim, qform_code, sform_code, quatern, srow = (), 0, 0, (), ()
            version = 2
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    voxels = 1
    for d in dims[1:ndim + 1]:
        voxels *= max(int(d), 1)
    offset = max(int(offset), 348)
    return {"version": version, "order": order, "dims": dims[1:ndim + 1], "datatype": datatype, "pixdim": pixdim,
            "offset": offset, "expected_bytes": offset + voxels * bitpix // 8, "qform_code": qform_code,
            "sform_code": sform_code, "quatern": quatern, "srow": srow}


def _qform_matrix(header: dict) -> np.ndarray:
    """The 3x4 voxel-to-RAS matrix of a NIfTI-1 qform (quaternion, pixdim, offset)."""
    b, c, d, qx, qy, qz = (float(v) for v in header["quatern"])
    rest = 1.0 - (b * b + c * c + d * d)
    if rest < 1e-7:  # a 180-degree rotation, whose a = 0 float32 rounding blurs (nifti1_io's rule)
        norm = float(np.sqrt(b * b + c * c + d * d))
        a, b, c, d = 0.0, b / norm, c / norm, d / norm
    else:
        a = float(np.sqrt(rest))
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    qfac = -1.0 if header["pixdim"][0] < 0 else 1.0
    scales = np.array([header["pixdim"][1], header["pixdim"][2], qfac * header["pixdim"][3]], dtype=np.float64)
    return np.column_stack([rotation * scales, [qx, qy, qz]])


def _check_nifti_geometry(header: dict, name: str) -> None:
    qcode, scode = header["qform_code"], header["sform_code"]
    if qcode <= 0 and scode <= 0:
        raise InputError(f"{name} has no orientation (its NIfTI qform_code and sform_code are both 0), so the "
                         "patient's left and right cannot be told apart; re-export it with its geometry "
                         "(e.g. from the DICOM series)")
    if scode <= 0:
        return
    sform = np.array(header["srow"], dtype=np.float64).reshape(3, 4)
    axes = sform[:, :3]
    lengths = np.linalg.norm(axes, axis=0)
    if np.any(lengths == 0) or not np.all(np.isfinite(sform)):
        raise InputError(f"{name}: its NIfTI sform is degenerate (a zero or non-finite axis); re-export the image")
    unit = axes / lengths
    if not np.allclose(unit.T @ unit, np.eye(3), atol=1e-3):
        raise InputError(f"{name} has a non-orthogonal (sheared) sform, which the reader would drop; resample the "
                         "image onto an orthogonal grid and run again")
    if qcode <= 0:
        return
    qform = _qform_matrix(header)
    dims = [int(d) for d in header["dims"][:3]] + [1] * max(0, 3 - len(header["dims"]))
    corners = np.array([[i, j, k, 1.0] for i in (0, dims[0] - 1) for j in (0, dims[1] - 1) for k in (0, dims[2] - 1)])
    apart = float(np.max(np.linalg.norm(corners @ (sform - qform).T, axis=1)))
    if apart > QFORM_SFORM_TOLERANCE * float(lengths.min()):
        raise InputError(
            f"{name}: its NIfTI sform (code {scode}) and qform (code {qcode}) place the image up to {apart:.1f} mm "
            "apart; tools differ on which one applies, so the labels could be misplaced. Make them agree (e.g. "
            "with nibabel: img.set_qform(img.get_sform())) and run again")


class _DataCounter:
    """Counts a NIfTI file's bytes and, for float data, its non-finite voxels, block by block."""

    def __init__(self, header: dict) -> None:
        self.total = 0
        self.non_finite = 0
        kind = _NIFTI_FLOATS.get(header["datatype"])
        self.dtype = np.dtype(header["order"] + kind) if kind else None
        self.offset = header["offset"]
        self.end = header["expected_bytes"]
        self.carry = b""

    def feed(self, block: bytes) -> None:
        start, self.total = self.total, self.total + len(block)
        if self.dtype is None:
            return
        lo, hi = max(self.offset - start, 0), min(self.end - start, len(block))
        if hi <= lo:
            return
        data = self.carry + block[lo:hi]
        usable = len(data) - len(data) % self.dtype.itemsize
        values = np.frombuffer(data[:usable], dtype=self.dtype)
        self.non_finite += int(values.size - np.count_nonzero(np.isfinite(values)))
        self.carry = data[usable:]


#: A series with fewer slices is a scout or a dose report, not a CT to segment.
MIN_SERIES_SLICES = 10
#: Slice spacing may vary by this fraction of the median before a gap is reported.
SPACING_TOLERANCE = 0.05
#: Larger tilts of the slice stack against the slice normal are refused (degrees).
MAX_TILT_DEGREES = 0.5
#: A slice further than this fraction of the spacing from the evenly spaced place the
#: reader puts it in (first to last, evenly) is refused: spacing that drifts little by
#: little passes :data:`SPACING_TOLERANCE` step by step, yet misplaces slices.
DRIFT_TOLERANCE = 0.2
#: Media Storage SOP Class UIDs (0002,0002) of CT images (CT, Enhanced CT, Legacy
#: Converted Enhanced CT): an unparsed file of one of these classes may be a slice.
CT_STORAGE_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
#: How much of a file that no series took is searched for the series' UID.
UNPARSED_HEAD_BYTES = 1 << 20
#: How many folder levels below a folder without a series are searched for one.
MAX_SEARCH_DEPTH = 4
#: Folders of the operating system on a drive's root, never searched for a series.
SYSTEM_FOLDERS = ("system volume information", "$recycle.bin", "recycler", "lost+found")


def choose_series(folder: Path, series_uid: "str | None" = None) -> tuple:
    """(UID, file names in slice order) of the CT series to read from a DICOM folder.

    With several series of :data:`MIN_SERIES_SLICES` or more slices (e.g. arterial and
    venous phases), ``series_uid`` must say which one; otherwise the largest series is
    taken (a scout or dose report beside the CT is ignored). When the folder itself holds
    no series that large (a PACS export: ``DICOMDIR`` and ``PATIENT/STUDY/SERIES/``
    folders), the folders below it are searched too, :data:`MAX_SEARCH_DEPTH` levels
    deep, and their series count as the folder's; a series split over several folders
    (as on CDs that cap the files per folder) is joined and put in slice order.
    """
    folder = Path(folder)
    files = _series_in(folder, top=True)
    skipped, split = [], set()
    if not any(len(names) >= MIN_SERIES_SLICES for names in files.values()):
        for below in _subfolders(folder, skipped):
            for sid, names in _series_in(below).items():
                split.update([sid] if sid in files else [])
                files[sid] = files.get(sid, []) + list(names)
    listed = [name for names in files.values() for name in names]  # before joining drops copies
    for sid in split:
        files[sid] = _joined(files[sid])
    if not files:
        unread = f"; {len(skipped)} could not be searched, e.g. {skipped[0]}" if skipped else ""
        raise InputError(f"{folder} is a folder without a readable DICOM series (its subfolders were searched "
                         f"{MAX_SEARCH_DEPTH} levels deep too{unread})")
    series = list(files)
    if series_uid is not None:
        if series_uid not in files:
            raise InputError(f"{folder} holds no DICOM series {series_uid}; it holds: {_list_series(files)}")
        _check_nothing_skipped_beside(files[series_uid], skipped, folder)
        _check_no_slice_unparsed(files[series_uid], listed, series_uid)
        return series_uid, files[series_uid]
    large = [sid for sid in series if len(files[sid]) >= MIN_SERIES_SLICES]
    if len(large) > 1:
        listed_series = _list_series({sid: files[sid] for sid in large})
        raise InputError(f"{folder} holds {len(large)} CT series; choose one with --series UID (in a batch "
                         f"list file, a third column), or give a folder with one series: {listed_series}")
    chosen = max(series, key=lambda sid: len(files[sid]))
    _check_nothing_skipped_beside(files[chosen], skipped, folder)
    _check_no_slice_unparsed(files[chosen], listed, chosen)
    return chosen, files[chosen]


def _check_nothing_skipped_beside(names: list, skipped: list, folder: Path) -> None:
    """Refuse when a folder that could not be searched lies beside one holding the
    series: part of a split series may be in it, and the rest would pass as whole."""
    places = {Path(name).parent for name in names}
    beside = [s for s in skipped if Path(s).parent in {place.parent for place in places}]
    if beside:
        raise InputError(f"the DICOM folder {beside[0]}, beside the series' folder {sorted(places)[0]}, could not be "
                         "searched (it cannot be listed, or its name is not valid UTF-8) and may hold part of the "
                         f"series; fix or rename it, or give the series' own folder instead of {folder}")


def _check_no_slice_unparsed(names: list, listed: list, uid: str) -> None:
    """Refuse when a file in one of the series' folders is in no series, because the
    reader could not parse it (cut short by a copy, corrupt, empty), yet is one of its
    slices or may be one. The series would be read without it: at either end of the
    stack no gap shows, and the scan would silently lose a slice of anatomy.

    ``names`` are the series' files, ``listed`` every file the reader put in any series
    (copies that joining a split series dropped included). A file no series took is read
    from its start and judged by :func:`_unparsed_kind`; other objects of the study that
    the reader does not list (a dose report, key images, an RT structure set: they
    reference the series' UID, but their SOP class is not a CT image's) and files that
    are not DICOM are left alone."""
    listed = {os.path.normpath(name) for name in listed}
    inodes = None  # of the listed files, only when a path differs in spelling (a link)
    for place in sorted({Path(name).parent for name in names}):
        shapes = {_name_shape(Path(name).name) for name in names if Path(name).parent == place}
        ours, maybe, hidden = [], [], []
        try:
            entries = sorted(os.scandir(place), key=lambda e: e.name)
        except OSError as exc:
            raise InputError(f"cannot list the DICOM folder {place} (it was read a moment ago): "
                             f"{exc.strerror or exc}") from None
        for entry in entries:
            if (not entry.is_file() or entry.name.upper().startswith("DICOMDIR")
                    or os.path.normpath(entry.path) in listed):
                continue
            kind = _unparsed_kind(entry.path, uid, _name_shape(entry.name) in shapes)
            if kind is None:
                continue
            if inodes is None:
                inodes = {file_identity(name) for name in listed} - {None}
            if file_identity(entry.path) in inodes:
                continue
            shown = os.fsencode(entry.name).decode("utf-8", "replace")
            (maybe if kind != "ours" else hidden if entry.name.startswith(".") else ours).append(shown)
        if hidden:  # the reader skips hidden files, whole or not
            raise InputError(f"{len(hidden)} file(s) of the DICOM series {uid} in {place} (e.g. {hidden[0]}) are "
                             "hidden (their names start with '.'), and the DICOM reader skips hidden files: the "
                             "series would be read without those slices. If they are slices, rename them without "
                             "the leading '.'; if they are a copy's unfinished temporary files (rsync leaves "
                             ".NAME.XXXXXX), copy the series again")
        if ours:
            raise InputError(f"{len(ours)} file(s) of the DICOM series {uid} in {place} (e.g. {ours[0]}) cannot be "
                             "read (cut short or corrupt?): the series would be read without those slices; copy or "
                             "export the series again")
        if maybe:
            raise InputError(f"{len(maybe)} file(s) in {place}, beside the DICOM series {uid} (e.g. {maybe[0]}), "
                             "cannot be read (cut short, empty, corrupt or not readable?) and may be slices of it: "
                             "the series would be read without them; copy or export the series again, or move "
                             "those files away if they are not part of it")


def file_identity(path) -> "tuple | None":
    """(device, inode) of a file or folder, links followed, to know a link of it; None
    where the file system has no inode numbers (``st_ino`` 0) or nothing can be reached
    by that path."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return None
    return (info.st_dev, info.st_ino) if info.st_ino else None


def _name_shape(name: str) -> str:
    """A file name with its runs of digits as ``#``: slices of a series share one."""
    return re.sub(r"\d+", "#", name.lower())


def _unparsed_kind(path: str, uid: str, named_like_a_slice: bool) -> "str | None":
    """What a file that no series took is, from its first bytes: ``"ours"`` (DICOM of
    a CT class, or of no readable class, whose only series UID is ``uid``); ``"maybe"``
    (such DICOM cut short inside its header, its series unknown, or carrying ``uid``
    beside other series UIDs: its own and a referenced one, which a raw scan cannot tell
    apart; a file named like the series' slices that is empty, zero-filled, cut inside
    the preamble, or cannot be opened); None (another series' file, a DICOM object that
    is not a CT image, a file that is not DICOM)."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(132)
            preamble = head[128:132] == b"DICM"
            if preamble or head[:2] in (b"\x08\x00", b"\x02\x00", b"\x00\x08"):  # DICOM, or without preamble
                head += stream.read(UNPARSED_HEAD_BYTES - len(head))
            elif len(head) < 132 and not head[:128].strip(b"\0") and b"DICM".startswith(head[128:]):
                return "maybe" if named_like_a_slice else None  # empty, or cut inside the preamble
            elif not head.strip(b"\0"):  # zeros so far
                zeros = not stream.read(UNPARSED_HEAD_BYTES).strip(b"\0")
                return "maybe" if zeros and named_like_a_slice else None
            else:
                return None
    except OSError:
        return "maybe" if named_like_a_slice else None
    classes = set(_element_texts(head[132:1024], 0x0002, 0x0002) + _element_texts(head, 0x0008, 0x0016))
    if classes and not classes & set(CT_STORAGE_CLASSES):
        return None  # a report, key images, a structure set, raw data...: not a slice
    series = set(_element_texts(head, 0x0020, 0x000E))
    if series == {uid}:
        return "ours"
    if uid in series:
        return "maybe"  # ours referring to another series, or another's referring to ours
    if series:
        return None  # another series' file
    return "maybe" if preamble or classes else None  # cut inside its header, or a stray binary file


def _element_texts(data: bytes, group: int, element: int) -> list:
    """The values of a short text element (a UID) wherever its tag appears in raw DICOM
    bytes, in explicit or implicit VR little endian or explicit VR big endian: for files
    the reader cannot parse. Values longer than a UID's 64 characters are not taken."""
    texts = []
    for order in "<>":
        tag = struct.pack(order + "HH", group, element)
        at = data.find(tag)
        while at >= 0:
            rest = data[at + 4:at + 8]
            if len(rest) == 4:
                if rest[:2].isalpha() and rest[:2].isupper():  # explicit VR: 2-byte length
                    start, length = at + 8, struct.unpack(order + "H", rest[2:])[0]
                else:  # implicit VR (little endian only): 4-byte length
                    start, length = at + 8, struct.unpack(order + "I", rest)[0]
                if length <= 64 and start + length <= len(data):
                    texts.append(data[start:start + length].rstrip(b"\0 ").decode("ascii", "replace"))
            at = data.find(tag, at + 1)
    return texts


@contextmanager
def _itk_quiet():
    """ITK's own warnings off while the block runs (they print C++ file names and lines on
    stderr); the engine's one-line errors say what went wrong."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _series_in(folder: Path, top: bool = False) -> dict:
    """{series UID: sorted file names} of the DICOM series in ``folder`` itself; {} for
    a folder that cannot be read, unless it is the ``top`` one (then an InputError)."""
    import SimpleITK as sitk

    try:
        os.scandir(folder).close()
    except OSError as exc:
        if top:
            raise InputError(f"cannot read the folder {folder}: {exc.strerror or exc}") from None
        return {}
    reader = sitk.ImageSeriesReader()
    try:
        with _itk_quiet():  # "No Series were found": the caller's error says it
            series = reader.GetGDCMSeriesIDs(str(folder))
            return {sid: list(reader.GetGDCMSeriesFileNames(str(folder), sid)) for sid in series}
    except (RuntimeError, TypeError):
        return {}


def _subfolders(folder: Path, skipped: list) -> list:
    """The folders below ``folder``, :data:`MAX_SEARCH_DEPTH` levels deep, in name order
    (links, hidden folders and :data:`SYSTEM_FOLDERS` left out). Folders that cannot be
    listed, or whose names are not valid UTF-8 (GDCM would abort the process on them), are
    left out and added to ``skipped``."""
    found, level = [], [folder]
    for _ in range(MAX_SEARCH_DEPTH):
        below = []
        for parent in level:
            try:
                entries = [Path(entry.path) for entry in os.scandir(parent)
                           if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
                           and entry.name.lower() not in SYSTEM_FOLDERS]
            except OSError:
                skipped.append(str(parent))
                continue
            for path in entries:
                try:
                    check_path_text(path, InputError, "DICOM folder")
                    below.append(path)
                except InputError:
                    skipped.append(os.fsencode(str(path)).decode("utf-8", "replace"))
        level = sorted(below)
        found += level
    return found


def _joined(names: list) -> list:
    """The files of a series found in several folders, each image once (a folder copied
    twice, a file linked into two: same SOP Instance UID), sorted by their slice's position
    along the slice normal (files without a position after the others, in their order;
    :func:`_check_slices` refuses them)."""
    kept, seen = [], set()
    for name in names:
        uid, position, orientation = _dicom_tags(name, "0008|0018", "0020|0032", "0020|0037")
        key = uid or os.path.realpath(name)
        if key in seen:
            continue
        seen.add(key)
        position, orientation = _numbers(position, 3), _numbers(orientation, 6)
        where = (float("inf") if position is None or orientation is None
                 else float(position @ np.cross(orientation[:3], orientation[3:])))
        kept.append((where, len(kept), name))
    return [name for _, _, name in sorted(kept)]


def read_dicom_series(folder: Path, series_uid: "str | None" = None) -> tuple:
    """(Volume, record) of a DICOM folder's CT series (:func:`choose_series`); the record
    identifies it for provenance (``stats.json``'s ``run.series``): UID, number,
    description, slice count. Raises :class:`InputError` as :func:`read_volume` does."""
    folder = Path(folder).expanduser()
    check_path_text(folder.absolute(), InputError, "input")  # GDCM aborts the process on such a folder
    uid, names = choose_series(folder, series_uid)
    for name in names:  # SimpleITK cannot open such names (and GDCM may abort on them)
        check_path_text(Path(name), InputError, "DICOM file")
    _check_slices(names, folder)
    description, number = _dicom_tags(names[0], "0008|103e", "0020|0011")
    volume = _to_volume(_read_series(names, folder), folder)
    record = {"uid": uid, "number": number, "description": description,
              "slices": int(volume.array.shape[0])}  # frames, for a multi-frame file
    places = sorted({str(Path(name).parent) for name in names})
    if places != [str(folder)]:
        record["folders"] = places  # found below the folder given
    return volume, record


def _read_series(names: list, folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    try:
        with _itk_quiet():  # its spacing warning: _check_slices judged the spacing
            return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read the DICOM series in {folder}: {str(exc).strip()[-200:]}") from None


def _dicom_tags(path: str, *tags: str) -> tuple:
    """Tag values of one DICOM file ('' where absent), its pixel data not decoded."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    try:
        check_path_text(Path(path), InputError, "DICOM file")  # SimpleITK cannot open it: no tags
        reader.SetFileName(path)
        reader.ReadImageInformation()
    except (RuntimeError, TypeError, InputError):
        return ("",) * len(tags)
    charset = reader.GetMetaData("0008|0005") if reader.HasMetaDataKey("0008|0005") else ""
    return tuple(_dicom_text(reader.GetMetaData(t), charset).strip() if reader.HasMetaDataKey(t) else ""
                 for t in tags)


#: Python codecs of DICOM's Specific Character Sets (0008,0005) that carry text the
#: reader hands over undecoded; text in another set is decoded as Latin-1.
_DICOM_CHARSETS = {"ISO_IR 192": "utf-8", "ISO_IR 100": "latin-1", "ISO_IR 101": "iso8859-2",
                   "ISO_IR 109": "iso8859-3", "ISO_IR 110": "iso8859-4", "ISO_IR 144": "iso8859-5",
                   "ISO_IR 127": "iso8859-6", "ISO_IR 126": "iso8859-7", "ISO_IR 138": "iso8859-8",
                   "ISO_IR 148": "iso8859-9", "ISO_IR 166": "tis-620", "GB18030": "gb18030", "GBK": "gbk"}


def _dicom_text(value: str, charset: str) -> str:
    """A tag's text as the characters its file means: SimpleITK passes bytes that are not
    UTF-8 through as surrogates, which ``stats.json`` could not hold."""
    raw = value.encode("utf-8", "surrogateescape")
    names = [part.strip() for part in charset.split("\\") if part.strip()]
    codec = _DICOM_CHARSETS.get(names[-1] if names else "", "utf-8")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        return raw.decode("latin-1" if codec == "utf-8" else codec, "replace")


def _list_series(files: dict) -> str:
    parts = []
    for sid, names in files.items():
        description, number = _dicom_tags(names[0], "0008|103e", "0020|0011")
        label = " ".join(x for x in (f"#{number}" if number else "", f"'{description}'" if description else "") if x)
        parts.append(f"{sid} ({label + ', ' if label else ''}{len(names)} slices)")
    return "; ".join(parts)


def _numbers(text: str, count: int) -> "np.ndarray | None":
    try:
        values = np.array([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        return None
    return values if values.size == count and np.all(np.isfinite(values)) else None


def _check_slices(names: list, folder: Path) -> None:
    """Refuse a series whose slices do not make one regular grid (the reader would average
    the spacing or misplace slices): too few slices for a CT, slices without position or
    orientation, mixed sizes or orientations, duplicate or missing slices, spacing that
    drifts, a gantry tilt. A single file (a multi-frame image) is left to the reader."""
    if len(names) < 2:
        return
    if len(names) < MIN_SERIES_SLICES:
        raise InputError(f"the DICOM series in {folder} has only {len(names)} slices: a scout, localizer or "
                         f"dose report, not a CT of the liver ({MIN_SERIES_SLICES} slices or more)")
    tags = [_dicom_tags(n, "0020|0032", "0020|0037", "0028|0010", "0028|0011") for n in names]
    sizes = sorted({(int(rows), int(cols)) for _, _, rows, cols in tags if rows.isdigit() and cols.isdigit()})
    if len(sizes) > 1:
        shown = " and ".join(f"{c}x{r}" for r, c in sizes[:3])
        raise InputError(f"the DICOM series in {folder} mixes slices of different sizes ({shown} pixels); "
                         "export the CT series alone")
    positions = [_numbers(position, 3) for position, _, _, _ in tags]
    orientations = [_numbers(orientation, 6) for _, orientation, _, _ in tags]
    lacking = [Path(name).name for name, p, o in zip(names, positions, orientations) if p is None or o is None]
    if lacking:
        raise InputError(f"{len(lacking)} slice(s) of the DICOM series in {folder} (e.g. {lacking[0]}) carry no "
                         "Image Position/Orientation (Patient) (0020,0032/0037): where each slice lies, and so the "
                         "slice spacing, cannot be known; export the series with its geometry")
    odd = [Path(name).name for name, o in zip(names, orientations) if np.max(np.abs(o - orientations[0])) > 1e-4]
    if odd:
        minority = odd if len(odd) <= len(names) / 2 else \
            [Path(name).name for name, o in zip(names, orientations) if np.max(np.abs(o - orientations[0])) <= 1e-4]
        raise InputError(f"the DICOM series in {folder} mixes slice orientations: {len(minority)} image(s), e.g. "
                         f"{', '.join(minority[:3])}, lie in another plane than the other {len(names) - len(minority)} "
                         "(a localizer?); remove them, or export the CT series alone")
    row, col = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    points = np.array(positions)
    order = np.argsort(points @ normal)
    points = points[order]
    steps = np.diff(points, axis=0)
    along = steps @ normal
    where = points @ normal
    if np.min(along) < 1e-3:
        k = int(np.argmin(along))
        raise InputError(f"the DICOM series in {folder} has two slices at the same position ({where[k]:.2f} mm "
                         "along the slice normal): a duplicate slice or two series mixed; export the CT series alone")
    lateral = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    tilt = float(np.degrees(np.arctan2(np.median(lateral), np.median(along))))
    if tilt > MAX_TILT_DEGREES:
        raise InputError(f"the DICOM series in {folder} is gantry-tilted by {tilt:.1f} degrees; resample it onto an "
                         "untilted grid first (3D Slicer's DICOM import can: 'Acquisition geometry regularization')")
    median = float(np.median(along))
    worst = int(np.argmax(np.abs(along - median)))
    if abs(along[worst] - median) > SPACING_TOLERANCE * median:
        raise InputError(
            f"the DICOM series in {folder} is not evenly spaced: {along[worst]:.2f} mm between the slices at "
            f"{where[worst]:.2f} and {where[worst + 1]:.2f} mm along the slice normal, {median:.2f} mm elsewhere "
            "(a missing slice?); export the complete series")
    even = where[0] + (where[-1] - where[0]) * np.arange(len(where)) / (len(where) - 1)
    off = int(np.argmax(np.abs(where - even)))
    mean = (where[-1] - where[0]) / (len(where) - 1)
    if abs(where[off] - even[off]) > DRIFT_TOLERANCE * mean:
        raise InputError(
            f"the slice spacing of the DICOM series in {folder} drifts ({np.min(along):.2f} to {np.max(along):.2f} "
            f"mm): read as evenly spaced ({mean:.3f} mm), the slice at {where[off]:.2f} mm along the slice normal "
            f"would be placed {abs(where[off] - even[off]):.2f} mm away; resample the series onto an even grid first")


def _to_volume(image, source: Path) -> Volume:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{source} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(RGB or vector image); a CT is a single-component greyscale volume"
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise InputError(f"{source} is a {dim}D image; a 3D CT volume is required")
    size = image.GetSize()
    if min(size) < 2:
        raise InputError(f"{source} has size {size}: a single slice is a 2D image, a 3D CT volume is required")
    if image.GetPixelID() in (sitk.sitkFloat64,):
        image = sitk.Cast(image, sitk.sitkFloat32)
    volume = Volume.from_sitk(image)
    if not volume.is_orthonormal():
        raise InputError(f"{source} has a non-orthogonal direction matrix; re-export the image")
    return volume


def write_volume(volume: Volume, path: Path) -> None:
    """Write a volume (NIfTI, NRRD or MHA by extension) atomically."""
    import SimpleITK as sitk

    path = Path(path)
    check_path_text(path.absolute())
    try:
        if path.suffix.lower() in (".mhd", ".nhdr"):
            _write_header_and_data(volume, path)
        else:
            with atomic_path(path) as tmp:
                sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=True)
    except (RuntimeError, OSError) as exc:
        raise OutputError(f"cannot write {path}: {exc}") from None


def _write_header_and_data(volume: Volume, path: Path) -> None:
    """Two-file formats name their data file inside the header, so write both under
    their final names in a private folder, then move the data file and lastly the
    header into place."""
    import shutil
    import tempfile

    import SimpleITK as sitk

    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        sitk.WriteImage(volume.to_sitk(), str(work / path.name), useCompression=True)
        files = sorted(work.iterdir(), key=lambda f: f.name == path.name)  # header last
        for item in files:
            item.replace(path.parent / item.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def input_name(path: Path) -> str:
    """The file name without image suffixes (for naming outputs)."""
    path = Path(path)
    name = path.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_header(path: Path, with_direction: bool = False):
    """(size_xyz, spacing_xyz) of an image file without reading its voxels, or None
    for folders and files whose header cannot be read (read_volume reports those).
    ``with_direction``: (size_xyz, spacing_xyz, direction), the direction as the file
    gives it (3 x 3, columns the axes, LPS)."""
    import SimpleITK as sitk

    path = Path(path).expanduser()
    if not path.is_file():
        return None
    try:
        check_path_text(path.absolute(), InputError, "input")
    except InputError:
        return None  # read_volume says why
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _itk_quiet():  # read_volume gives the reason, in one line
            reader.ReadImageInformation()
    except RuntimeError:
        return None
    size = reader.GetSize()
    if len(size) < 3:
        return None
    if not with_direction:
        return tuple(size[:3]), tuple(reader.GetSpacing()[:3])
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(len(size), len(size))[:3, :3]
    return tuple(size[:3]), tuple(reader.GetSpacing()[:3]), direction
