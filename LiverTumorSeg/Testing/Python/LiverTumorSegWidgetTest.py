"""The module panel driven the way a user drives it (runs inside 3D Slicer only).

Registered as a ctest by this folder's CMakeLists.txt; from Slicer's Python console:
``slicer.testing.runUnitTest([folder of this file], "LiverTumorSegWidgetTest")``.
"""

import tempfile
import time
import unittest
from pathlib import Path

import numpy as np
import slicer


def waitUntil(condition, timeout, what):
    """Process Qt events until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        slicer.app.processEvents()
        time.sleep(0.05)


class LiverTumorSegWidgetTest(unittest.TestCase):
    def setUp(self):
        from LiverTumorSegLib.runner import missing_dependencies

        missing = missing_dependencies()
        if missing:
            # In --testing mode Slicer's confirmation dialogs answer OK by themselves: without
            # this, clicking Segment would download PyTorch during the test.
            self.skipTest("needs " + ", ".join(item["pip"] for item in missing) + "; install it from the module first")
        slicer.mrmlScene.Clear()
        slicer.util.selectModule("LiverTumorSeg")
        self.panel = slicer.modules.LiverTumorSegWidget.panel
        self.ui = self.panel.ui

    def loadPhantom(self):
        from LiverTumorSegLib.mrml_check import SELF_TEST_PHANTOM_SEED
        from LiverTumorSegLib.phantom import make_phantom

        case = make_phantom(SELF_TEST_PHANTOM_SEED, preset="coarse")
        volume = slicer.util.addVolumeFromArray(case.image.array, ijkToRAS=case.image.ijk_to_ras(), name="Phantom")
        slicer.util.setSliceViewerLayers(background=volume)
        self.panel.initializeParameterNode()
        return case, volume

    def test_InputDefaultsToTheShownVolume(self):
        other = slicer.util.addVolumeFromArray(np.zeros((4, 4, 4), np.int16), name="Other")
        _, volume = self.loadPhantom()
        self.assertIsNot(other, volume)
        self.assertIs(self.ui.inputSelector.currentNode(), volume)
        self.assertTrue(self.ui.applyButton.enabled)
        self.assertEqual(self.ui.applyButton.text, "Segment liver && tumor")
        self.assertFalse(self.ui.exportCsvButton.enabled)

    def test_CancelLeavesTheSceneUnchanged(self):
        self.loadPhantom()
        before = slicer.mrmlScene.GetNumberOfNodes()
        self.ui.qualityComboBox.currentIndex = 0
        self.ui.applyButton.click()
        self.assertEqual(self.ui.applyButton.text, "Cancel")
        waitUntil(lambda: self.ui.progressBar.value > 0 or self.panel.job is None, 300, "progress")
        if self.panel.job is not None:
            self.ui.applyButton.click()
        waitUntil(lambda: self.panel.job is None, 60, "the run to stop")
        self.assertEqual(self.ui.applyButton.text, "Segment liver && tumor")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def test_SegmentShowsResultsAndExports(self):
        from LiverTumorSegLib.mrml import assert_results, export_surfaces, statistics_table
        from LiverTumorSegLib.mrml_check import SELF_TEST_MIN_DICE

        case, volume = self.loadPhantom()
        self.ui.deviceComboBox.currentIndex = 1  # CPU
        self.ui.applyButton.click()
        waitUntil(lambda: self.panel.job is None, 900, "the segmentation")
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        self.assertIsNotNone(segmentation, self.ui.statusLabel.text)
        self.assertTrue(segmentation.GetName().startswith("Phantom"))
        table = statistics_table(segmentation)
        self.assertIs(self.ui.statisticsTableView.mrmlTableNode(), table)
        assert_results(segmentation, table, volume_node=volume, labels=case.labels.array,
                       min_dice=SELF_TEST_MIN_DICE)
        self.ui.show3DCheckBox.checked = False
        self.assertFalse(segmentation.GetDisplayNode().GetVisibility3D())
        written = export_surfaces(segmentation, Path(tempfile.mkdtemp()))
        self.assertEqual(len(written), 2)
