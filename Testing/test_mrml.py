"""The MRML bridge with Slicer's real MRML classes (the ``slicer-core`` wheel), on the CPU.

Volumes are loaded through Slicer's own storage node, go through the engine (in this
process and as a child process, the way the Slicer module runs it) and come back as a
segmentation node and a table node, which :func:`LiverTumorSegLib.mrml.check_results`
(the routine the in-Slicer self-test calls too) checks.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (Slicer's MRML classes)")

from LiverTumorSegLib import mrml  # noqa: E402
from LiverTumorSegLib.cli import main  # noqa: E402
from LiverTumorSegLib.errors import Cancelled, InputError  # noqa: E402
from LiverTumorSegLib.io import read_volume, write_volume  # noqa: E402
from LiverTumorSegLib.mrml_check import segment_array  # noqa: E402
from LiverTumorSegLib.mrml_job import SegmentationJob  # noqa: E402
from LiverTumorSegLib.mrml_nodes import SEGMENTS, get_terminology, local_ijk_to_ras, table_rows, vtk_matrix  # noqa: E402
from LiverTumorSegLib.runner import EngineRun, build_command, missing_dependencies, parse_stderr_line, \
    parse_stdout_line  # noqa: E402
from LiverTumorSegLib.result_checks import result_warnings  # noqa: E402
from LiverTumorSegLib.stats import compute_statistics, stats_to_rows, write_stats_csv  # noqa: E402
from LiverTumorSegLib.volume import Volume  # noqa: E402

from .oracle import analytic_ct, oracle_model, rotation  # noqa: E402

OBLIQUE = rotation("z", 25.0) @ rotation("x", -12.0)


# -- fixtures -------------------------------------------------------------------------
def load_volume(scene, path, name="CT", study=True):
    """A scalar volume node read by Slicer's vtkMRMLVolumeArchetypeStorageNode, placed in
    a patient/study of the subject hierarchy as Slicer's DICOM import would."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    sh = scene.GetSubjectHierarchyNode()
    parent = sh.GetSceneItemID()
    if study:
        parent = sh.CreateStudyItem(sh.CreateSubjectItem(parent, "Patient"), "Study")
    sh.CreateItem(parent, node)
    return node


def scene_snapshot(scene):
    """Counts of nodes and subject-hierarchy items (what a cancelled run must not change)."""
    import vtk

    sh = scene.GetSubjectHierarchyNode()
    items = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), items, True)
    return scene.GetNumberOfNodes(), items.GetNumberOfIds()


@pytest.fixture()
def oblique_ct(tmp_path):
    ct, truth = analytic_ct((2.6, 2.9, 3.2), OBLIQUE)
    path = tmp_path / "oblique_ct.nrrd"
    write_volume(ct, path)
    return path, ct, truth


def big_phantom_labels(spacing=(3.0, 3.0, 3.0)):
    """A CT and labels with a ~1.4 L liver and a ~65 mL tumor, so the closed-surface
    volumes are compared at the 3 % tolerance for both segments."""
    shape = (60, 70, 80)  # z, y, x
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    x, y, z = (i - 40) * spacing[0], (j - 35) * spacing[1], (k - 30) * spacing[2]
    liver = (x / 80) ** 2 + (y / 60) ** 2 + (z / 70) ** 2 < 1
    tumor = (x - 25) ** 2 + (y + 10) ** 2 + (z - 5) ** 2 < 25.0 ** 2
    labels = np.zeros(shape, np.uint8)
    labels[liver] = 1
    labels[liver & tumor] = 2
    ct = np.full(shape, -1000, np.int16)
    ct[5:-5, 5:-5, 5:-5] = 0
    ct[labels == 1] = 60
    ct[labels == 2] = 200
    geometry = dict(spacing=spacing, origin=(-40.0, 30.0, -90.0), direction=rotation("y", 15.0))
    return Volume(ct, **geometry), Volume(labels, **geometry)


# -- volume node -> engine ----------------------------------------------------------------
def phantom_in_scene(tmp_path):
    """(ct, labels, scene, volume node, statistics) for :func:`big_phantom_labels`, the
    CT loaded into a new scene through Slicer's storage node."""
    ct, labels = big_phantom_labels()
    write_volume(ct, tmp_path / "ct.nrrd")
    scene = slicer.vtkMRMLScene()
    return ct, labels, scene, load_volume(scene, tmp_path / "ct.nrrd"), compute_statistics(labels, ct)


def test_volume_node_from_storage_node_keeps_geometry(oblique_ct):
    path, ct, _ = oblique_ct
    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, path)
    volume = mrml.volume_from_node(node)
    assert volume.same_grid(read_volume(path), tol=1e-5)
    assert np.array_equal(volume.array, ct.array)
    assert np.allclose(volume.ijk_to_ras(), local_ijk_to_ras(node), atol=1e-5)


def test_linear_parent_transform_is_applied_and_nonlinear_refused(oblique_ct):
    path, ct, _ = oblique_ct
    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, path)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rotation("z", 30.0), (5.0, -7.0, 11.0)
    transform.SetMatrixTransformToParent(vtk_matrix(matrix))
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert np.allclose(mrml.volume_from_node(node).ijk_to_ras(), matrix @ local_ijk_to_ras(node), atol=1e-6)

    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear transform"):
        mrml.volume_from_node(node)


# -- result -> nodes (no model) ---------------------------------------------------------
def test_results_to_nodes_segments_terminology_surfaces_table(tmp_path):
    ct, labels = big_phantom_labels()
    write_volume(ct, tmp_path / "ct.nrrd")
    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, tmp_path / "ct.nrrd", name="Abdomen CT")
    stats = compute_statistics(labels, ct)
    assert stats["tumor"]["volume_ml"] > 40 and stats["liver"]["volume_ml"] > 1000

    seg, table = mrml.results_to_nodes(node, labels.array, stats)

    assert seg.GetName() == "Abdomen CT segmentation" and table.GetName() == "Abdomen CT statistics"
    mrml.assert_results(seg, table, volume_node=node, stats=stats, labels=labels.array)  # surfaces within 3 %
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == \
        ["Liver", "Tumor"]
    assert np.allclose(segmentation.GetSegment("Liver").GetColor(), (221 / 255, 130 / 255, 101 / 255))
    entry = slicer.vtkSlicerTerminologyEntry()
    for segment_id, (type_code, region_code) in {"Liver": ("10200004", ""), "Tumor": ("108369006", "10200004")}.items():
        terminology = get_terminology(segmentation.GetSegment(segment_id))
        assert terminology == SEGMENTS[segment_id][3]
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(terminology, entry)
        assert entry.GetTypeObject().GetCodingSchemeDesignator() == "SCT"
        assert entry.GetTypeObject().GetCodeValue() == type_code
        assert (entry.GetRegionObject().GetCodeValue() or "") == region_code
    assert seg.GetDisplayNode().GetVisibility3D()
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")
    # a see-through liver around opaque tumours; names and colors Slicer will not regenerate
    display = seg.GetDisplayNode()
    assert (display.GetSegmentOpacity3D("Liver"), display.GetSegmentOpacity3D("Tumor")) == (0.4, 1.0)
    for segment_id in ("Liver", "Tumor"):
        segment = segmentation.GetSegment(segment_id)
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
    assert table_rows(table)[0]["name"] == "Liver" and table.GetNumberOfRows() == 3 + stats["tumor"]["count"]
    assert isinstance(table_rows(table)[0]["voxels"], int)
    assert table.GetLocked()  # results, not a sheet to type into
    assert table.GetUseColumnTitleAsColumnHeader() and table.GetColumnTitle("volume_ml") == "Volume (mL)"


def test_phantoms_pass_the_check_the_slicer_self_test_uses(tmp_path):
    """Generated phantoms (permuted axes, several lesions) through the model-free path."""
    from LiverTumorSegLib import phantom

    for seed in (4, 5):
        case = phantom.make_phantom(seed, preset="coarse")
        write_volume(case.image, tmp_path / f"phantom{seed}.nrrd")
        scene = slicer.vtkMRMLScene()
        node = load_volume(scene, tmp_path / f"phantom{seed}.nrrd")
        stats = compute_statistics(case.labels, case.image)
        seg, table = mrml.results_to_nodes(node, case.labels.array, stats)
        mrml.assert_results(seg, table, volume_node=node, stats=stats, labels=case.labels.array)


def test_check_catches_flipped_labels_and_wrong_table(tmp_path):
    ct, labels = big_phantom_labels()
    write_volume(ct, tmp_path / "ct.nrrd")
    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, tmp_path / "ct.nrrd")
    seg, table = mrml.results_to_nodes(node, np.ascontiguousarray(labels.array[:, :, ::-1]),
                                       compute_statistics(labels, ct))
    problems = mrml.check_results(seg, table, volume_node=node, labels=labels.array)
    assert any("Tumor overlaps" in p for p in problems)
    other = compute_statistics(Volume(np.zeros_like(labels.array), ct.spacing, ct.origin, ct.direction), ct)
    assert any("table" in p for p in mrml.check_results(seg, table, stats=other))


def test_healthy_liver_gives_an_empty_tumor_segment(tmp_path):
    ct, labels = big_phantom_labels()
    healthy = np.where(labels.array == 2, 1, labels.array).astype(np.uint8)
    write_volume(ct, tmp_path / "ct.nrrd")
    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, tmp_path / "ct.nrrd", study=False)
    stats = compute_statistics(labels.with_array(healthy), ct)
    seg, table = mrml.results_to_nodes(node, healthy, stats, show_3d=False)
    mrml.assert_results(seg, table, volume_node=node, labels=healthy)
    assert not segment_array(seg, "Tumor", node).any()
    assert not seg.GetDisplayNode().GetVisibility3D()


def test_existing_segmentation_is_updated_and_user_segments_kept(tmp_path):
    ct, labels, scene, node, stats = phantom_in_scene(tmp_path)
    seg, table = mrml.results_to_nodes(node, labels.array, stats)
    seg.GetSegmentation().AddEmptySegment("Note", "Note")
    again, table_again = mrml.results_to_nodes(node, labels.array, stats, segmentation_node=seg)
    assert again is seg and table_again is table and mrml.statistics_table(seg) is table
    assert seg.GetSegmentation().GetSegment("Note") is not None
    assert seg.GetSegmentation().GetNumberOfSegments() == 3
    mrml.assert_results(seg, table, volume_node=node, labels=labels.array)


def test_another_volumes_segmentation_is_refused_as_output(tmp_path):
    """The panel keeps the last result as the output: a run on patient B must not
    overwrite patient A's segmentation (and table) under A's name."""
    ct, labels = big_phantom_labels()
    write_volume(ct, tmp_path / "ct.nrrd")
    scene = slicer.vtkMRMLScene()
    patient_a = load_volume(scene, tmp_path / "ct.nrrd", name="Patient A")
    patient_b = load_volume(scene, tmp_path / "ct.nrrd", name="Patient B")
    stats = compute_statistics(labels, ct)
    seg_a, table_a = mrml.results_to_nodes(patient_a, labels.array, stats)
    assert mrml.results_volume(seg_a) is not None and mrml.results_volume(seg_a).GetID() == patient_a.GetID()
    assert mrml.output_problem(seg_a, patient_a) is None
    assert mrml.output_for_volume(seg_a, patient_a) is seg_a  # the panel keeps it for A...
    assert mrml.output_for_volume(seg_a, patient_b) is None  # ...and offers a new one for B
    before = (scene_snapshot(scene), table_rows(table_a))
    other = labels.array.copy()
    other[other == 2] = 1
    with pytest.raises(InputError, match="belongs to 'Patient A', not to 'Patient B'"):
        mrml.results_to_nodes(patient_b, other, compute_statistics(labels.with_array(other), ct),
                              segmentation_node=seg_a)
    with pytest.raises(InputError, match="belongs to 'Patient A'"):
        SegmentationJob(patient_b, segmentation_node=seg_a, workdir=str(tmp_path)).start()
    assert (scene_snapshot(scene), table_rows(table_a)) == before
    assert not list(tmp_path.glob("LiverTumorSeg-*"))
    mrml.assert_results(seg_a, table_a, volume_node=patient_a, labels=labels.array)
    # a segmentation made on no volume yet (e.g. an empty one the user created) may be used
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Empty")
    assert mrml.output_problem(empty, patient_b) is None
    assert mrml.output_problem(slicer.vtkMRMLScene().AddNewNodeByClass("vtkMRMLSegmentationNode"), patient_b) \
        == "The output segmentation 'Segmentation' is not in the scene of 'Patient B'."


def test_a_segmentation_of_imported_surfaces_is_refused_untouched(tmp_path):
    """Switching a closed-surface segmentation (imported models) to labelmaps would
    lose the user's segments: refused before anything changes."""
    import vtk

    ct, labels = big_phantom_labels()
    write_volume(ct, tmp_path / "ct.nrrd")
    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, tmp_path / "ct.nrrd")
    models = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Models")
    models.SetSourceRepresentationToClosedSurface()
    sphere = vtk.vtkSphereSource()
    sphere.SetRadius(20)
    sphere.Update()
    models.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "Gallbladder")
    points = models.GetSegmentation().GetNthSegment(0).GetRepresentation("Closed surface").GetNumberOfPoints()
    with pytest.raises(InputError, match="closed surfaces.*would lose them"):
        mrml.results_to_nodes(node, labels.array, compute_statistics(labels, ct), segmentation_node=models)
    assert models.GetSegmentation().GetNumberOfSegments() == 1
    assert models.GetSegmentation().GetSourceRepresentationName() == "Closed surface"
    assert models.GetSegmentation().GetNthSegment(0).GetRepresentation("Closed surface").GetNumberOfPoints() == points


def test_a_failed_update_gives_the_segmentation_back(tmp_path, monkeypatch):
    """Anything failing after the segments were replaced (filling the table, or placing
    the nodes after it) restores the user's segmentation (its segments, transform and
    reference geometry) and its table."""
    from LiverTumorSegLib import mrml_nodes

    ct, labels, scene, node, stats = phantom_in_scene(tmp_path)
    seg, table = mrml.results_to_nodes(node, labels.array, stats)
    seg.GetSegmentation().AddEmptySegment("Note", "Note")
    liver_before = segment_array(seg, "Liver", node).copy()
    role = seg.GetReferenceImageGeometryReferenceRole()
    assert seg.GetNodeReferenceID(role) == node.GetID()
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())  # the update would move the segmentation under it

    def fail(*args):
        raise OSError("no space left")

    rows_before = table_rows(table)
    empty = np.zeros_like(labels.array)
    for step in ("fill_table", "place_beside"):  # before and after the table was rewritten
        monkeypatch.setattr(mrml, step, fail)
        with pytest.raises(OSError, match="no space left"):
            mrml.results_to_nodes(node, empty, compute_statistics(labels.with_array(empty), ct), segmentation_node=seg)
        monkeypatch.undo()
        assert seg.GetTransformNodeID() is None and seg.GetNodeReferenceID(role) == node.GetID()
        assert [seg.GetSegmentation().GetNthSegmentID(i) for i in range(3)] == ["Liver", "Tumor", "Note"]
        assert np.array_equal(segment_array(seg, "Liver", node), liver_before)
        assert mrml_nodes.table_statistics(table) == stats and table_rows(table) == rows_before
    with pytest.raises(InputError, match="malformed"):  # checked before anything changes
        mrml.results_to_nodes(node, labels.array, {"liver": {}}, segmentation_node=seg)


def test_exports_match_the_command_line_files(tmp_path):
    ct, labels, scene, node, stats = phantom_in_scene(tmp_path)
    seg, table = mrml.results_to_nodes(node, labels.array, stats)
    write_stats_csv(stats, tmp_path / "cli.csv")
    mrml.export_statistics_csv(table, tmp_path / "slicer.csv")
    assert (tmp_path / "slicer.csv").read_text(encoding="utf-8") == (tmp_path / "cli.csv").read_text(encoding="utf-8")
    written = mrml.export_surfaces(seg, tmp_path / "surfaces")
    names = sorted(p.name for p in written)
    assert len(names) == 2 and all(n.endswith(".stl") for n in names)
    assert any("Liver" in n for n in names) and any("Tumor" in n for n in names)


# -- through the engine ----------------------------------------------------------------
def test_oblique_volume_comes_back_aligned(oblique_ct):
    path, _, truth = oblique_ct
    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, path)
    seg, table = mrml.segment_volume_node(node, model=oracle_model(spacing=(2.0, 2.0, 2.0)))
    mrml.assert_results(seg, table, volume_node=node, labels=truth.array, min_dice=0.97)


def test_aligned_under_a_parent_transform(oblique_ct):
    path, _, truth = oblique_ct
    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, path)
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rotation("y", -20.0), (12.0, 3.0, -8.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(vtk_matrix(matrix))
    node.SetAndObserveTransformNodeID(transform.GetID())
    seg, table = mrml.segment_volume_node(node, model=oracle_model(spacing=(2.0, 2.0, 2.0)))
    assert seg.GetTransformNodeID() == transform.GetID()
    mrml.assert_results(seg, table, volume_node=node, labels=truth.array, min_dice=0.97)
    centroid = np.array([table_rows(table)[3][f"centroid_{a}_mm"] for a in "ras"])
    lesion = np.argwhere(truth.array == 2).mean(axis=0)[::-1]
    expected = (matrix @ local_ijk_to_ras(node) @ np.append(lesion, 1.0))[:3]
    assert np.linalg.norm(centroid - expected) < 2.0  # mm, in world RAS


def test_table_equals_cli_stats_json_and_both_paths_agree(oblique_ct, tmp_path, tiny_model):
    path, _, _ = oblique_ct
    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, path)
    out = tmp_path / "cli"
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--progress", "none",
                 "--fast", "--no-preview", "--no-surfaces"]) == 0
    cli_stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))

    imported, imported_table = mrml.import_results(node, out)
    mrml.assert_results(imported, imported_table, volume_node=node, stats=cli_stats,
                        labels=read_volume(out / "segmentation.nii.gz").array)
    assert table_rows(imported_table) == stats_to_rows(cli_stats)

    direct, direct_table = mrml.segment_volume_node(node, model=str(tiny_model), fast=True)
    mrml.assert_results(direct, direct_table, volume_node=node, stats=cli_stats)
    assert np.array_equal(segment_array(direct, "Liver", node), segment_array(imported, "Liver", node))

    job = SegmentationJob(node, model=str(tiny_model), fast=True, workdir=str(tmp_path)).start()
    assert job.wait(timeout=120) == "succeeded", job.error
    mrml.assert_results(job.segmentation_node, job.table_node, volume_node=node, stats=cli_stats)
    assert job.progress == 1.0 and not list(tmp_path.glob("LiverTumorSeg-*"))


def test_every_table_column_has_a_title_unit_and_description():
    """A column the table shows by its raw name (``short_axis_mm``) would look unfinished in Slicer."""
    from LiverTumorSegLib.mrml_nodes import COLUMN_INFO, fill_table
    from LiverTumorSegLib.stats import ROW_COLUMNS

    assert list(COLUMN_INFO) == list(ROW_COLUMNS)
    labels = np.zeros((6, 8, 8), dtype=np.uint8)
    labels[1:5, 1:7, 1:7] = 1
    labels[2:4, 2:5, 2:4] = 2
    stats = compute_statistics(Volume(labels, spacing=(2.0, 2.0, 3.0)))
    table = slicer.vtkMRMLScene().AddNewNodeByClass("vtkMRMLTableNode")
    fill_table(table, stats)
    for column, (title, unit, description) in COLUMN_INFO.items():
        assert table.GetColumnTitle(column) == title and table.GetColumnDescription(column) == description
        assert table.GetColumnUnitLabel(column) == unit
    assert table.GetColumnTitle("short_axis_mm") == "Short axis (mm)"
    assert table_rows(table)[3]["short_axis_mm"] == stats["tumor"]["lesions"][0]["short_axis_mm"] > 0


def test_cancel_leaves_the_scene_unchanged(oblique_ct, tmp_path, tiny_model):
    path, _, _ = oblique_ct
    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, path)
    before = scene_snapshot(scene)
    seen = []

    def cancel():
        return any("inference" in m for m in seen)

    with pytest.raises(Cancelled):
        mrml.segment_volume_node(node, model=str(tiny_model), progress=lambda f, m: seen.append(m), cancel=cancel)
    assert scene_snapshot(scene) == before

    job = SegmentationJob(node, model=str(tiny_model), workdir=str(tmp_path),
                          extra_args=["--batch-size", "1", "--overlap", "0.9"]).start()
    deadline = time.monotonic() + 60
    while not any(e.kind == "progress" and "inference" in e.message for e in job.poll()):
        assert time.monotonic() < deadline and job.state == "running", job.error
        time.sleep(0.02)
    job.cancel()
    assert job.wait(timeout=30) == "cancelled"
    assert scene_snapshot(scene) == before and job.segmentation_node is None
    assert not list(tmp_path.glob("LiverTumorSeg-*"))


# -- errors ---------------------------------------------------------------------------
def test_bad_input_gives_the_engines_clear_error(tmp_path, tiny_model):
    scene = slicer.vtkMRMLScene()
    with pytest.raises(InputError, match="Select a CT volume"):
        mrml.volume_from_node(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")
    with pytest.raises(InputError, match="no voxels"):
        mrml.segment_volume_node(empty, model=str(tiny_model))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "Labels")
    with pytest.raises(InputError, match="label map"):
        SegmentationJob(labelmap, model=str(tiny_model)).start()

    mr = Volume(np.random.default_rng(0).uniform(0, 800, (20, 24, 28)).astype(np.float32), (3.0, 3.0, 3.0))
    write_volume(mr, tmp_path / "mr.nrrd")
    node = load_volume(scene, tmp_path / "mr.nrrd", name="MR")
    before = scene_snapshot(scene)
    with pytest.raises(InputError, match="does not look like a CT"):
        mrml.segment_volume_node(node, model=str(tiny_model))
    job = SegmentationJob(node, model=str(tiny_model), workdir=str(tmp_path)).start()
    assert job.wait(timeout=120) == "failed"
    assert "does not look like a CT" in job.error and job.run.returncode == 2
    assert scene_snapshot(scene) == before


def test_a_crashed_slicers_copy_of_the_ct_is_removed_by_the_next_job(tmp_path, tiny_model, oblique_ct):
    """A job folder whose process died (its lock released by the system) and that is old
    enough is swept by the next job; a live job's folder and a young one are kept."""
    import subprocess
    import time

    from LiverTumorSegLib.mrml_job import LOCK_NAME, SWEEP_MIN_AGE_S, sweep_abandoned_folders

    def job_folder(name, age_s):
        folder = tmp_path / f"LiverTumorSeg-{name}"
        folder.mkdir()
        (folder / "input.nrrd").write_bytes(b"patient data")
        (folder / LOCK_NAME).touch()
        os.utime(folder, (time.time() - age_s,) * 2)
        return folder

    crashed = job_folder("crashed", SWEEP_MIN_AGE_S + 5)
    live = job_folder("live", SWEEP_MIN_AGE_S + 5)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; h = open(sys.argv[1], 'a+b'); fcntl.flock(h, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"), str(live / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        young = job_folder("young", 1)
        assert sweep_abandoned_folders(tmp_path) == [crashed]
        assert not crashed.exists() and live.is_dir() and young.is_dir()
        holder.kill()  # a crash: the system releases the lock
        holder.wait()
        again = job_folder("crashed2", SWEEP_MIN_AGE_S + 5)
        scene = slicer.vtkMRMLScene()
        node = load_volume(scene, oblique_ct[0], name="CT")
        job = SegmentationJob(node, model=str(tiny_model), fast=True, workdir=str(tmp_path)).start()
        assert not live.exists() and not again.exists() and young.is_dir()
        assert job.wait(timeout=120) == "succeeded", job.error
        assert sorted(p.name for p in tmp_path.glob("LiverTumorSeg-*")) == ["LiverTumorSeg-young"]
    finally:
        holder.kill()


# -- the runner -----------------------------------------------------------------------
def test_progress_and_error_lines_are_parsed():
    event = parse_stdout_line('{"event": "progress", "progress": 0.25, "message": "inference: 2/8 patches"}\n')
    assert (event.kind, event.progress, event.message) == ("progress", 0.25, "inference: 2/8 patches")
    done = parse_stdout_line(json.dumps({"event": "done", "outputs": {"segmentation": "/x/segmentation.nii.gz"}}))
    assert done.kind == "done" and done.data["outputs"]["segmentation"].endswith(".nii.gz")
    assert parse_stdout_line("not json").kind == "log"
    error = parse_stderr_line("livertumorseg: error: input not found: /nope.nii.gz\n")
    assert (error.kind, error.message) == ("error", "input not found: /nope.nii.gz")
    warning = parse_stderr_line("/x/inference.py:207: UserWarning: GPU memory ran out: accumulating on the CPU")
    assert warning.kind == "warning" and warning.message.startswith("GPU memory ran out")
    flagged = parse_stderr_line("livertumorseg: warning: 93 % of the liver found lies in air (below -500 HU): ...")
    assert (flagged.kind, flagged.message) == ("warning", "93 % of the liver found lies in air (below -500 HU): ...")
    itk = parse_stderr_line("WARNING: In /src/ITK/Modules/IO/ImageBase/include/itkImageSeriesReader.hxx, line 480")
    assert itk.kind == "log"  # ITK's own lines are not the run's warnings


class FakeProcess:
    """Stands in for subprocess.Popen: fixed output lines and an exit code."""

    def __init__(self, command, stdout_lines, stderr_lines, code):
        import io

        self.args, self.pid, self.returncode = command, 0, None
        self.stdout, self.stderr = io.StringIO("".join(stdout_lines)), io.StringIO("".join(stderr_lines))
        self._code = code

    def poll(self):
        self.returncode = self._code
        return self._code

    def wait(self, timeout=None):
        return self.poll()


def test_cuda_out_of_memory_runs_again_on_the_cpu(tmp_path):
    calls = []

    def popen(command, **kwargs):
        calls.append(list(command))
        if command[command.index("--device") + 1] != "cpu":
            return FakeProcess(command, ['{"event": "progress", "progress": 0.3, "message": "inference"}\n'],
                               ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"], 1)
        done = {"event": "done", "outputs": {"segmentation": "s.nii.gz", "stats_json": "stats.json"}}
        return FakeProcess(command, [json.dumps(done) + "\n"], [], 0)

    run = EngineRun(build_command(tmp_path / "ct.nrrd", tmp_path / "out", device="cuda"), popen=popen).start()
    events = []
    assert run.wait(timeout=10, on_event=events.append) == "succeeded"
    assert [c[c.index("--device") + 1] for c in calls] == ["cuda", "cpu"]
    assert any(e.kind == "warning" and "GPU ran out of memory" in e.message for e in events)
    assert run.outputs["segmentation"] == "s.nii.gz"

    calls.clear()
    cpu = EngineRun(build_command(tmp_path / "ct.nrrd", tmp_path / "out", device="cpu"),
                    popen=lambda c, **k: FakeProcess(c, [], ["RuntimeError: CUDA out of memory\n"], 1)).start()
    assert cpu.wait(timeout=10) == "failed" and "out of memory" in cpu.error


def test_stdout_json_that_is_not_an_engine_event_is_a_log_line():
    """A JSON line without an "event" key, a JSON value that is not an object, or an
    event kind this runner does not know must not crash the reader thread or pose as a
    final event: each is a ``log`` line."""
    for line in ('{"progress": 0.5}', "42", "[1, 2]", '"done"', "null"):
        assert parse_stdout_line(line + "\n").kind == "log", line
    for kind in ("succeeded", "failed", "cancelled", "warning"):
        assert parse_stdout_line(json.dumps({"event": kind})).kind == "log"
    assert parse_stdout_line(json.dumps({"event": "done", "outputs": {}})).progress == 1.0


def test_the_command_asks_for_json_progress_and_no_surfaces_or_preview(tmp_path):
    """The front end makes its own surfaces and preview from the labels: the child must
    not spend time on them, and must speak the JSON lines the runner parses."""
    command = build_command(tmp_path / "ct.nrrd", tmp_path / "out", python=["py"], model="m", device="cpu",
                            fast=True, extra=["--batch-size", "1"])
    assert command[:4] == ["py", "-m", "LiverTumorSegLib", "segment"]
    assert {"--no-surfaces", "--no-preview", "--fast"} <= set(command)
    assert command[command.index("--progress") + 1] == "json" and command[command.index("--device") + 1] == "cpu"
    assert command[command.index("--model") + 1] == "m" and command[-2:] == ["--batch-size", "1"]
    assert "--model" not in build_command(tmp_path / "ct.nrrd", tmp_path / "out", python=["py"])


def test_the_child_finds_this_engine_before_any_other_on_its_path(tmp_path):
    """The Lib's parent folder comes first on PYTHONPATH: another LiverTumorSegLib the
    user's PYTHONPATH names (an older checkout) must not run instead."""
    import LiverTumorSegLib.runner as runner

    run = EngineRun(["py"], env={"PYTHONPATH": str(tmp_path)})
    assert run.env["PYTHONPATH"].split(os.pathsep) == [str(runner.LIB_PARENT), str(tmp_path)]
    assert EngineRun(["py"], env={}).env["PYTHONPATH"] == str(runner.LIB_PARENT)


def test_an_exit_without_results_or_with_the_cancel_code_is_not_a_success(tmp_path):
    """Exit code 0 without a "done" event is a failure (nothing to import); exit code
    130 is a cancel even when this runner did not ask for it (a signal from elsewhere);
    the engine's one-line error is the reason, even when other lines follow it."""
    def ended(stdout, stderr, code):
        run = EngineRun(["py"], popen=lambda c, **k: FakeProcess(c, stdout, stderr, code)).start()
        return run.wait(timeout=10), run

    state, run = ended(['{"event": "progress", "progress": 0.9, "message": "statistics"}\n'], [], 0)
    assert state == "failed" and run.outputs == {}
    state, run = ended([], ["livertumorseg: error: cancelled by the user\n"], 130)
    assert state == "cancelled"
    state, run = ended([], ["livertumorseg: error: input not found: /ct.nrrd\n", "launcher: child exited 2\n"], 2)
    assert state == "failed" and run.error == "input not found: /ct.nrrd"


def test_an_out_of_memory_line_before_the_end_of_the_traceback_still_runs_again_on_the_cpu(tmp_path):
    """torch's CUDA out-of-memory message is followed by more lines (its advice, a
    launcher's exit line): the retry looks at the recent stderr, not the last line; the
    progress bar starts again from 0 for the CPU run."""
    calls, seen = [], []

    def popen(command, **kwargs):
        calls.append(command[command.index("--device") + 1])
        if calls[-1] != "cpu":
            return FakeProcess(command, ['{"event": "progress", "progress": 0.4, "message": "inference"}\n'],
                               ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.\n",
                                "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF\n",
                                "See documentation for Memory Management\n", "launcher: exit code 1\n"], 1)
        done = {"event": "done", "outputs": {"segmentation": "s.nii.gz"}}
        return FakeProcess(command, [json.dumps(done) + "\n"], [], 0)

    run = EngineRun(build_command(tmp_path / "ct.nrrd", tmp_path / "out", device="auto"), popen=popen)
    run.start()
    assert run.wait(timeout=10, on_event=lambda e: seen.append((e.kind, run.progress))) == "succeeded"
    assert calls == ["auto", "cpu"] and ("warning", 0.0) in seen


def test_cancel_signals_once_and_kills_only_after_the_grace_period(monkeypatch):
    """Cancel sends the polite signal once (a second click neither repeats it nor puts
    the kill off) and the hard kill comes only once ``grace_s`` has passed."""
    from types import SimpleNamespace

    import LiverTumorSegLib.runner as runner

    clock, calls = [1000.0], []
    monkeypatch.setattr(runner, "time", SimpleNamespace(monotonic=lambda: clock[0], sleep=lambda s: None))
    monkeypatch.setattr(runner, "_terminate_tree", lambda proc: calls.append("terminate"))
    monkeypatch.setattr(runner, "_kill_tree", lambda proc: calls.append("kill"))
    run = EngineRun(["py"], popen=lambda c, **k: FakeProcess(c, [], [], None), grace_s=5.0).start()
    run.cancel()
    run.poll()
    clock[0] += 3.0
    run.cancel()
    run.poll()
    assert calls == ["terminate"]
    clock[0] += 2.1  # 5.1 s after the first cancel
    run.poll()
    assert calls == ["terminate", "kill"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_cancel_asks_the_process_group_to_stop_before_killing_it(monkeypatch):
    """SIGTERM first: the command line catches it, removes its staging folder and exits
    130; SIGKILL (which leaves files behind) is only the hard kill after the grace."""
    import signal

    import LiverTumorSegLib.runner as runner

    sent = []
    monkeypatch.setattr(runner.os, "killpg", lambda pid, sig: sent.append((pid, sig)))
    proc = type("Proc", (), {"pid": 4321})()
    runner._terminate_tree(proc)
    runner._kill_tree(proc)
    assert sent == [(4321, signal.SIGTERM), (4321, signal.SIGKILL)]


def test_job_ends_with_one_event_and_the_reason_when_results_cannot_be_imported(tmp_path, oblique_ct, monkeypatch):
    """The engine says done, but its results cannot become nodes (here: it wrote none), or
    the volume left the scene meanwhile: listeners hear one last event, "failed", with the
    engine's own message; a job that cannot start leaves no copy of the CT behind."""
    import LiverTumorSegLib.mrml_job as mrml_job

    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, oblique_ct[0])
    done = json.dumps({"event": "done", "outputs": {"segmentation": "s.nii.gz"}}) + "\n"

    def popen(command, **kwargs):
        return FakeProcess(command, ['{"event": "progress", "progress": 0.5, "message": "inference"}\n', done], [], 0)

    job = SegmentationJob(node, workdir=str(tmp_path), popen=popen).start()
    events = []
    assert job.wait(timeout=30, on_event=events.append) == "failed"
    terminal = [e for e in events if e.kind in ("succeeded", "failed", "cancelled")]
    assert [e.kind for e in terminal] == ["failed"] and events[-1] is terminal[0]
    assert "holds no segmentation results" in job.error
    assert not job.error.startswith("InputError") and terminal[0].message == job.error
    assert not list(tmp_path.glob("LiverTumorSeg-*"))

    job = SegmentationJob(node, workdir=str(tmp_path), popen=popen).start()
    scene.RemoveNode(node)
    assert job.wait(timeout=30) == "failed" and "removed from the scene" in job.error
    assert not list(tmp_path.glob("LiverTumorSeg-*"))

    node = load_volume(scene, oblique_ct[0])
    monkeypatch.setattr(mrml_job, "_write_uncompressed", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(OSError, match="No space"):
        SegmentationJob(node, workdir=str(tmp_path), popen=popen).start()
    assert not list(tmp_path.glob("LiverTumorSeg-*"))


def test_the_sweep_removes_only_its_own_job_folders(tmp_path):
    import time

    from LiverTumorSegLib.mrml_job import LOCK_NAME, SWEEP_MIN_AGE_S, sweep_abandoned_folders

    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / LOCK_NAME).touch()
    os.utime(other, (time.time() - SWEEP_MIN_AGE_S - 60,) * 2)
    assert sweep_abandoned_folders(tmp_path) == [] and (other / LOCK_NAME).is_file()


def test_a_missing_interpreter_fails_clearly(tmp_path):
    run = EngineRun(build_command(tmp_path / "ct.nrrd", tmp_path / "o", python=[str(tmp_path / "no-python")])).start()
    assert run.state == "failed" and "cannot start the segmentation process" in run.error


def test_missing_dependencies(monkeypatch):
    import importlib.util

    assert missing_dependencies() == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert missing_dependencies() == [{"module": "torch", "pip": "torch>=2.2", "bundled": False}]
    monkeypatch.setattr(importlib.util, "find_spec", real)
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.1.2+cu121" if name == "torch" else real_version(name))
    assert missing_dependencies() == [{"module": "torch", "pip": "torch>=2.2", "bundled": False, "found": "2.1.2+cu121"}]
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.10.0" if name == "torch" else real_version(name))
    assert missing_dependencies() == []


def test_engine_runs_as_a_child_process_with_progress(oblique_ct, tmp_path, tiny_model):
    path, _, _ = oblique_ct
    command = build_command(path, tmp_path / "out", python=[sys.executable], model=str(tiny_model), fast=True)
    run = EngineRun(command, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).start()
    events = []
    assert run.wait(timeout=120, on_event=events.append) == "succeeded", run.error
    progress = [e.progress for e in events if e.kind == "progress"]
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)
    assert (tmp_path / "out" / "segmentation.nii.gz").is_file() and run.returncode == 0


def test_child_messages_keep_non_ascii_paths_whatever_the_parents_encoding():
    """A child Python on Windows writes a pipe in the ANSI code page unless told UTF-8;
    here the parent's environment asks for ASCII, which the run must override."""
    code = "import sys; sys.stderr.write('livertumorseg: error: cannot read C:/Users/Jos\\u00e9/ct.nii\\n'); sys.exit(2)"
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONUTF8": "0"}
    run = EngineRun([sys.executable, "-c", code], env=env).start()
    assert run.wait(timeout=60) == "failed"
    assert "C:/Users/Jos\u00e9/ct.nii" in run.error


def _processes_mentioning(text: str) -> list:
    """PIDs whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if text.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc") or not os.path.exists("/bin/bash"), reason="needs Linux /proc and bash")
def test_cancel_through_a_launcher_stops_the_whole_process_tree(oblique_ct, tmp_path, tiny_model):
    """PythonSlicer is a launcher that starts the real Python as its child: Cancel must stop both."""
    path, _, _ = oblique_ct
    launcher = ["/bin/bash", "-c", '"$0" "$@"; exit $?', sys.executable]
    out = tmp_path / "launched-output"
    command = build_command(path, out, python=launcher, model=str(tiny_model),
                            extra=["--batch-size", "1", "--overlap", "0.9"])
    run = EngineRun(command, grace_s=3.0).start()
    deadline = time.monotonic() + 60
    while not any(e.kind == "progress" and "inference" in e.message for e in run.poll()):
        assert time.monotonic() < deadline and not run.finished, run.error
        time.sleep(0.02)
    assert len(_processes_mentioning(str(out))) >= 2  # the launcher and the Python it started
    run.cancel()
    assert run.wait(timeout=30) == "cancelled"
    assert _processes_mentioning(str(out)) == []
    assert not out.exists() or list(out.iterdir()) == []


def test_stop_ends_a_child_that_ignores_the_request_to_stop():
    """Module unload: stop() returns only once the child is gone, killing it if it must."""
    ready = json.dumps({"event": "progress", "progress": 0.1, "message": "inference"})
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"print({ready!r}, flush=True); time.sleep(120)")
    run = EngineRun([sys.executable, "-c", code], grace_s=0.5).start()
    deadline = time.monotonic() + 30
    while not any(e.kind == "progress" for e in run.poll()):
        assert time.monotonic() < deadline and not run.finished, run.error
        time.sleep(0.02)
    started = time.monotonic()
    assert run.stop() == "cancelled"
    assert run._proc.poll() is not None and time.monotonic() - started < 10


def test_on_windows_cancel_ends_the_tree_at_once(monkeypatch):
    """A console child started without a window ignores taskkill without /F."""
    import LiverTumorSegLib.runner as runner

    calls = []
    monkeypatch.setattr(runner.os, "name", "nt")
    monkeypatch.setattr(runner.subprocess, "run", lambda args, **kw: calls.append(args))
    runner._terminate_tree(type("Proc", (), {"pid": 4321})())
    assert calls == [["taskkill", "/T", "/F", "/PID", "4321"]]


def _start_slow_job(oblique_ct, tmp_path, tiny_model):
    """(scene, its node counts, the job, its temporary folder) for a run slow enough to
    stop part-way (batch 1, 90 % overlap)."""
    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, oblique_ct[0])
    before = scene_snapshot(scene)
    job = SegmentationJob(node, model=str(tiny_model), workdir=str(tmp_path),
                          extra_args=["--batch-size", "1", "--overlap", "0.9"]).start()
    return scene, before, job, next(tmp_path.glob("LiverTumorSeg-*"))


def test_job_stop_without_polling_leaves_nothing_behind(oblique_ct, tmp_path, tiny_model):
    """What the panel does on module unload or exit: no child process, no temporary folder."""
    scene, before, job, folder = _start_slow_job(oblique_ct, tmp_path, tiny_model)
    deadline = time.monotonic() + 60
    while not any(e.kind == "progress" and "inference" in e.message for e in job.poll()):
        assert time.monotonic() < deadline and job.state == "running", job.error
        time.sleep(0.02)
    assert job.stop() == "cancelled"
    assert job.run._proc.poll() is not None and not folder.exists()
    assert scene_snapshot(scene) == before and job.segmentation_node is None
    if os.path.isdir("/proc"):
        assert _processes_mentioning(str(folder)) == []


def test_job_output_deleted_during_the_run_gets_new_nodes(oblique_ct, tmp_path, tiny_model):
    """The user may delete the output segmentation while Slicer stays responsive: the
    finished run's results then go into new nodes, named after the volume."""
    from LiverTumorSegLib.mrml_nodes import table_statistics

    path, _, _ = oblique_ct
    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, path, name="Liver CT")
    first, first_table = mrml.segment_volume_node(node, model=str(tiny_model), fast=True)
    job = SegmentationJob(node, segmentation_node=first, model=str(tiny_model), fast=True,
                          workdir=str(tmp_path)).start()
    scene.RemoveNode(first_table)
    scene.RemoveNode(first)
    assert job.wait(timeout=120) == "succeeded", job.error
    assert job.segmentation_node is not first and job.segmentation_node.GetScene() is scene
    assert job.segmentation_node.GetName() == "Liver CT segmentation"
    mrml.assert_results(job.segmentation_node, job.table_node, volume_node=node)
    assert table_statistics(job.table_node)["run"]["input"] == "Liver CT"  # not the deleted temporary copy


def test_job_wait_timeout_stops_the_child_and_removes_the_copy(oblique_ct, tmp_path, tiny_model):
    scene, before, job, folder = _start_slow_job(oblique_ct, tmp_path, tiny_model)
    with pytest.raises(TimeoutError):
        job.wait(timeout=0.5)
    assert job.state == "cancelled" and job.run._proc.poll() is not None
    assert not folder.exists() and scene_snapshot(scene) == before


def test_statistics_follow_the_segments_after_a_correction(tmp_path):
    """A clinician corrects the result in Segment Editor (here: paints a second lesion
    and erases part of the liver), then asks for the statistics of what is there now."""
    from LiverTumorSegLib.mrml_nodes import oriented_mask, table_statistics

    ct, labels, scene, node, stats = phantom_in_scene(tmp_path)
    stats["run"] = dict(stats.get("run", {}), model="the-model", min_lesion_ml=0.5, small_lesions_dropped=3,
                        liver_left_out_ml=12.0, warnings=["the run's own warning"])
    seg, table = mrml.results_to_nodes(node, labels.array, stats)
    edited = labels.array.copy()
    edited[:, :, :30][edited[:, :, :30] == 1] = 0   # part of the liver erased
    edited[28:32, 28:32, 31:35] = 2                  # a second lesion painted (inside the liver)
    liver, tumor = edited > 0, edited == 2
    ijk_to_ras = local_ijk_to_ras(node)
    for segment_id, mask in (("Liver", liver), ("Tumor", tumor)):
        seg.GetSegmentation().GetSegment(segment_id).AddRepresentation("Binary labelmap", oriented_mask(mask, ijk_to_ras))

    assert mrml.update_statistics(seg) is table
    expected = compute_statistics(labels.with_array(edited.astype(np.uint8)), ct)
    got, want = table_rows(table), stats_to_rows(expected)
    assert [row["name"] for row in got] == [row["name"] for row in want]
    for row, ref in zip(got, want):  # the volume node's geometry comes back through VTK: float rounding
        assert row == {k: (pytest.approx(v, rel=1e-9) if isinstance(v, float) else v) for k, v in ref.items()}
    updated = table_statistics(table)
    assert updated["tumor"]["count"] == stats["tumor"]["count"] + 1
    assert updated["run"]["updated_from_segments"] is True and updated["run"]["model"] == "the-model"
    # measured as drawn: the run's postprocessing no longer describes them, its warnings neither
    assert not (set(mrml.RUN_POSTPROCESSING_KEYS) - {"warnings"}) & set(updated["run"])
    assert updated["run"]["warnings"] == result_warnings(edited, ct.array, expected)
    with pytest.raises(InputError, match="no Liver segment"):
        mrml.update_statistics(scene.AddNewNodeByClass("vtkMRMLSegmentationNode"))
