"""Building the result nodes in an MRML scene: segments, closed surfaces, the table.

Imports only MRML classes (``slicer`` inside 3D Slicer, or the ``slicer-core`` wheel),
never Qt or the Slicer application, so it runs the same inside Slicer and in pytest.

Segments (both in the volume's own voxel grid, so they overlay exactly):

* ``Liver``: the whole organ, labels 1 and 2 (parenchyma and tumor), the same region
  as the table's "Liver" row and the command line's ``liver.stl``.
* ``Tumor``: label 2.

Terminology strings use Slicer's serialization (``context~category~type~modifier~
regionContext~region~regionModifier``, each code ``scheme^value^meaning``); colors are
Slicer's standard ones (liver from the DICOM / Slicer General Anatomy lists, tumor the
standard lesion "mass" color).
"""

from __future__ import annotations

import json
import math
from typing import Iterable, List, Optional

import numpy as np

from .boxes import class_mask
from .errors import InputError, LiverTumorSegError
from .stats import ROW_COLUMNS, YES_NO_COLUMNS, stats_to_rows

DICOM_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"
LIVER_TERMINOLOGY = (f"{DICOM_CONTEXT}~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
                     f"~{ANATOMY_CONTEXT}~^^~^^")
TUMOR_TERMINOLOGY = (f"{DICOM_CONTEXT}~SCT^49755003^Morphologically Altered Structure~SCT^108369006^Neoplasm~^^"
                     f"~{ANATOMY_CONTEXT}~SCT^10200004^Liver~^^")

#: segment ID -> (name, label values, RGB color in [0, 1], terminology, 3D opacity)
SEGMENTS = {
    "Liver": ("Liver", (1, 2), (221 / 255, 130 / 255, 101 / 255), LIVER_TERMINOLOGY, 0.4),
    "Tumor": ("Tumor", (2,), (144 / 255, 238 / 255, 144 / 255), TUMOR_TERMINOLOGY, 1.0),
}
#: Closed-surface smoothing: lower than Slicer's 0.5 so lesions of a few voxels keep
#: their volume in 3D (at 3 mm voxels, 0.5 shrinks a 12 mm lesion to ~16 %).
SURFACE_SMOOTHING = "0.2"
STATS_ATTRIBUTE = "LiverTumorSeg.Statistics"
#: Slicer's name of the labelmap representation (vtkSegmentationConverter's).
LABELMAP_REPRESENTATION = "Binary labelmap"
COLUMN_INFO = {  # column -> (title shown in Slicer, unit, description)
    "name": ("Name", "", "Segment or lesion name"),
    "kind": ("Kind", "", "segment or lesion"),
    "volume_ml": ("Volume (mL)", "mL", "Volume"),
    "voxels": ("Voxels", "", "Number of voxels"),
    "percent_of_liver": ("% of liver", "%", "Share of the whole liver's volume (Tumor row: tumor burden)"),
    "max_diameter_mm": ("Max diameter (mm)", "mm", "Largest distance between two voxel centres of the lesion"),
    "max_axial_diameter_mm": ("Max axial diameter (mm)", "mm",
                              "Largest in-slice distance between two voxel centres on the slices nearest to axial "
                              "(the long axis RECIST measures)"),
    "short_axis_mm": ("Short axis (mm)", "mm",
                      "Longest diameter perpendicular to the axial long axis, in its slice (as RECIST 1.1's nodal "
                      "short axis; WHO's second diameter)"),
    "centroid_r_mm": ("Centroid R (mm)", "mm", "Centroid, R coordinate (RAS)"),
    "centroid_a_mm": ("Centroid A (mm)", "mm", "Centroid, A coordinate (RAS)"),
    "centroid_s_mm": ("Centroid S (mm)", "mm", "Centroid, S coordinate (RAS)"),
    "mean_hu": ("Mean (HU)", "HU", "Mean intensity"),
    "std_hu": ("Std (HU)", "HU", "Standard deviation of the intensity (population; Segment Statistics "
                                 "shows the sample one, a little larger for small lesions)"),
    "min_hu": ("Min (HU)", "HU", "Minimum intensity"),
    "max_hu": ("Max (HU)", "HU", "Maximum intensity"),
    "touches_image_edge": ("At image edge", "", "yes: it reaches the edge of the image and may go on outside the "
                                                "scan, so its volume and size are lower bounds"),
    "recist_measurable": ("RECIST measurable", "", "yes: axial long axis of at least 10 mm (twice the slice "
                                                   "thickness on slices thicker than 5 mm), RECIST 1.1"),
}
TEXT_COLUMNS = ("name", "kind")


def register_converter_rules() -> None:
    """Register the labelmap <-> closed surface converters once (Slicer does this at
    start-up; the bare MRML wheel does not). Only segmentations created afterwards get
    them, so this runs when this module is imported."""
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    present = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for name in ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule"):
        if name not in present and hasattr(slicer, name):
            factory.RegisterConverterRule(getattr(slicer, name)())


def vtk_matrix(array: np.ndarray):
    """A vtkMatrix4x4 from a 4x4 numpy array."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(array[row, col]))
    return matrix


def numpy_matrix(matrix) -> np.ndarray:
    """A 4x4 numpy array from a vtkMatrix4x4."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def local_ijk_to_ras(volume_node) -> np.ndarray:
    """The volume node's own IJK-to-RAS (4x4, without any parent transform)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return numpy_matrix(matrix)


def world_matrix(node) -> np.ndarray:
    """4x4 matrix of the node's parent transform to world (identity if none).

    Raises:
        InputError: if the parent transform is not linear.
    """
    import vtk

    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise InputError(f"'{node.GetName()}' is under a non-linear transform. Harden the transform "
                         "(Data module: right-click > Harden transform) and segment again.")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return numpy_matrix(matrix)


def oriented_mask(mask: np.ndarray, ijk_to_ras: np.ndarray):
    """A vtkOrientedImageData (uint8 0/1) holding ``mask`` ((z, y, x) array), cropped to
    its bounding box but keeping the full grid's IJK-to-RAS, so it overlays exactly."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(vtk_matrix(ijk_to_ras))
    nonzero = [np.flatnonzero(mask.any(axis=axes)) for axes in ((0, 1), (0, 2), (1, 2))]  # x, y, z
    if any(len(n) == 0 for n in nonzero):
        image.SetExtent(0, -1, 0, -1, 0, -1)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        return image
    (x0, x1), (y0, y1), (z0, z1) = ((int(n[0]), int(n[-1])) for n in nonzero)
    image.SetExtent(x0, x1, y0, y1, z0, z1)
    crop = np.ascontiguousarray(mask[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1], dtype=np.uint8)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(crop.ravel(), deep=True,
                                                               array_type=vtk.VTK_UNSIGNED_CHAR))
    return image


def set_terminology(segment, entry: str) -> None:
    """Set a segment's terminology entry (Slicer >= 5.8 API, else the segment tag)."""
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(entry)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def get_terminology(segment) -> str:
    """A segment's serialized terminology entry ('' if none)."""
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology() or ""
    value = segment.GetTag(segment.GetTerminologyEntryTagName())
    return value if isinstance(value, str) else ""


def fill_segmentation(segmentation_node, volume_node, labels: np.ndarray, *, show_3d: bool = True) -> None:
    """Replace the Liver and Tumor segments of ``segmentation_node`` with ``labels``.

    ``labels`` is the (z, y, x) uint8 label array on the volume's voxel grid. The node
    follows the volume's parent transform and reference geometry; other segments the
    user may have added are kept. Closed surfaces are made and shown in 3D when asked.
    """
    import slicer

    register_converter_rules()
    ijk_to_ras = local_ijk_to_ras(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    to_labelmap = getattr(segmentation_node, "SetSourceRepresentationToBinaryLabelmap", None) or \
        segmentation_node.SetMasterRepresentationToBinaryLabelmap
    to_labelmap()
    segmentation = segmentation_node.GetSegmentation()
    segmentation.SetConversionParameter("Smoothing factor", SURFACE_SMOOTHING)
    for segment_id, (name, values, color, terminology, _) in SEGMENTS.items():
        if segmentation.GetSegment(segment_id) is not None:
            segmentation.RemoveSegment(segment_id)
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.SetColor(*color)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        set_terminology(segment, terminology)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                                  oriented_mask(class_mask(labels, values), ijk_to_ras))
        segmentation.AddSegment(segment, segment_id)
    segmentation_node.RemoveClosedSurfaceRepresentation()
    if not segmentation_node.CreateClosedSurfaceRepresentation():
        raise LiverTumorSegError("Slicer could not create the closed-surface (3D) representation of the segments.")
    display = segmentation_node.GetDisplayNode()
    display.SetPreferredDisplayRepresentationName3D(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    for segment_id, (*_, opacity) in SEGMENTS.items():
        display.SetSegmentOpacity3D(segment_id, opacity)
    display.SetVisibility3D(bool(show_3d))


def snapshot_segmentation(segmentation_node) -> tuple:
    """What :func:`fill_segmentation` changes in an existing node: a deep copy of its
    segments (with their representations and conversion parameters), its parent
    transform and its reference geometry volume. For :func:`restore_segmentation`."""
    import slicer

    copy = slicer.vtkSegmentation()
    copy.DeepCopy(segmentation_node.GetSegmentation())
    role = segmentation_node.GetReferenceImageGeometryReferenceRole()
    return copy, segmentation_node.GetTransformNodeID(), segmentation_node.GetNodeReferenceID(role)


def restore_segmentation(segmentation_node, snapshot: tuple) -> None:
    """Put back what :func:`snapshot_segmentation` saved (after a failed update)."""
    copy, transform_id, reference_id = snapshot
    segmentation_node.GetSegmentation().DeepCopy(copy)
    segmentation_node.SetAndObserveTransformNodeID(transform_id)
    segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(), reference_id)


def snapshot_table(table_node) -> tuple:
    """A table node's rows and statistics document, for :func:`restore_table`."""
    import vtk

    copy = vtk.vtkTable()
    copy.DeepCopy(table_node.GetTable())
    return table_node, copy, table_node.GetAttribute(STATS_ATTRIBUTE)


def restore_table(snapshot: tuple) -> None:
    """Put back what :func:`snapshot_table` saved (after a failed update)."""
    table_node, copy, stats_text = snapshot
    table_node.GetTable().DeepCopy(copy)
    table_node.SetAttribute(STATS_ATTRIBUTE, stats_text)
    table_node.Modified()


def fill_table(table_node, stats: dict) -> None:
    """Fill ``table_node`` with :func:`~LiverTumorSegLib.stats.stats_to_rows`: a row per
    segment, then a row per lesion; missing values are NaN. The whole statistics document
    is kept as JSON in the node attribute :data:`STATS_ATTRIBUTE` (for CSV export)."""
    import vtk

    rows = stats_to_rows(stats)
    table_node.RemoveAllColumns()
    table = table_node.GetTable()
    for column in ROW_COLUMNS:
        text = column in TEXT_COLUMNS or column in YES_NO_COLUMNS
        array = vtk.vtkStringArray() if text else vtk.vtkDoubleArray()
        array.SetName(column)
        for row in rows:
            value = row[column]
            if column in YES_NO_COLUMNS:
                array.InsertNextValue("" if value is None else "yes" if value else "no")
            elif text:
                array.InsertNextValue("" if value is None else str(value))
            else:
                array.InsertNextValue(math.nan if value is None else float(value))
        table.AddColumn(array)
    for column, (title, unit, description) in COLUMN_INFO.items():
        table_node.SetColumnTitle(column, title)
        if unit:
            table_node.SetColumnUnitLabel(column, unit)
        table_node.SetColumnDescription(column, description)
    use_titles = getattr(table_node, "SetUseColumnTitleAsColumnHeader", None)
    if use_titles is not None:
        use_titles(True)
    else:
        table_node.SetUseColumnNameAsColumnHeader(True)
    table_node.SetAttribute(STATS_ATTRIBUTE, json.dumps(stats))
    table_node.SetLocked(True)
    table_node.Modified()


def table_rows(table_node) -> List[dict]:
    """Read a table made by :func:`fill_table` back as :func:`stats_to_rows`-like dicts
    (NaN becomes None, voxel counts become int)."""
    table = table_node.GetTable()
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            column = table.GetColumn(c)
            name = column.GetName()
            if name in YES_NO_COLUMNS:
                row[name] = {"yes": True, "no": False}.get(column.GetValue(r))
            elif column.IsA("vtkStringArray"):
                row[name] = column.GetValue(r)
            else:
                value = float(column.GetValue(r))
                row[name] = None if math.isnan(value) else (int(value) if name == "voxels" else value)
        rows.append(row)
    return rows


def table_statistics(table_node) -> Optional[dict]:
    """The statistics document stored on a table made by :func:`fill_table`, if any."""
    text = table_node.GetAttribute(STATS_ATTRIBUTE) if table_node is not None else None
    return json.loads(text) if text else None


def place_beside(volume_node, nodes: Iterable) -> None:
    """Put ``nodes`` under the volume's parent subject-hierarchy item (its study), or the
    scene root when the volume has none. Items are created where no SH plugin did."""
    import slicer

    scene = volume_node.GetScene()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    volume_item = sh.GetItemByDataNode(volume_node)
    parent = sh.GetItemParent(volume_item) if volume_item else sh.GetSceneItemID()
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:
            sh.CreateItem(parent, node)


def unique_name(scene, base: str) -> str:
    """``base``, or ``base_1``... if a node of that name exists in the scene."""
    return scene.GenerateUniqueName(base) if scene.GetFirstNodeByName(base) is not None else base


register_converter_rules()
