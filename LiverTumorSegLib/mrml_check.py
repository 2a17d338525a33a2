"""Checking result nodes: the one routine that the pytest suite and the Slicer
self-test (``LiverTumorSegTest``) both call, so both check the same things.

:func:`check_results` returns a list of problems (empty when all is well);
:func:`assert_results` raises ``AssertionError`` listing them.
"""

from __future__ import annotations

import math
from typing import List, Mapping, Optional, Union

import numpy as np

from .mrml_nodes import SEGMENTS, get_terminology, local_ijk_to_ras, table_rows, table_statistics, world_matrix
from .stats import stats_to_rows

SURFACE_TOLERANCE = 0.03
MIN_SURFACE_CHECK_ML = 20.0
VALUE_RTOL = 1e-6


def segment_array(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A segment as a (z, y, x) bool array on ``volume_node``'s voxel grid.

    The segment's labelmap is resampled (nearest neighbour) onto the volume's geometry,
    so a segment that is misplaced, flipped or shifted shows up as a different mask.
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    from .mrml_nodes import vtk_matrix

    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    dims = volume_node.GetImageData().GetDimensions()
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    reference.SetImageToWorldMatrix(vtk_matrix(local_ijk_to_ras(volume_node)))
    if labelmap.IsEmpty():
        return np.zeros(dims[::-1], dtype=bool)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False, True)
    extent = resampled.GetExtent()
    if extent != (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1):
        padder = vtk.vtkImageConstantPad()
        padder.SetInputData(resampled)
        padder.SetOutputWholeExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
        padder.Update()
        resampled = padder.GetOutput()
    array = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(dims[::-1])
    return array > 0


def _labelmap_ml(segmentation_node, segment_id: str, voxel_ml: float, volume_node) -> float:
    return float(segment_array(segmentation_node, segment_id, volume_node).sum()) * voxel_ml


def _surface_ml(segmentation_node, segment_id: str) -> Optional[float]:
    import vtk

    polydata = vtk.vtkPolyData()
    if not segmentation_node.GetClosedSurfaceRepresentation(segment_id, polydata) or polydata.GetNumberOfPoints() == 0:
        return None
    mass = vtk.vtkMassProperties()
    mass.SetInputData(polydata)
    mass.Update()
    return mass.GetVolume() / 1000.0


# The Dice the bundled demo model must reach on the self-test's phantom (make_phantom(4,
# preset="coarse")); the Slicer self-test and Testing/test_bundled_model.py both use it.
# Measured with demo-phantom 1.1.0: Liver 0.835, Tumor 0.774 (bf16; 0.775 at fp32): 4
# lesions predicted, overlapping 3 of the phantom's 7 (32.8, 12.6 and 2.5 mL). 1.0.0 found
# no tumour (Liver 0.88).
SELF_TEST_PHANTOM_SEED = 4
SELF_TEST_MIN_DICE = {"Liver": 0.8, "Tumor": 0.5}


def check_results(segmentation_node, table_node, *, volume_node=None, stats: Optional[dict] = None,
                  labels: Optional[np.ndarray] = None, min_dice: Union[float, Mapping[str, float]] = 1.0,
                  surface_tolerance: float = SURFACE_TOLERANCE,
                  min_surface_check_ml: float = MIN_SURFACE_CHECK_ML) -> List[str]:
    """Everything a result must satisfy; returns the problems found.

    Checks: Liver and Tumor segments with their names, standard colors and SNOMED CT
    terminology; closed surfaces present, and for segments of at least
    ``min_surface_check_ml`` their volume within ``surface_tolerance`` (fraction) of the
    labelmap volume (smaller structures lose more to marching cubes at voxel scale); the
    table's rows equal :func:`stats_to_rows` of ``stats`` (default: the statistics stored
    on the table) and its Liver and Tumor volumes equal the segments'. With
    ``volume_node``: the segmentation uses the volume's geometry, parent transform and
    study. With ``labels`` ((z, y, x) array on the volume grid): each segment overlaps the
    expected voxels with a Dice of at least ``min_dice`` (1.0: exactly; a mapping gives one
    per segment ID; this is what catches flipped, shifted or misaligned results).
    """
    problems: List[str] = []
    if segmentation_node is None or table_node is None:
        return ["no segmentation node or no table node"]
    segmentation = segmentation_node.GetSegmentation()
    for segment_id, (name, values, color, terminology, _) in SEGMENTS.items():
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            problems.append(f"segment {segment_id!r} is missing")
            continue
        if segment.GetName() != name:
            problems.append(f"segment {segment_id!r} is named {segment.GetName()!r}, not {name!r}")
        if not np.allclose(segment.GetColor(), color, atol=1e-3):
            problems.append(f"segment {name} has color {tuple(segment.GetColor())}, not {color}")
        if get_terminology(segment) != terminology:
            problems.append(f"segment {name} has terminology {get_terminology(segment)!r}, not {terminology!r}")
    problems += _check_table(table_node, stats)
    if volume_node is not None:
        problems += _check_geometry(segmentation_node, table_node, volume_node, labels, min_dice,
                                    surface_tolerance, min_surface_check_ml)
    return problems


def _check_table(table_node, stats: Optional[dict]) -> List[str]:
    stats = stats if stats is not None else table_statistics(table_node)
    if stats is None:
        return ["the table holds no statistics document"]
    expected, actual = stats_to_rows(stats), table_rows(table_node)
    if len(expected) != len(actual):
        return [f"the table has {len(actual)} rows, the statistics {len(expected)}"]
    problems = []
    for want, got in zip(expected, actual):
        for column, value in want.items():
            have = got.get(column)
            same = (value is None and have is None) or (
                isinstance(value, str) and value == have) or (
                value is not None and have is not None and not isinstance(value, str)
                and math.isclose(float(value), float(have), rel_tol=VALUE_RTOL, abs_tol=1e-9))
            if not same:
                problems.append(f"table row {want['name']!r}, column {column}: {have!r} != {value!r}")
    return problems


def _check_geometry(segmentation_node, table_node, volume_node, labels, min_dice, tolerance, min_ml) -> List[str]:
    problems = []
    if segmentation_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
        problems.append("the segmentation is not under the volume's parent transform")
    problems += _check_study(segmentation_node, table_node, volume_node)
    spacing = np.linalg.norm((world_matrix(volume_node) @ local_ijk_to_ras(volume_node))[:3, :3], axis=0)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = {row["name"]: row for row in table_rows(table_node)}
    for segment_id, (name, values, *_rest) in SEGMENTS.items():
        if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            continue
        mask = segment_array(segmentation_node, segment_id, volume_node)
        labelmap_ml = float(mask.sum()) * voxel_ml
        if labels is not None:
            expected = np.isin(np.asarray(labels), values)
            total = int(expected.sum() + mask.sum())
            dice = 1.0 if total == 0 else 2.0 * np.count_nonzero(expected & mask) / total
            wanted = min_dice.get(segment_id, 1.0) if isinstance(min_dice, Mapping) else min_dice
            if dice < wanted:
                problems.append(f"segment {name} overlaps the expected labels with Dice {dice:.4f} < {wanted} "
                                f"({int(np.count_nonzero(expected != mask))} voxels differ: misaligned, flipped "
                                "or shifted?)")
        if name in rows and not math.isclose(rows[name]["volume_ml"], labelmap_ml, rel_tol=1e-6, abs_tol=1e-9):
            problems.append(f"table says {name} is {rows[name]['volume_ml']:.3f} mL, the segment is "
                            f"{labelmap_ml:.3f} mL")
        surface_ml = _surface_ml(segmentation_node, segment_id)
        if labelmap_ml > 0 and surface_ml is None:
            problems.append(f"segment {name} has no closed surface")
        elif labelmap_ml >= min_ml and abs(surface_ml - labelmap_ml) > tolerance * labelmap_ml:
            problems.append(f"segment {name}: closed surface {surface_ml:.2f} mL vs labelmap {labelmap_ml:.2f} mL "
                            f"(more than {tolerance:.0%} apart)")
    return problems


def _check_study(segmentation_node, table_node, volume_node) -> List[str]:
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volume_node.GetScene())
    if sh is None:
        return []
    volume_item = sh.GetItemByDataNode(volume_node)
    parent = sh.GetItemParent(volume_item) if volume_item else sh.GetSceneItemID()
    problems = []
    for node in (segmentation_node, table_node):
        item = sh.GetItemByDataNode(node)
        if not item or sh.GetItemParent(item) != parent:
            problems.append(f"{node.GetName()} is not in the volume's subject-hierarchy study")
    return problems


def assert_results(segmentation_node, table_node, **kwargs) -> None:
    """:func:`check_results`, raising ``AssertionError`` with every problem found."""
    problems = check_results(segmentation_node, table_node, **kwargs)
    if problems:
        raise AssertionError("LiverTumorSeg results are wrong:\n  " + "\n  ".join(problems))
