"""The module panel's behaviour: parameter node, Segment/Cancel, progress, results, export.

Inference runs in a child process (``LiverTumorSegLib.mrml_job.SegmentationJob``); a Qt
timer polls it, so Slicer stays responsive and the run can be cancelled at any time.
The scene changes only when a run succeeds.
"""

import logging
from pathlib import Path

import qt
import slicer
import vtk
from slicer.util import VTKObservationMixin

from LiverTumorSegLib import mrml
from LiverTumorSegLib.runner import CANCELLED, RUNNING, SUCCEEDED
from LiverTumorSegLib.stats import summary_text

from . import dependencies
from .parameters import Quality

SEGMENT_TEXT = "Segment liver && tumor"
CANCEL_TEXT = "Cancel"


def shownVolume(scene):
    """The volume shown in the slice views' background (first view that shows one)."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        volumeId = composite.GetBackgroundVolumeID()
        node = scene.GetNodeByID(volumeId) if volumeId else None
        if node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode"):
            return node
    return scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")


class Panel(VTKObservationMixin):
    """Connects the widgets of ``LiverTumorSeg.ui`` to the parameter node and the logic."""

    POLL_INTERVAL_MS = 200

    def __init__(self, uiWidget, logic, isEntered):
        VTKObservationMixin.__init__(self)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = logic
        self.isEntered = isEntered
        self.job = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modelFolderPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.updateStatisticsButton.connect("clicked(bool)", self.onUpdateStatistics)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.exportSurfacesButton.connect("clicked(bool)", self.onExportSurfaces)
        self.ui.progressBar.hide()
        self.populateModels()
        self.initializeParameterNode()

    # -- parameter node -----------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = shownVolume(slicer.mrmlScene)
            if volume is not None:
                self._parameterNode.inputVolume = volume

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.showModel(self._parameterNode.model)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        params = self._parameterNode
        if params is None:
            return
        if self.job is None and params.outputSegmentation is not None:
            output = mrml.output_for_volume(params.outputSegmentation, params.inputVolume)
            if output is None:  # another volume's results: make a new one instead
                params.outputSegmentation = output
                return  # that change calls this again
        if self.job is None:
            self.ui.applyButton.enabled = params.inputVolume is not None
            self.ui.applyButton.toolTip = ("Segment the liver and liver tumors in the input volume."
                                           if params.inputVolume else "Select an input volume first.")
        self.showResults()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def cleanup(self):
        self.timer.stop()
        if self.job is not None:  # nothing polls after this: wait (seconds) until the child is gone
            job, self.job = self.job, None
            job.stop()
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        if self.job is not None:
            self.job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.isEntered():
            self.initializeParameterNode()

    # -- models -------------------------------------------------------------------------
    def populateModels(self):
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        try:
            models = dependencies.availableModels()
        except Exception as exc:  # a broken registry file must not break the panel
            logging.error(f"LiverTumorSeg: cannot list models: {exc}")
            models = []
        for name, source in models:
            combo.addItem(f"{name} ({source})", name)
        combo.addItem("Local model folder...", dependencies.FOLDER_ITEM)
        combo.blockSignals(False)

    def showModel(self, model):
        """Select ``model`` (a name, a folder, or '' for the first listed) in the widgets."""
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        index = combo.findData(model) if model else 0
        if model and index < 0:
            index = combo.findData(dependencies.FOLDER_ITEM)
            self.ui.modelFolderPathLineEdit.currentPath = model
        combo.currentIndex = max(index, 0)
        combo.blockSignals(False)
        self.ui.modelFolderPathLineEdit.visible = combo.itemData(combo.currentIndex) == dependencies.FOLDER_ITEM

    def selectedModel(self):
        """The ``--model`` value: a model name, or the chosen folder ('' if none yet)."""
        combo = self.ui.modelComboBox
        data = combo.itemData(combo.currentIndex)
        if data == dependencies.FOLDER_ITEM:
            return self.ui.modelFolderPathLineEdit.currentPath
        return data or ""

    def onModelChanged(self, *args):
        combo = self.ui.modelComboBox
        self.ui.modelFolderPathLineEdit.visible = combo.itemData(combo.currentIndex) == dependencies.FOLDER_ITEM
        if self._parameterNode is not None:
            self._parameterNode.model = self.selectedModel()

    # -- running ------------------------------------------------------------------------
    def onApplyButton(self):
        if self.job is not None:
            self.ui.statusLabel.text = "Cancelling..."
            self.job.cancel()
            return
        params = self._parameterNode
        if self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex) == dependencies.FOLDER_ITEM \
                and not self.selectedModel():
            slicer.util.errorDisplay("Choose the local model folder (it holds model.json and the weights).")
            return
        if not dependencies.ensureEngineDependencies():
            return
        with slicer.util.tryWithErrorDisplay("Could not start the liver and tumor segmentation.", waitCursor=True):
            self.job = self.logic.startSegmentation(
                params.inputVolume, outputSegmentation=params.outputSegmentation, model=self.selectedModel() or None,
                device=params.device.value, fast=params.quality == Quality.FAST, showIn3D=params.showIn3D)
        self.setRunning(True)
        self.timer.start()

    def setRunning(self, running):
        self.ui.applyButton.text = CANCEL_TEXT if running else SEGMENT_TEXT
        self.ui.applyButton.enabled = running or (self._parameterNode is not None
                                                  and self._parameterNode.inputVolume is not None)
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.outputSegmentationSelector.enabled = not running
        self.ui.progressBar.visible = running
        if running:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting..."

    def onTimer(self):
        try:
            for event in self.job.poll():
                if event.kind == "warning":
                    logging.warning(f"LiverTumorSeg: {event.message}")
            self.ui.progressBar.value = int(round(100 * self.job.progress))
            if self.job.message:
                self.ui.statusLabel.text = self.job.message
            if self.job.state != RUNNING:
                self.onJobFinished()
        except Exception as exc:  # never leave the panel stuck in "running"
            job, self.job = self.job, None
            job.cancel()
            self.timer.stop()
            self.setRunning(False)
            self.ui.statusLabel.text = "Failed."
            slicer.util.errorDisplay(f"Liver and tumor segmentation failed:\n\n{exc}")
            raise

    def onJobFinished(self):
        job, self.job = self.job, None
        self.timer.stop()
        self.setRunning(False)
        notes = " ".join(job.warnings)
        if job.state == SUCCEEDED:
            if self._parameterNode is not None:
                self._parameterNode.outputSegmentation = job.segmentation_node
            self.showResults()
            stats = mrml.table_statistics(job.table_node)
            summary = f" {summary_text(stats)[:1].upper()}{summary_text(stats)[1:]}." if stats else ""
            self.ui.statusLabel.text = f"Done.{summary} {notes}".strip()
        elif job.state == CANCELLED:
            self.ui.statusLabel.text = "Cancelled; the scene was not changed."
        else:
            self.ui.statusLabel.text = "Failed; the scene was not changed."
            slicer.util.errorDisplay(f"Liver and tumor segmentation failed:\n\n{job.error}\n\n{notes}".strip())

    # -- results ------------------------------------------------------------------------
    def showResults(self):
        params = self._parameterNode
        segmentation = params.outputSegmentation if params is not None else None
        table = mrml.statistics_table(segmentation)
        self.ui.statisticsTableView.setMRMLTableNode(table)
        self.ui.updateStatisticsButton.enabled = table is not None
        self.ui.exportCsvButton.enabled = table is not None
        self.ui.exportSurfacesButton.enabled = table is not None
        if segmentation is not None and segmentation.GetDisplayNode() is not None and table is not None:
            segmentation.GetDisplayNode().SetVisibility3D(params.showIn3D)

    def onUpdateStatistics(self):
        with slicer.util.tryWithErrorDisplay("Could not update the statistics.", waitCursor=True):
            table = mrml.update_statistics(self._parameterNode.outputSegmentation)
            stats = mrml.table_statistics(table)
            notes = " ".join(stats.get("run", {}).get("warnings", []))  # e.g. the liver reaching the image's edge
            self.ui.statusLabel.text = f"Statistics updated from the segments: {summary_text(stats)}. {notes}".strip()
        self.showResults()

    def onExportCsv(self):
        segmentation = self._parameterNode.outputSegmentation
        suggestion = str(Path(qt.QDir.homePath()) / f"{segmentation.GetName()} statistics.csv")
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export statistics", suggestion,
                                              "CSV files (*.csv)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Could not export the statistics.", waitCursor=True):
            mrml.export_statistics_csv(mrml.statistics_table(segmentation), path)
        self.ui.statusLabel.text = f"Statistics written to {path}"

    def onExportSurfaces(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Export surfaces (STL) into folder",
                                                     qt.QDir.homePath())
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Could not export the surfaces.", waitCursor=True):
            written = mrml.export_surfaces(self._parameterNode.outputSegmentation, folder)
        self.ui.statusLabel.text = f"{len(written)} surface file(s) written to {folder}"
