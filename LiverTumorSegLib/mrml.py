"""The MRML bridge: segment a Slicer volume node, get the results as nodes in its scene.

Everything the Slicer module does to a scene lives here (and in :mod:`.mrml_nodes`,
:mod:`.mrml_check`, :mod:`.mrml_job`). It imports only MRML classes, so the same code
runs inside 3D Slicer and under the ``slicer-core`` wheel in pytest.

Entry points:

* :func:`segment_volume_node`: run the engine in this process (scripts, tests).
* :class:`~.mrml_job.SegmentationJob`: run it in a child process (the Slicer GUI).
* :func:`import_results`: nodes from the command line's output folder.
* :func:`results_to_nodes`: nodes from labels and statistics already in memory.

Results: a ``vtkMRMLSegmentationNode`` named after the volume, holding the ``Liver`` and
``Tumor`` segments with standard colors and SNOMED CT terminology and their closed
surfaces, and a ``vtkMRMLTableNode`` with the engine's statistics (a row per segment and
per lesion; RAS mm, mL, HU), both in the volume's subject-hierarchy study.

Geometry: the engine gets the volume's exact IJK-to-RAS (oblique directions included)
with any *linear* parent transform applied, so the model sees the patient as the viewer
shows it. Labels come back on the volume's own voxel grid and the segmentation follows
the same parent transform, so they overlay exactly. Non-linear parent transforms are
refused: harden them first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np

from .errors import Cancelled, InputError, LiverTumorSegError
from .mrml_check import assert_results, check_results, segment_array
from .mrml_nodes import LABELMAP_REPRESENTATION, SEGMENTS, fill_segmentation, fill_table, local_ijk_to_ras, \
    place_beside, restore_segmentation, restore_table, snapshot_segmentation, snapshot_table, table_statistics, \
    unique_name, world_matrix
from .result_checks import result_warnings
from .stats import stats_to_rows
from .volume import Volume

__all__ = [
    "segment_volume_node", "import_results", "results_to_nodes", "volume_from_node", "statistics_table",
    "export_statistics_csv", "export_surfaces", "check_results", "assert_results", "segment_array",
    "output_for_volume", "output_problem", "results_volume", "table_statistics", "update_statistics",
]

TABLE_REFERENCE_ROLE = "liverTumorSegStatistics"
#: ``run`` entries about the run's postprocessing, left out once statistics are updated
#: from edited segments (they no longer describe those).
RUN_POSTPROCESSING_KEYS = ("min_lesion_ml", "small_lesions_dropped", "liver_left_out_ml", "warnings")
GEOMETRY_TOLERANCE_MM = 1e-3


def volume_from_node(volume_node) -> Volume:
    """The engine's :class:`Volume` for a scalar volume node (world geometry).

    The array is a view of the node's voxels (no copy), indexed (z, y, x); spacing,
    origin and direction are LPS, derived from the node's IJK-to-RAS matrix after any
    linear parent transform.

    Raises:
        InputError: no node, a label map, no voxels, several components per voxel, a
            non-linear parent transform, or a sheared geometry.
    """
    from vtk.util import numpy_support

    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("Select a CT volume to segment.")
    name = volume_node.GetName()
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{name}' is a label map, not a CT volume. Select the CT image.")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None or 0 in image.GetDimensions():
        raise InputError(f"'{name}' has no voxels. Load the CT image again.")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"'{name}' has {image.GetNumberOfScalarComponents()} components per voxel (a color or "
                         "vector image); a CT is a single-component greyscale volume.")
    dims = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    ijk_to_ras = world_matrix(volume_node) @ local_ijk_to_ras(volume_node)
    volume = Volume.from_ijk_to_ras(array, ijk_to_ras)
    if not volume.is_orthonormal(tol=1e-4):
        raise InputError(f"'{name}' (with its transform) is sheared; harden and resample it before segmenting.")
    return volume


def results_volume(segmentation_node):
    """The volume whose geometry ``segmentation_node`` was made on (its reference image
    geometry node), or None (no node, no reference, or that volume was deleted)."""
    if segmentation_node is None:
        return None
    return segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())


def output_for_volume(segmentation_node, volume_node):
    """The output segmentation to offer when ``volume_node`` is chosen as input: the
    given one, or None (a new one) when it holds another volume's results. The panel
    keeps the last run's segmentation as the output; without this, picking the next
    patient and clicking Segment would overwrite the previous patient's results."""
    made_for = results_volume(segmentation_node)
    if made_for is not None and volume_node is not None and made_for.GetID() != volume_node.GetID():
        return None
    return segmentation_node


def output_problem(segmentation_node, volume_node) -> Optional[str]:
    """Why the results for ``volume_node`` must not be written into ``segmentation_node``
    (None: they may, or no node was given and new ones will be made).

    Refused: a node outside the volume's scene; a segmentation made on another volume
    (another patient's or series' results would be overwritten under its name); one
    whose segments are stored as closed surfaces (imported models), which switching it
    to labelmaps would lose.
    """
    if segmentation_node is None:
        return None
    name = segmentation_node.GetName()
    if segmentation_node.GetScene() is None or segmentation_node.GetScene() is not volume_node.GetScene():
        return f"The output segmentation '{name}' is not in the scene of '{volume_node.GetName()}'."
    reference = results_volume(segmentation_node)
    if reference is not None and reference.GetID() != volume_node.GetID():
        return (f"The output segmentation '{name}' belongs to '{reference.GetName()}', not to "
                f"'{volume_node.GetName()}'; its segments would be replaced. Choose another output "
                "segmentation, or none to create a new one.")
    segmentation = segmentation_node.GetSegmentation()
    source = segmentation.GetSourceRepresentationName() if hasattr(segmentation, "GetSourceRepresentationName") \
        else segmentation.GetMasterRepresentationName()
    others = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
              if segmentation.GetNthSegmentID(i) not in SEGMENTS]
    if others and source != LABELMAP_REPRESENTATION:
        return (f"The output segmentation '{name}' stores its segments as {source.lower()}s (imported models); "
                "LiverTumorSeg writes labelmap segments, and switching it would lose them. Choose another "
                "output segmentation, or none to create a new one.")
    return None


def _check_output(segmentation_node, volume_node) -> None:
    problem = output_problem(segmentation_node, volume_node)
    if problem:
        raise InputError(problem)


def segment_volume_node(volume_node, *, model=None, segmentation_node=None, show_3d: bool = True,
                        progress: Optional[Callable[[float, str], None]] = None,
                        cancel: Optional[Callable[[], bool]] = None, **options) -> Tuple[object, object]:
    """Segment a volume node in this process; returns (segmentation node, table node).

    Args:
        volume_node: the CT (``vtkMRMLScalarVolumeNode``, HU), in any scene.
        model: model name, folder or :class:`~LiverTumorSegLib.model.LoadedModel`;
            None is the bundled default.
        segmentation_node: write into this node (its Liver and Tumor segments are
            replaced, others kept); None creates one named after the volume.
        show_3d: show the closed surfaces in 3D views.
        progress: called with (fraction done, message).
        cancel: returning True stops the run; the scene is then left unchanged.
        **options: fields of :class:`~LiverTumorSegLib.pipeline.SegmentOptions`
            (``device``, ``fast``, ``overlap``, ...).

    Raises:
        LiverTumorSegError: the engine's clear errors (bad input, model, resources);
            :class:`Cancelled` when cancelled. The scene is unchanged in both cases.
    """
    from .pipeline import Segmenter, SegmentOptions

    ct = volume_from_node(volume_node)
    _check_output(segmentation_node, volume_node)
    segmenter = Segmenter(model, SegmentOptions(**options))
    result = segmenter.segment(ct, progress=progress, cancel=cancel)
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")
    stats = dict(result.stats)
    stats["run"] = dict(result.info, timings_s={k: round(v, 3) for k, v in result.timings.items()},
                        input=volume_node.GetName())
    return results_to_nodes(volume_node, result.labels.array, stats, segmentation_node=segmentation_node,
                            show_3d=show_3d)


def import_results(volume_node, outdir, *, segmentation_node=None, show_3d: bool = True,
                   input_name: Optional[str] = None) -> Tuple[object, object]:
    """Nodes from a command-line output folder (``segmentation.nii.gz`` and
    ``stats.json``) made from this volume node; returns (segmentation, table).
    ``input_name`` replaces the statistics' ``run.input`` (the file the command line
    read), e.g. by the volume's name when that file was a temporary copy.

    Raises:
        InputError: the folder lacks the files, or the labels are not on the volume's grid.
    """
    from .io import read_volume

    outdir = Path(outdir)
    seg_path, stats_path = outdir / "segmentation.nii.gz", outdir / "stats.json"
    if not seg_path.is_file() or not stats_path.is_file():
        raise InputError(f"{outdir} holds no segmentation results (segmentation.nii.gz and stats.json).")
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{stats_path} is not valid JSON: {exc}") from None
    if input_name is not None and isinstance(stats.get("run"), dict):
        stats["run"]["input"] = input_name
    labels = read_volume(seg_path)
    ct = volume_from_node(volume_node)
    if not labels.same_grid(ct, tol=GEOMETRY_TOLERANCE_MM):
        raise InputError(f"The results in {outdir} are not on the voxel grid of '{volume_node.GetName()}' "
                         "(size, spacing, origin or direction differ); were they made from another volume?")
    return results_to_nodes(volume_node, np.asarray(labels.array, dtype=np.uint8), stats,
                            segmentation_node=segmentation_node, show_3d=show_3d)


def results_to_nodes(volume_node, labels: np.ndarray, stats: dict, *, segmentation_node=None,
                     show_3d: bool = True) -> Tuple[object, object]:
    """Build (or update) the segmentation and table nodes from labels and statistics.

    Args:
        volume_node: the CT the labels belong to; the nodes go into its scene and study.
        labels: (z, y, x) uint8 array on the volume's voxel grid (0, 1 liver parenchyma, 2 tumor).
        stats: :func:`~LiverTumorSegLib.stats.compute_statistics` output (``stats.json``).
        segmentation_node: existing node to update (its previous statistics table is
            reused), or None for new nodes named after the volume. Refused when
            :func:`output_problem` finds one.

    If anything fails, nodes created here are removed again, and an existing
    segmentation gets its segments, transform and reference geometry back and its table
    its rows and statistics, so the scene is unchanged.
    """
    scene = volume_node.GetScene()
    if scene is None:
        raise InputError(f"'{volume_node.GetName()}' is not in a scene.")
    dims = volume_node.GetImageData().GetDimensions()
    if tuple(labels.shape) != tuple(dims[::-1]):
        raise InputError(f"labels of shape {labels.shape} (z, y, x) do not fit the volume's {dims[::-1]}")
    _check_output(segmentation_node, volume_node)
    try:
        stats_to_rows(stats)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"the statistics are incomplete or malformed ({type(exc).__name__}: {exc})") from None
    base = volume_node.GetName() or "Volume"
    created = []
    snapshot = None if segmentation_node is None else snapshot_segmentation(segmentation_node)
    table_snapshot = None
    scene.StartState(scene.BatchProcessState)
    try:
        if segmentation_node is None:
            segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                        unique_name(scene, f"{base} segmentation"))
            created.append(segmentation_node)
        table_node = segmentation_node.GetNodeReference(TABLE_REFERENCE_ROLE)
        if table_node is None:
            table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", unique_name(scene, f"{base} statistics"))
            created.append(table_node)
        else:
            table_snapshot = snapshot_table(table_node)
        fill_segmentation(segmentation_node, volume_node, labels, show_3d=show_3d)
        fill_table(table_node, stats)
        segmentation_node.SetNodeReferenceID(TABLE_REFERENCE_ROLE, table_node.GetID())
        place_beside(volume_node, [segmentation_node, table_node])
    except Exception:
        for node in created:
            scene.RemoveNode(node)
        if snapshot is not None:
            restore_segmentation(segmentation_node, snapshot)
        if table_snapshot is not None:
            restore_table(table_snapshot)
        raise
    finally:
        scene.EndState(scene.BatchProcessState)
    return segmentation_node, table_node


def update_statistics(segmentation_node, volume_node=None):
    """Recompute the statistics table from the Liver and Tumor segments as they are now
    (after corrections in Segment Editor); returns the table node.

    Liver is the whole organ and Tumor counts as liver too, wherever it was painted. The
    CT is ``volume_node``, by default the volume the segmentation was made on. The
    statistics keep the run's provenance, marked ``run.updated_from_segments``; the
    segments are measured as drawn, so the run's postprocessing entries
    (:data:`RUN_POSTPROCESSING_KEYS`) are left out and the warnings are the segments' own.

    Raises:
        InputError: no Liver segment, or no volume to measure on.
    """
    from .mrml_check import segment_array
    from .stats import compute_statistics

    segmentation = segmentation_node.GetSegmentation() if segmentation_node is not None else None
    if segmentation is None or segmentation.GetSegment("Liver") is None:
        raise InputError("This segmentation has no Liver segment to measure; segment a volume first.")
    volume_node = volume_node or results_volume(segmentation_node)
    if volume_node is None:
        raise InputError(f"'{segmentation_node.GetName()}' was made on no volume that is still in the scene; "
                         "choose the CT to measure on.")
    ct = volume_from_node(volume_node)
    labels = np.zeros(ct.array.shape, dtype=np.uint8)
    labels[segment_array(segmentation_node, "Liver", volume_node)] = 1
    if segmentation.GetSegment("Tumor") is not None:
        labels[segment_array(segmentation_node, "Tumor", volume_node)] = 2
    stats = compute_statistics(ct.with_array(labels), ct)
    table_node = statistics_table(segmentation_node)
    previous = table_statistics(table_node) if table_node is not None else None
    # The run's provenance stays; what described its postprocessing does not describe the
    # segments as corrected (no small lesion is dropped from what the user drew).
    run = {key: value for key, value in (previous or {}).get("run", {}).items() if key not in RUN_POSTPROCESSING_KEYS}
    stats["run"] = dict(run, updated_from_segments=True, warnings=result_warnings(labels, ct.array, stats))
    if table_node is None:  # a segmentation made elsewhere: the table goes beside the volume
        scene = segmentation_node.GetScene()
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode",
                                             unique_name(scene, f"{volume_node.GetName() or 'Volume'} statistics"))
        segmentation_node.SetNodeReferenceID(TABLE_REFERENCE_ROLE, table_node.GetID())
        place_beside(volume_node, [table_node])
    fill_table(table_node, stats)
    return table_node


def statistics_table(segmentation_node):
    """The statistics table node made with this segmentation node, or None."""
    return None if segmentation_node is None else segmentation_node.GetNodeReference(TABLE_REFERENCE_ROLE)


def export_statistics_csv(table_node, path) -> Path:
    """Write the table's statistics as CSV, exactly as the command line's ``stats.csv``."""
    from .stats import write_stats_csv

    stats = table_statistics(table_node)
    if stats is None:
        raise InputError("This table holds no LiverTumorSeg statistics; segment a volume first.")
    write_stats_csv(stats, path)
    return Path(path)


def export_surfaces(segmentation_node, folder, file_format: str = "STL") -> list:
    """Write the Liver and Tumor closed surfaces as STL or OBJ files (LPS mm, as the
    command line writes them) into ``folder``; returns the paths written."""
    import slicer
    import vtk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    segmentation = segmentation_node.GetSegmentation() if segmentation_node is not None else None
    ids = vtk.vtkStringArray()
    for segment_id in ("Liver", "Tumor"):
        if segmentation is not None and segmentation.GetSegment(segment_id) is not None:
            ids.InsertNextValue(segment_id)
    if ids.GetNumberOfValues() == 0:
        raise InputError("This segmentation has no Liver or Tumor segment to export; segment a volume first.")
    before = set(folder.iterdir())
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsClosedSurfaceRepresentationToFiles(
        str(folder), segmentation_node, ids, file_format.upper(), True, 1.0, False)
    if not ok:
        raise LiverTumorSegError(f"Could not write the surfaces into {folder}; is it writable?")
    return sorted(set(folder.iterdir()) - before) or sorted(folder.iterdir())
