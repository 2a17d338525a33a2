"""Reading CT volumes and writing label maps, with the full geometry kept.

Readers: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``) and DICOM series folders (any transfer syntax that SimpleITK's
GDCM reads: uncompressed, RLE, JPEG, JPEG-LS and JPEG 2000). Everything comes back as a
:class:`~LiverTumorSegLib.volume.Volume` in LPS with (z, y, x) arrays; SimpleITK does
the NIfTI RAS <-> LPS conversion on read and write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import InputError, OutputError
from .volume import Volume

SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def read_volume(path: Path) -> Volume:
    """Read a 3D scalar image file or a DICOM series folder.

    Raises :class:`InputError` for a missing, unreadable, 2D, 4D or multi-component
    image.
    """
    import SimpleITK as sitk

    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        image = _read_dicom_folder(path)
    else:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_complete(path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
            raise InputError(
                f"cannot read {path.name}: the file is corrupt, truncated or not a supported image "
                f"(NIfTI, NRRD, MHA/MHD, or a DICOM folder). Reader said: {reason[:200]}"
            ) from None
    return _to_volume(image, path)


def _check_nifti_complete(path: Path) -> None:
    """Refuse a truncated NIfTI file (SimpleITK would silently zero-fill it).

    Reads the header for the expected data size, then counts the bytes actually
    present (streaming through the gzip data for ``.nii.gz``).
    """
    import gzip
    import struct
    import zlib

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    truncated = InputError(f"cannot read {path.name}: the file is truncated or corrupt (its data ends early)")
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
            expected = _nifti_expected_bytes(header, struct)
            if expected is None:
                return  # not a NIfTI header we understand: the reader will judge it
            total = len(header)
            while True:
                block = f.read(1 << 22)
                if not block:
                    break
                total += len(block)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(f"cannot read {path.name}: the compressed data is truncated or corrupt ({exc})") from None
    except OSError as exc:
        raise InputError(f"cannot read {path.name}: {exc}") from None
    if total < expected:
        raise truncated


def _nifti_expected_bytes(header: bytes, struct) -> "int | None":
    if len(header) < 348:
        return None
    for order in ("<", ">"):
        size = struct.unpack(order + "i", header[:4])[0]
        if size == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if size == 540 and len(header) >= 540:
            dims = struct.unpack(order + "8q", header[16:80])
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    voxels = 1
    for d in dims[1:ndim + 1]:
        voxels *= max(int(d), 1)
    return max(offset, 348) + voxels * bitpix // 8


def _read_dicom_folder(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found": the error below says it
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        series = ()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if not series:
        raise InputError(f"{folder} is a folder without a readable DICOM series")
    # Several series: take the one with the most slices (the CT, not a scout).
    files = max((reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series), key=len)
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read the DICOM series in {folder}: {str(exc).strip()[-200:]}") from None


def _to_volume(image, source: Path) -> Volume:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{source.name} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(RGB or vector image); a CT is a single-component greyscale volume"
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise InputError(f"{source.name} is a {dim}D image; a 3D CT volume is required")
    size = image.GetSize()
    if min(size) < 2:
        raise InputError(f"{source.name} has size {size}: a single slice is a 2D image, a 3D CT volume is required")
    if image.GetPixelID() in (sitk.sitkFloat64,):
        image = sitk.Cast(image, sitk.sitkFloat32)
    volume = Volume.from_sitk(image)
    direction = volume.direction
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise InputError(f"{source.name} has a non-orthogonal direction matrix; re-export the image")
    return volume


def write_volume(volume: Volume, path: Path) -> None:
    """Write a volume (NIfTI, NRRD or MHA by extension) atomically."""
    import SimpleITK as sitk

    path = Path(path)
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


def read_header(path: Path):
    """(size_xyz, spacing_xyz) of an image file without reading its voxels, or None
    for folders and files whose header cannot be read (read_volume reports those)."""
    import SimpleITK as sitk

    path = Path(path).expanduser()
    if not path.is_file():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    size = reader.GetSize()
    if len(size) < 3:
        return None
    return tuple(size[:3]), tuple(reader.GetSpacing()[:3])
