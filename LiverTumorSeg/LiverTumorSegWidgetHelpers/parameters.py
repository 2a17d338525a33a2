"""The module's parameter node, saved with the scene (Slicer's ``@parameterNodeWrapper``)."""

import enum

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper


class Device(enum.Enum):
    """Where inference runs; values are the engine's ``--device`` names."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self):
        return {"auto": "Auto (GPU if available)", "cpu": "CPU", "cuda": "GPU (CUDA)"}[self.value]


class Quality(enum.Enum):
    """Full: overlapping patches (best borders). Fast: one pass without overlap."""

    FULL = "full"
    FAST = "fast"

    def label(self):
        return {"full": "Full (overlapping patches)", "fast": "Fast (one pass)"}[self.value]


@parameterNodeWrapper
class LiverTumorSegParameterNode:
    """
    inputVolume - the CT to segment (defaults to the volume shown in the slice views).
    outputSegmentation - the segmentation to update; none creates a new one.
    model - a bundled or registered model name, or a model folder; "" is the default.
    device - auto, CPU or GPU.
    quality - full or fast.
    showIn3D - show the Liver and Tumor surfaces in 3D views.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    device: Device = Device.AUTO
    quality: Quality = Quality.FULL
    showIn3D: bool = True
