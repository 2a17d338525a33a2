import logging
import os
import sys
import unittest

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)


def _addEngineToPath():
    """Installed, LiverTumorSegLib lies beside this file; in a source checkout, one folder up.

    The checkout's root goes last on the path: its Testing and benchmarks packages must
    not hide other modules of those names for the rest of the Slicer session."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "LiverTumorSegLib", "__init__.py")):
            if folder not in sys.path:
                if folder == here:
                    sys.path.insert(0, folder)
                else:
                    sys.path.append(folder)
            return


_addEngineToPath()


class LiverTumorSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Liver Tumor Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["LiverTumorSeg contributors"]
        self.parent.helpText = (
            "Segments the liver and liver tumors in a CT volume with a 3D U-Net, in one click. The result is a "
            "segmentation with Liver and Tumor segments (SNOMED CT terminology), their 3D surfaces and a statistics "
            "table (volumes in mL, tumor burden, per-lesion diameters, including the axial long and short axes, and "
            "centroid in RAS mm, HU); after corrections in Segment Editor, Update statistics recomputes the table. "
            "Inference runs in a separate process: Slicer stays responsive and the run can be cancelled. Research "
            "use only; not a medical device.")
        self.parent.acknowledgementText = "Built on 3D Slicer, PyTorch, SimpleITK and VTK."
        # The bundled synthetic CT appears in the Sample Data module once Slicer has started.
        slicer.app.connect("startupCompleted()", _registerSampleData)


def _registerSampleData():
    import SampleData
    from LiverTumorSegWidgetHelpers.sampledata import registerSampleData

    icon = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "Icons", "LiverTumorSeg.png")
    registerSampleData(SampleData, icon)


class LiverTumorSegWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.panel = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from LiverTumorSegWidgetHelpers.panel import Panel

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverTumorSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.logic = LiverTumorSegLogic()
        self.panel = Panel(uiWidget, self.logic, isEntered=lambda: self.parent.isEntered)

    def enter(self):
        self.panel.enter()

    def exit(self):
        self.panel.exit()

    def cleanup(self):
        if self.panel is not None:
            self.panel.cleanup()

    def onReload(self):
        """Reload the engine and the GUI helpers too, not only this file."""
        for name in [n for n in sys.modules if n.split(".")[0] in ("LiverTumorSegLib", "LiverTumorSegWidgetHelpers")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)


class LiverTumorSegLogic(ScriptedLoadableModuleLogic):
    """Starts segmentations; all scene work is in LiverTumorSegLib.mrml (tested without Qt)."""

    def getParameterNode(self):
        from LiverTumorSegWidgetHelpers.parameters import LiverTumorSegParameterNode

        return LiverTumorSegParameterNode(super().getParameterNode())

    def startSegmentation(self, inputVolume, outputSegmentation=None, model=None, device="auto", fast=False,
                          showIn3D=True):
        """Start segmenting ``inputVolume`` in a PythonSlicer child process; returns the running
        ``SegmentationJob`` (drive it with ``poll()`` or ``wait()``, stop it with ``cancel()``)."""
        from LiverTumorSegLib.mrml_job import SegmentationJob

        return SegmentationJob(inputVolume, segmentation_node=outputSegmentation, show_3d=showIn3D, model=model,
                               device=device, fast=fast, env=slicer.util.startupEnvironment()).start()

    def segment(self, inputVolume, timeout=None, **kwargs):
        """Segment and wait (scripts, tests); returns (segmentation node, table node)."""
        job = self.startSegmentation(inputVolume, **kwargs)
        state = job.wait(timeout=timeout, on_event=lambda event: slicer.app.processEvents())
        if state != "succeeded":
            raise RuntimeError(f"Liver and tumor segmentation {state}: {job.error}")
        return job.segmentation_node, job.table_node


class LiverTumorSegTest(ScriptedLoadableModuleTest):
    """Self-tests: the whole flow, checked by the same routine as the pytest suite
    (LiverTumorSegLib.mrml_check.assert_results)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from LiverTumorSegLib.runner import missing_dependencies

        missing = missing_dependencies()
        if missing:
            # A build machine or a fresh Slicer without PyTorch: skipped, saying why, rather
            # than failing in the child or installing gigabytes during a test.
            raise unittest.SkipTest("LiverTumorSeg self-test needs " + ", ".join(item["pip"] for item in missing)
                                    + "; install it from the module first")
        self.setUp()
        self.test_PhantomWithBundledModel()
        self.setUp()
        self.test_SampleDataCTLiver()

    def test_PhantomWithBundledModel(self):
        """A phantom generated in memory, the bundled demo model, no network."""
        from LiverTumorSegLib.mrml import assert_results
        from LiverTumorSegLib.mrml_check import SELF_TEST_MIN_DICE, SELF_TEST_PHANTOM_SEED
        from LiverTumorSegLib.phantom import make_phantom

        self.delayDisplay("Segmenting a phantom with the bundled demo model")
        case = make_phantom(SELF_TEST_PHANTOM_SEED, preset="coarse")
        volume = slicer.util.addVolumeFromArray(case.image.array, ijkToRAS=case.image.ijk_to_ras(),
                                                name="LiverTumorSegPhantom")
        segmentation, table = LiverTumorSegLogic().segment(volume, model="demo-phantom", device="cpu",
                                                           timeout=900)
        assert_results(segmentation, table, volume_node=volume, labels=case.labels.array,
                       min_dice=SELF_TEST_MIN_DICE)
        self.delayDisplay("Phantom test passed")

    def test_SampleDataCTLiver(self):
        """SampleData's CTLiver, when the network is available (skipped otherwise)."""
        from LiverTumorSegLib.mrml import assert_results

        try:
            import SampleData

            volume = SampleData.downloadSample("CTLiver")
        except Exception as exc:
            logging.warning(f"LiverTumorSegTest.test_SampleDataCTLiver skipped: CTLiver unavailable ({exc})")
            self.delayDisplay("CTLiver test skipped: no network")
            return
        if volume is None:
            self.delayDisplay("CTLiver test skipped: no network")
            return
        self.delayDisplay("Segmenting SampleData CTLiver")
        segmentation, table = LiverTumorSegLogic().segment(volume, timeout=1800)
        # The demo model learned on phantoms: on a real CT its masks are rougher, so the
        # surface-versus-labelmap check is looser here than on the phantom.
        assert_results(segmentation, table, volume_node=volume, surface_tolerance=0.1)
        self.delayDisplay("CTLiver test passed")
