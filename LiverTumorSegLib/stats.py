"""Liver and tumor statistics: the one implementation every front end uses.

The command line (``stats.json`` / ``stats.csv``) and the Slicer table node both call
:func:`compute_statistics` and :func:`stats_to_rows`; the training evaluation measures
lesions with the same 26-connectivity and :func:`max_diameter_mm`, so the numbers a
clinician sees are the numbers a researcher measures.

Label convention: 0 background, 1 liver parenchyma, 2 tumor. "Liver" means the whole
organ (parenchyma + tumor). Volumes are in mL, lengths in mm, intensities in HU, and
every reported position is in **RAS** mm (Slicer's convention: LPS with x and y negated).

Runtime dependencies: numpy and SimpleITK only.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Optional

import numpy as np

from .atomic import atomic_write_text
from .boxes import bounding_box
from .errors import InputError
from .volume import Volume

SCHEMA_VERSION = 1
LIVER_LABEL = 1
TUMOR_LABEL = 2

ROW_COLUMNS = (
    "name",
    "kind",
    "volume_ml",
    "voxels",
    "percent_of_liver",
    "max_diameter_mm",
    "max_axial_diameter_mm",
    "short_axis_mm",
    "centroid_r_mm",
    "centroid_a_mm",
    "centroid_s_mm",
    "mean_hu",
    "std_hu",
    "min_hu",
    "max_hu",
    "touches_image_edge",
    "recist_measurable",
)
#: Columns of yes/no values (``None`` where they do not apply); "yes"/"no" in CSV.
YES_NO_COLUMNS = ("touches_image_edge", "recist_measurable")
#: RECIST 1.1: a lesion is measurable from a 10 mm long axis on CT with slices of 5 mm
#: or thinner, and from twice the slice thickness on thicker slices.
RECIST_MIN_DIAMETER_MM = 10.0
RECIST_MAX_THIN_SLICE_MM = 5.0


# -- public API ---------------------------------------------------------------------
def compute_statistics(labels: Volume, ct: Volume | None = None) -> dict:
    """Volumes, tumor burden, intensity statistics and per-lesion measurements.

    Args:
        labels: label map (0 background, 1 liver parenchyma, 2 tumor), any integer
            dtype, array indexed (z, y, x).
        ct: optional CT in Hounsfield units on exactly the same grid as ``labels``.

    Returns:
        A JSON-ready dict (schema version 1). Volumes in mL, lengths in mm, HU
        statistics over the voxels of each region (std is the population standard
        deviation), lesion centroids in RAS mm. Lesions are the 26-connected
        components of label 2 (lesions that touch, even at a corner, count as one),
        sorted by volume (largest first) and numbered from 1 in that order. HU entries
        are ``None`` when there is no CT or no voxel. ``liver.image_edges`` names the
        sides of the image the liver reaches (``superior``, ``left``...): there it may go
        on outside the scan, and its volume is a lower bound; each lesion has
        ``touches_image_edge`` likewise, and ``recist_measurable`` (RECIST 1.1: an axial
        long axis of at least 10 mm, or twice the slice thickness on slices thicker than
        5 mm; the axial diameter runs centre to centre, so a lesion right at the limit
        can be a voxel short) and ``short_axis_mm`` (:func:`axial_axes_mm`).

    Raises:
        InputError: if ``ct`` is not on the label grid or ``labels`` holds values
            other than 0, 1 and 2.
    """
    arr = np.asarray(labels.array)
    if arr.ndim != 3:
        raise InputError(f"The label map must be 3D; got an array of shape {arr.shape}.")
    if ct is not None and not labels.same_grid(ct):
        raise InputError(
            "The CT and the label map are not on the same grid (size, spacing, origin or "
            "direction differ); resample the labels to the CT before computing statistics."
        )
    if arr.size and (arr.min() < 0 or arr.max() > TUMOR_LABEL
                     or (not np.issubdtype(arr.dtype, np.integer) and np.any(arr != np.round(arr)))):
        raise InputError("The label map must hold only 0 (background), 1 (liver) and 2 (tumor).")

    voxel_ml = labels.voxel_volume_ml
    box = bounding_box(arr)
    if box is None:
        crop = np.zeros((0, 0, 0), dtype=arr.dtype)
        ct_crop = None
        offset = (0, 0, 0)
    else:
        crop = arr[box]
        ct_crop = None if ct is None else np.asarray(ct.array)[box]
        offset = tuple(s.start for s in box)

    parenchyma = crop == LIVER_LABEL
    tumor = crop == TUMOR_LABEL
    n_par = int(np.count_nonzero(parenchyma))
    n_tum = int(np.count_nonzero(tumor))
    n_liver = n_par + n_tum

    lesions = _lesions(tumor, ct_crop, labels, offset) if n_tum else []
    edges = image_edges(labels, box) if n_liver else []
    return {
        "schema_version": SCHEMA_VERSION,
        "coordinate_system": "RAS",
        "units": {"volume": "mL", "length": "mm", "intensity": "HU"},
        "voxel_volume_ml": voxel_ml,
        "grid": {
            "size_xyz": [int(v) for v in labels.shape_xyz],
            "spacing_mm": [float(s) for s in labels.spacing],
        },
        "liver": {
            "volume_ml": n_liver * voxel_ml,
            "parenchyma_volume_ml": n_par * voxel_ml,
            "voxels": n_liver,
            "parenchyma_voxels": n_par,
            "hu": _hu_stats(ct_crop, crop != 0),
            "parenchyma_hu": _hu_stats(ct_crop, parenchyma),
            "touches_image_edge": bool(edges),
            "image_edges": edges,
        },
        "tumor": {
            "volume_ml": n_tum * voxel_ml,
            "voxels": n_tum,
            "count": len(lesions),
            "burden_percent": 100.0 * n_tum / n_liver if n_liver else 0.0,
            "count_measurable": sum(1 for lesion in lesions if lesion["recist_measurable"]),
            "recist_min_diameter_mm": recist_min_diameter_mm(labels),
            "hu": _hu_stats(ct_crop, tumor),
            "lesions": lesions,
        },
    }


def stats_to_rows(stats: dict) -> list:
    """Flatten :func:`compute_statistics` output into table rows.

    One row per segment ("Liver", "Liver parenchyma", "Tumor") then one per lesion
    ("Lesion 1", ...). Columns are :data:`ROW_COLUMNS`; volumes in mL, lengths and
    centroids in RAS mm, intensities in HU; missing values are ``None``.
    ``percent_of_liver`` is the row's share of the whole liver's voxels (the Tumor row's
    is the tumor burden); ``None`` when no liver was found.
    """
    liver = stats["liver"]
    tumor = stats["tumor"]
    liver_voxels = liver["voxels"]

    def percent(voxels) -> Optional[float]:
        return 100.0 * voxels / liver_voxels if liver_voxels and voxels is not None else None

    def segment(name: str, volume: float, voxels, hu: dict) -> dict:
        row = dict.fromkeys(ROW_COLUMNS)
        row.update(name=name, kind="segment", volume_ml=volume, voxels=voxels, percent_of_liver=percent(voxels))
        row.update(mean_hu=hu.get("mean"), std_hu=hu.get("std"), min_hu=hu.get("min"), max_hu=hu.get("max"))
        return row

    rows = [
        dict(segment("Liver", liver["volume_ml"], liver["voxels"], liver["hu"]),
             touches_image_edge=liver.get("touches_image_edge")),
        segment("Liver parenchyma", liver["parenchyma_volume_ml"], liver.get("parenchyma_voxels"),
                liver["parenchyma_hu"]),
        segment("Tumor", tumor["volume_ml"], tumor["voxels"], tumor["hu"]),
    ]
    for lesion in tumor["lesions"]:
        row = dict.fromkeys(ROW_COLUMNS)
        r, a, s = lesion["centroid_mm"]
        row.update(
            name=f"Lesion {lesion['id']}",
            kind="lesion",
            volume_ml=lesion["volume_ml"],
            voxels=lesion["voxels"],
            percent_of_liver=percent(lesion["voxels"]),
            max_diameter_mm=lesion["max_diameter_mm"],
            max_axial_diameter_mm=lesion.get("max_axial_diameter_mm"),
            short_axis_mm=lesion.get("short_axis_mm"),
            centroid_r_mm=r,
            centroid_a_mm=a,
            centroid_s_mm=s,
            mean_hu=lesion["mean_hu"],
            std_hu=lesion.get("std_hu"),
            min_hu=lesion.get("min_hu"),
            max_hu=lesion.get("max_hu"),
            touches_image_edge=lesion.get("touches_image_edge"),
            recist_measurable=lesion.get("recist_measurable"),
        )
        rows.append(row)
    return rows


def summary(stats: dict) -> dict:
    """The headline figures: liver and tumor volume (mL), lesion count, burden (%)."""
    liver, tumor = stats["liver"], stats["tumor"]
    return {"liver_ml": round(liver["volume_ml"], 1), "tumor_ml": round(tumor["volume_ml"], 2),
            "lesions": tumor["count"], "burden_percent": round(tumor["burden_percent"], 2)}


def summary_text(stats: dict) -> str:
    """:func:`summary` as one line, as the command line prints it and Slicer shows it."""
    s = summary(stats)
    return (f"liver {s['liver_ml']} mL, tumor {s['tumor_ml']} mL in {s['lesions']} lesion(s), "
            f"burden {s['burden_percent']} %")


def write_stats_json(stats: dict, path: str | os.PathLike) -> None:
    """Write the statistics dict as indented JSON, atomically.

    Raises:
        OutputError: if the file cannot be written.
    """
    atomic_write_text(path, json.dumps(stats, indent=2) + "\n")


def write_stats_csv(stats: dict, path: str | os.PathLike) -> None:
    """Write :func:`stats_to_rows` as CSV (header line, empty cell for ``None``), atomically.

    Numbers are written with 15 significant digits (``1637.7795``, not the binary
    artefact ``1637.7794999999999``); ``stats.json`` keeps every digit. Yes/no columns
    read ``yes`` or ``no``.

    Raises:
        OutputError: if the file cannot be written.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(ROW_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in stats_to_rows(stats):
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, ".15g") if isinstance(value, float) else str(value)


#: Names of the patient's sides along LPS x, y and z: (towards negative, towards positive).
_SIDES = (("right", "left"), ("anterior", "posterior"), ("inferior", "superior"))


def image_edges(geometry: Volume, box) -> list:
    """The sides of ``geometry``'s image (``superior``, ``left``...; each axis named by
    the patient axis nearest to it) that the index box ``box`` ((z, y, x) slices)
    reaches: where what it bounds may go on outside the image."""
    shape = geometry.array.shape
    sides = []
    for axis in range(3):  # z, y, x = the k, j, i columns of direction
        column = geometry.direction[:, 2 - axis]
        nearest = int(np.argmax(np.abs(column)))
        towards_last = _SIDES[nearest][1 if column[nearest] > 0 else 0]
        towards_first = _SIDES[nearest][0 if column[nearest] > 0 else 1]
        if box[axis].start == 0:
            sides.append(towards_first)
        if box[axis].stop == shape[axis]:
            sides.append(towards_last)
    order = [side for pair in _SIDES[::-1] for side in pair[::-1]]  # superior, inferior, posterior...
    return sorted(set(sides), key=order.index)


def _superior_axis(geometry: Volume) -> int:
    """The grid axis (0, 1, 2 = i, j, k) nearest to the patient's superior-inferior axis."""
    return int(np.argmax(np.abs(geometry.direction[2])))  # LPS z row of the direction matrix


def slice_thickness_mm(geometry: Volume) -> float:
    """The spacing along the grid axis nearest to the patient's superior-inferior axis."""
    return float(geometry.spacing[_superior_axis(geometry)])


def recist_min_diameter_mm(geometry: Volume) -> float:
    """The smallest axial long axis RECIST 1.1 measures on this grid: 10 mm on slices of
    5 mm or thinner, else twice the slice thickness."""
    thickness = slice_thickness_mm(geometry)
    return RECIST_MIN_DIAMETER_MM if thickness <= RECIST_MAX_THIN_SLICE_MM else 2.0 * thickness


def max_diameter_mm(mask: np.ndarray, geometry: Volume, offset: tuple = (0, 0, 0)) -> float:
    """Largest distance in mm between the centres of any two voxels of ``mask``.

    Exact: the farthest pair of a point set is a pair of its convex-hull vertices, and
    hull vertices are found exactly on the voxel lattice (row end points, then 2D hulls
    slice by slice along each axis; an affine map keeps hull vertices), so only a few
    hundred candidates are compared by brute force in physical space.

    Args:
        mask: boolean array indexed (z, y, x) (may be a crop of the full grid).
        geometry: the volume whose ``ijk_to_lps`` maps indices to mm (spacing and
            direction are honoured, so anisotropic and oblique grids are exact).
        offset: (z, y, x) index of ``mask[0, 0, 0]`` in ``geometry``'s grid.

    Returns:
        The diameter in mm; 0.0 for a single voxel or an empty mask.
    """
    zyx = _hull_candidates(np.asarray(mask, dtype=bool))
    if len(zyx) < 2:
        return 0.0
    ijk = zyx[:, ::-1].astype(np.float64) + np.asarray(offset[::-1], dtype=np.float64)
    points = ijk @ (geometry.direction @ np.diag(geometry.spacing)).T
    return _brute_force_diameter(points)


def max_axial_diameter_mm(mask: np.ndarray, geometry: Volume, offset: tuple = (0, 0, 0)) -> float:
    """Largest in-slice distance in mm between voxel centres of ``mask``, over the slices
    of the grid axis closest to the patient's superior-inferior axis: the long axis that
    RECIST measures on axial slices (on an oblique grid, on its own slices nearest to
    axial). Same arguments as :func:`max_diameter_mm`; 0.0 for a one-voxel slice."""
    return axial_axes_mm(mask, geometry, offset, short=False)[0]


def axial_axes_mm(mask: np.ndarray, geometry: Volume, offset: tuple = (0, 0, 0), *, short: bool = True) -> tuple:
    """(long axis, short axis) in mm of ``mask`` on the slices nearest to axial.

    The long axis is :func:`max_axial_diameter_mm`. The short axis is the longest
    diameter perpendicular to it in the same slice (as RECIST 1.1's short axis of lymph
    nodes; the second of WHO's bidimensional measurements): the slice is cut into bands
    one pixel wide (the larger in-plane spacing) perpendicular to the long axis, the
    first centred on one of its end points, and the short axis is the largest distance
    across a band between voxel centres, measured perpendicular to the long axis. Where
    several slices or voxel pairs share the long axis (a sphere's), the largest short
    axis of theirs is taken. Same arguments as :func:`max_diameter_mm`; (0.0, 0.0) for
    an empty mask or a single voxel; a short axis of 0.0 for a straight row of voxels
    along a grid axis (a line one voxel thin at another angle gets less than a pixel),
    and always with ``short=False`` (the long axis alone, at its own cost).
    """
    mask = np.asarray(mask, dtype=bool)
    axis = 2 - _superior_axis(geometry)  # in (z, y, x) array order
    to_mm = geometry.direction @ np.diag(geometry.spacing)
    normal = geometry.direction[:, 2 - axis]  # the slices' normal (a direction column)
    pixel = float(max(s for a, s in enumerate(geometry.spacing) if a != 2 - axis))
    slices = []  # (index, candidate points in mm, (i, j) pairs at that slice's long axis)
    longest = 0.0
    for index in np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))).tolist():
        one = np.take(mask, [index], axis=axis)
        shift = np.asarray(offset, dtype=np.float64)
        shift[axis] += index
        points = (_hull_candidates(one) + shift)[:, ::-1] @ to_mm.T
        if len(points) < 2:
            continue
        d2 = ((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
        here = float(np.sqrt(d2.max()))
        ties = short and here >= longest - 1e-9  # a candidate for the short axis
        longest = max(longest, here)
        if ties:
            pairs = np.argwhere(np.triu(d2 >= d2.max() * (1 - 1e-12) - 1e-12, 1))
            slices.append((index, points, pairs, here, shift))
    short_axis = 0.0
    for index, points, pairs, here, shift in slices:
        if here < longest - 1e-9:
            continue
        zyx = np.argwhere(np.take(mask, [index], axis=axis)) + shift
        centres = zyx[:, ::-1] @ to_mm.T
        for i, j in pairs.tolist():
            along = (points[j] - points[i]) / here
            across = np.cross(normal, along)
            band = np.floor((centres - points[i]) @ along / pixel + 0.5).astype(np.int64)
            band -= band.min()
            width = centres @ across
            low = np.full(band.max() + 1, np.inf)
            high = np.full(band.max() + 1, -np.inf)
            np.minimum.at(low, band, width)
            np.maximum.at(high, band, width)
            short_axis = max(short_axis, float(np.max(high - low)))
    return longest, short_axis


# -- lesions ------------------------------------------------------------------------
def _lesions(tumor: np.ndarray, ct_crop: np.ndarray | None, geometry: Volume, offset: tuple) -> list:
    """Per-lesion measurements for the 26-connected components of a tumor crop."""
    import SimpleITK as sitk

    box = bounding_box(tumor)
    tumor = tumor[box]
    ct_crop = None if ct_crop is None else ct_crop[box]
    offset = tuple(o + s.start for o, s in zip(offset, box))
    image = sitk.GetImageFromArray(np.ascontiguousarray(tumor).view(np.uint8))
    components = sitk.RelabelComponent(sitk.ConnectedComponent(image, True), sortByObjectSize=True)
    cc = sitk.GetArrayViewFromImage(components)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(components)

    hu = {}
    if ct_crop is not None:
        hu = _hu_by_label(cc[tumor], ct_crop[tumor])
    minimum = recist_min_diameter_mm(geometry)

    ijk_to_ras = geometry.ijk_to_ras()
    off_xyz = np.asarray(offset[::-1], dtype=np.float64)
    lesions = []
    for label in sorted(shape.GetLabels()):
        x0, y0, z0, sx, sy, sz = shape.GetBoundingBox(label)
        sub = cc[z0:z0 + sz, y0:y0 + sy, x0:x0 + sx] == label
        centroid_ijk = np.asarray(shape.GetCentroid(label), dtype=np.float64) + off_xyz
        centroid = ijk_to_ras @ np.append(centroid_ijk, 1.0)
        voxels = int(shape.GetNumberOfPixels(label))
        corner = (offset[0] + z0, offset[1] + y0, offset[2] + x0)
        axial, short = axial_axes_mm(sub, geometry, corner)
        own_box = tuple(slice(start, start + size) for start, size in zip(corner, (sz, sy, sx)))
        lesions.append({
            "volume_ml": voxels * geometry.voxel_volume_ml,
            "voxels": voxels,
            "max_diameter_mm": max_diameter_mm(sub, geometry, corner),
            "max_axial_diameter_mm": axial,
            "short_axis_mm": short,
            "centroid_mm": [float(c) for c in centroid[:3]],
            **{f"{key}_hu": float(hu[key][label]) if hu else None for key in ("mean", "std", "min", "max")},
            "recist_measurable": bool(axial >= minimum),
            "touches_image_edge": bool(image_edges(geometry, own_box)),
        })
    lesions.sort(key=lambda item: -item["voxels"])
    return [{"id": i + 1, **item} for i, item in enumerate(lesions)]


def _hu_by_label(ids: np.ndarray, values: np.ndarray) -> dict:
    """Mean, population std, min and max of ``values`` for each label in ``ids``
    (arrays indexed by label)."""
    values = values.astype(np.float64)
    count = np.maximum(np.bincount(ids), 1)
    mean = np.bincount(ids, weights=values) / count
    variance = np.bincount(ids, weights=(values - mean[ids]) ** 2) / count
    low = np.full(count.shape, np.inf)
    high = np.full(count.shape, -np.inf)
    np.minimum.at(low, ids, values)
    np.maximum.at(high, ids, values)
    return {"mean": mean, "std": np.sqrt(variance), "min": low, "max": high}


def _hu_stats(ct_crop: np.ndarray | None, mask: np.ndarray) -> dict:
    """Mean, population std, min and max HU over ``mask`` (``None`` values if empty)."""
    if ct_crop is None or not mask.any():
        return {"mean": None, "std": None, "min": None, "max": None}
    values = ct_crop[mask].astype(np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


# -- exact diameter -----------------------------------------------------------------
def _hull_candidates(mask: np.ndarray) -> np.ndarray:
    """(n, 3) int (z, y, x) indices: a superset of the convex-hull vertices of ``mask``."""
    if not mask.any():
        return np.zeros((0, 3), dtype=np.int64)
    nx = mask.shape[2]
    has = mask.any(axis=2)
    zz, yy = np.nonzero(has)
    first = np.argmax(mask, axis=2)[has]
    last = nx - 1 - np.argmax(mask[:, :, ::-1], axis=2)[has]
    points = np.concatenate([
        np.stack([zz, yy, first], axis=1),
        np.stack([zz, yy, last], axis=1),
    ]).astype(np.int64)
    points = np.unique(points, axis=0)
    for axis in (0, 1, 2):
        points = _filter_by_slice_hulls(points, axis)
    return points


def _filter_by_slice_hulls(points: np.ndarray, axis: int) -> np.ndarray:
    """Keep the points that are 2D hull vertices within their slice along ``axis``.

    A 3D hull vertex is a hull vertex of every subset that contains it, in particular of
    its own slice, so no 3D hull vertex is lost.
    """
    others = [a for a in (0, 1, 2) if a != axis]
    order = np.lexsort((points[:, others[1]], points[:, others[0]], points[:, axis]))
    points = points[order]
    breaks = np.flatnonzero(np.diff(points[:, axis])) + 1
    keep = np.zeros(len(points), dtype=bool)
    u_all = points[:, others[0]].tolist()
    v_all = points[:, others[1]].tolist()
    for start, stop in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(points)].tolist()):
        for index in _hull_2d(u_all[start:stop], v_all[start:stop]):
            keep[start + index] = True
    return points[keep]


def _hull_2d(u: list, v: list) -> set:
    """Indices of the strict convex-hull vertices of distinct integer points sorted by (u, v).

    Andrew's monotone chain; collinear points are dropped, end points kept.
    """
    n = len(u)
    if n <= 2:
        return set(range(n))

    def chain(indices) -> list:
        hull: list = []
        for p in indices:
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                cross = (u[b] - u[a]) * (v[p] - v[a]) - (v[b] - v[a]) * (u[p] - u[a])
                if cross > 0:
                    break
                hull.pop()
            hull.append(p)
        return hull

    return set(chain(range(n))) | set(chain(range(n - 1, -1, -1)))


def _brute_force_diameter(points: np.ndarray, chunk: int = 2048) -> float:
    """Largest pairwise Euclidean distance of (n, 3) points, by chunked brute force."""
    best = 0.0
    for start in range(0, len(points), chunk):
        block = points[start:start + chunk]
        rest = points[start:]
        d2 = np.zeros((len(block), len(rest)))
        for axis in range(3):
            d2 += np.subtract.outer(block[:, axis], rest[:, axis]) ** 2
        best = max(best, float(d2.max()))
    return float(np.sqrt(best))
