"""The bundled demo model and sample CT: the README's main job, and the Slicer
self-test's flow run through the same MRML bridge and check routine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from LiverTumorSegLib.cli import main
from LiverTumorSegLib.io import read_volume, write_volume
from LiverTumorSegLib.model import load_model
from LiverTumorSegLib.model.registry import BUNDLED_DIR, DEFAULT_MODEL
from LiverTumorSegLib.samples import SAMPLE_CT

from .oracle import dice

BUNDLED = BUNDLED_DIR / DEFAULT_MODEL


def test_bundled_model_is_small_verified_and_says_what_it_is():
    loaded = load_model(BUNDLED)  # checksum verified, weights_only load
    size = sum(f.stat().st_size for f in BUNDLED.iterdir())
    assert size <= 5 * 1024 * 1024
    card = json.loads((BUNDLED / "model.json").read_text(encoding="utf-8"))
    text = (card["description"] + " " + card["intended_use"]).lower()
    assert "not for clinical use" in text and "phantom" in text
    assert card["provenance"], "model.json must say how the model was made"
    assert loaded.card.name == DEFAULT_MODEL


def test_demo_command_segments_the_bundled_sample(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--progress", "none"]) == 0
    assert str(out) in capsys.readouterr().out
    written = {p.name for p in out.iterdir()}
    assert {"segmentation.nii.gz", "stats.json", "stats.csv", "liver.stl", "preview.png"} <= written
    labels = read_volume(out / "segmentation.nii.gz")
    assert labels.same_grid(read_volume(SAMPLE_CT))
    truth = read_volume(SAMPLE_CT.parent / "sample_phantom_labels.nii.gz").array
    assert dice(labels.array > 0, truth > 0) > 0.7  # the demo model finds the phantom's liver


def test_slicer_self_test_flow_with_the_bundled_model(tmp_path):
    """What LiverTumorSegTest.test_PhantomWithBundledModel does inside Slicer."""
    slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (Slicer's MRML classes)")
    from LiverTumorSegLib import mrml
    from LiverTumorSegLib.mrml_check import SELF_TEST_MIN_DICE, SELF_TEST_PHANTOM_SEED
    from LiverTumorSegLib.phantom import make_phantom

    from vtk.util.numpy_support import vtk_to_numpy

    case = make_phantom(SELF_TEST_PHANTOM_SEED, preset="coarse")
    scene = slicer.vtkMRMLScene()
    nodes = {}
    for kind, volume in (("ct", case.image), ("labels", case.labels)):
        path = tmp_path / f"{kind}.nrrd"
        write_volume(volume, path)
        nodes[kind] = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", kind)
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        assert storage.ReadData(nodes[kind])
    # Slicer's reader may store a left-handed grid with an axis reversed; the truth is
    # read the same way, so it lies in the CT node's own IJK order.
    image = nodes["labels"].GetImageData()
    truth = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])
    segmentation, table = mrml.segment_volume_node(nodes["ct"], model=DEFAULT_MODEL, device="cpu")
    mrml.assert_results(segmentation, table, volume_node=nodes["ct"], labels=truth, min_dice=SELF_TEST_MIN_DICE)
    assert np.any(truth == 2)
