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
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
            raise InputError(
                f"cannot read {path.name}: the file is corrupt, truncated or not a supported image "
                f"(NIfTI, NRRD, MHA/MHD, or a DICOM folder). Reader said: {reason[:200]}"
            ) from None
    return _to_volume(image, path)


def _read_dicom_folder(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        series = ()
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
        with atomic_path(path) as tmp:
            sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=True)
    except (RuntimeError, OSError) as exc:
        raise OutputError(f"cannot write {path}: {exc}") from None


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
